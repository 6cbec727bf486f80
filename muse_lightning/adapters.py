"""Per-attention-class adapters: how ``swap_attention`` attaches MUSE's convolution branch to each timm attention.

An ``AttentionAdapter`` says where the values come from (the attention's fused ``qkv`` layer, V
its last third, or its own value projection), which layer's output the branch is added to, and
the tokens' layout (``TokenLayout``). Supporting a new attention class is one
``register_attention_adapter`` call; registering a reason instead of an adapter marks a class that
``swap_attention`` deliberately leaves (pooling and class-attention heads).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from timm.layers import Attention, AttentionPoolLatent, AttentionPoolPrr, AttentionRope, DiffAttention, to_2tuple
from timm.layers import cbam, coord_attn, selective_kernel, split_attn
from timm.layers.attention2d import Attention2d, MultiQueryAttention2d
from timm.layers.attention_pool2d import AttentionPool2d, RotAttentionPool2d
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.halo_attn import HaloAttn
from timm.layers.lambda_layer import LambdaLayer
from timm.layers.non_local_attn import BatNonLocalAttn, NonLocalAttn
from timm.models import (
    beit, cait, coat, convit, cpubone, crossvit, davit, edgenext, efficientformer, efficientformer_v2,
    efficientvit_mit, efficientvit_msra, eva, fastvit, gcvit, gemma4_vit, hiera, hieradet_sam2, iformer, levit,
    lowformer, maxxvit, metaformer, mobilevit, mvitv2, naflexvit, nest, nextvit, pvt_v2, shvit, swiftformer,
    swin_transformer, swin_transformer_v2, swin_transformer_v2_cr, tiny_vit, tnt, twins, visformer, vision_transformer,
    vision_transformer_relpos, vision_transformer_sam, volo, xcit,
)
from timm.models.csatv2 import SpatialAttention as CSATSpatialAttention  # the module is shadowed by its model
import torch
from torch import nn

from .branch import CallLayout, TokenLayout, masks_layout
from .taps import Split, widths

__all__ = [
    "ATTENTION_ADAPTERS", "NOT_ATTENTION", "AttentionAdapter", "GridRope", "MaskReadingAttention", "adapter_for",
    "adapter_table", "ancestors_of",
    "block_window_grid", "class_token_grid", "feature_map", "levit_tokens", "mvit_tokens", "nextvit_tokens",
    "patch_grid", "patch_grid_without_prefix", "refresh_token_layouts", "register_attention_adapter", "sequence",
    "square_grid", "tnt_grid", "values_after", "window_grid",
]

LayoutFn = Callable[[nn.Module, Sequence[nn.Module]], TokenLayout]


def _vit_owner(ancestors: Sequence[nn.Module], prefix: bool = True) -> nn.Module | None:
    """The nearest enclosing ViT-style model: one with ``patch_embed.grid_size`` (and ``num_prefix_tokens``)."""
    for m in ancestors:
        if hasattr(getattr(m, "patch_embed", None), "grid_size") and (hasattr(m, "num_prefix_tokens") or not prefix):
            return m
    return None


def sequence(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The tokens are a sequence (1-D convolution)."""
    return TokenLayout("1d")


def _class_tokens(ancestors: Sequence[nn.Module]) -> int | None:
    """The number of class tokens of the nearest model that prepends them (PiT's ``cls_token``, CrossViT's
    ``cls_token_0``) to a square grid of tokens whose size changes from stage to stage."""
    for m in ancestors:
        tokens = getattr(m, "cls_token", None)
        tokens = tokens if isinstance(tokens, nn.Parameter) else getattr(m, "cls_token_0", None)
        if isinstance(tokens, nn.Parameter):
            return int(tokens.shape[1])
    return None


def patch_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The enclosing ViT-style model's patch grid after its prefix tokens (each call's with NaFlexViT, the DeepSeek
    and Qwen3 towers, and ``dynamic_img_size``); after a model's class tokens, the square grid of each call (PiT,
    CrossViT); a sequence otherwise, after the enclosing model's ``num_prefix_tokens`` if it has them."""
    owner = _vit_owner(ancestors)
    if owner is not None:
        return TokenLayout("2d", int(owner.num_prefix_tokens), tuple(owner.patch_embed.grid_size))
    naflex = next((m for m in ancestors if isinstance(m, naflexvit.NaFlexVit)), None)
    if naflex is not None:  # any grid: each call's, handed over by MUSENaFlexVit
        return TokenLayout("2d", int(naflex.num_prefix_tokens))
    classes = _class_tokens(ancestors)
    if classes is not None:
        return TokenLayout("2d", classes)
    prefix = next((m.num_prefix_tokens for m in ancestors if isinstance(getattr(m, "num_prefix_tokens", None), int)), 0)
    return TokenLayout("1d", prefix)


def patch_grid_without_prefix(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The patch grid, all tokens patches (CaiT, whose class token joins only in the class-attention head;
    ConViT's gated positional attention, before its class token joins)."""
    return patch_grid(attn, ancestors)._replace(num_prefix_tokens=0)


def square_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The grid of each call's flattened feature map, no prefix tokens: handed over where the model knows it
    (MetaFormer's stages, NextViT's blocks, the attention in FastViT, PVTv2, Twins), else square (EfficientFormer,
    a block of NesT), a non-square map an error, never a guess."""
    return TokenLayout("2d")


def class_token_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The grid of each call (handed over by the attention) after one class token (CoaT)."""
    return TokenLayout("2d", 1)


def levit_tokens(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """LeViT: its stage's fixed ``resolution`` grid of tokens, or its ``(B, C, H, W)`` maps in conv mode."""
    return TokenLayout("2d", feature_map=True) if attn.use_conv else TokenLayout("2d", 0, to_2tuple(attn.resolution))


def nextvit_tokens(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """NextViT: the grid of each call (handed over by its block), or where its keys and values are average-pooled
    over runs of ``sr_ratio ** 2`` consecutive tokens, the sequence of those runs (handed over by the attention)."""
    return TokenLayout("2d") if attn.sr is None else TokenLayout("1d")


def mvit_tokens(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """MViTv2: the grid of each call (handed over by the attention), after its class token if it has one."""
    return TokenLayout("2d", int(attn.has_cls_token))


def window_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The attention's window (Swin): each window's tokens are a ``window_size`` grid."""
    size = attn.window_size
    return TokenLayout("2d", 0, (size, size) if isinstance(size, int) else tuple(size))


def block_window_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The enclosing block's window where it has one (SAM's ViT, TinyViT), else the whole patch grid."""
    window = getattr(ancestors[0], "window_size", 0) if ancestors else 0
    if window:
        return TokenLayout("2d", 0, (window, window))
    owner = _vit_owner(ancestors, prefix=False)
    return TokenLayout("1d") if owner is None else TokenLayout("2d", 0, tuple(owner.patch_embed.grid_size))


def feature_map(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The attention reads and writes maps (VOLO, MaxViT's partitions ``(B, H, W, C)``; CoAtNet and Visformer
    ``(B, C, H, W)``): their grid."""
    return TokenLayout("2d", feature_map=True)


def values_after(width: str, blocks: int = 2, per_head: bool = False) -> Callable[[nn.Module], Split]:
    """The split of a layer whose values follow ``blocks`` blocks (q and k, or k) of ``attn.<width>`` channels,
    in the whole output or, ``per_head``, in each head's ``[q | k | v]`` group of it."""
    def split(attn: nn.Module) -> Split:
        return (attn.num_heads if per_head else 1), slice(blocks * getattr(attn, width), None)
    return split


def _head_first_qkv(attn: nn.Module) -> Split:
    """A ``qkv`` that is per head ``[q | k | v]`` with ``head_first``, else the usual thirds (MaxViT's and
    CoAtNet's, timm's ``Attention2d``)."""
    if attn.head_first:
        return attn.num_heads, slice(2 * attn.dim_head, None)
    return 1, slice(2 * widths(attn.qkv)[1] // 3, None)


def _parallel_block_values(block: nn.Module) -> Split:
    """ViT's parallel-scaling blocks fuse ``[mlp | q | k | v]`` into one ``in_proj``: V is its last ``dim`` channels."""
    return 1, slice(block.in_proj.out_features - block.in_split[-1], None)


def _value_gate(attn: nn.Module) -> Split:
    """iFormer's ``v_gate``: ``[v | gate]``, both squashed by a sigmoid after the layer; V the first half."""
    return 1, slice(0, widths(attn.v_gate)[1] // 2)


def _hiera_order(attn: nn.Module, ancestors: Sequence[nn.Module]) -> None:
    """Hand a Hiera attention's branch the order of its tokens: Hiera unrolls the patch grid into mask units
    (``Unroll``), its ``Reroll`` gives each block's order; a pooling block's values are in the order of the
    block before it."""
    model = next(m for m in ancestors if isinstance(m, hiera.Hiera))
    index = next(i for i, block in enumerate(model.blocks) if block.attn is attn)

    def raster(i: int) -> torch.Tensor:  # the token index at each place of block i's output grid
        size = model.reroll.schedule[i][1]
        tokens = torch.arange(size[0] * size[1], dtype=torch.float64)[None, :, None]
        return model.reroll(tokens, i)[0, ..., 0].flatten().long(), size

    values_at, values_grid = raster(index - 1 if attn.q_stride > 1 else index)
    output_at, output_grid = raster(index)
    attn.muse.follow_token_order(values_grid, output_grid, values_at, output_at.argsort())


def tnt_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """TNT: the inner attention over each patch's grid of pixel tokens, the outer over the patch grid after
    the class token."""
    model = next(m for m in ancestors if hasattr(m, "pixel_embed"))
    if attn is ancestors[0].attn_in:
        return TokenLayout("2d", 0, tuple(model.pixel_embed.new_patch_size))
    return TokenLayout("2d", int(model.num_prefix_tokens), tuple(model.pixel_embed.grid_size))


def _gcvit_values(attn: nn.Module) -> Split:
    """GCViT's ``qkv`` is ``[k | v]`` where a global query comes from outside, else ``[q | k | v]``."""
    out = widths(attn.qkv)[1]
    return 1, slice(out - out // (2 if attn.use_global else 3), None)


def _separate_qkv_bias(attn: nn.Module, ancestors: Sequence[nn.Module]) -> None:
    """Add the q/k/v bias after calling the ``qkv`` layer (these attentions' ``qkv_bias_separate``), so that
    the layer runs and its tap sees the values."""
    if getattr(attn, "q_bias", None) is not None:
        attn.qkv_bias_separate = True


class MaskReadingAttention(Attention):
    """timm's ``Attention`` that hands its masks to its MUSE branch first: keys its ``attn_mask`` blocks for
    every query (NaFlexViT's padding) are not read by the convolution, and ``is_causal`` makes it causal."""

    def forward(
            self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
    ) -> torch.Tensor:
        self.muse.see(masks_layout(attn_mask, is_causal))
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


class GridRope(NamedTuple):
    """A RoPE table with the patch grid it was built for: how a vision tower that takes any image size (the
    DeepSeek and Qwen3 towers) hands each call's grid through its blocks to their attentions' branches."""

    table: torch.Tensor
    grid: tuple[int, int]


class _RopeMaskReading:
    """``MaskReadingAttention``'s forward for the attentions that take a RoPE argument first; a ``GridRope``
    also gives the branch the call's grid."""

    def forward(
            self,
            x: torch.Tensor,
            rope: torch.Tensor | GridRope | None = None,
            attn_mask: torch.Tensor | None = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        layout = masks_layout(attn_mask, is_causal)
        if isinstance(rope, GridRope):
            layout, rope = layout._replace(values_grid=rope.grid), rope.table
        self.muse.see(layout)
        return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)


class MaskReadingEvaAttention(_RopeMaskReading, eva.EvaAttention):
    """``MaskReadingAttention`` for EVA's attention."""


class MaskReadingAttentionRope(_RopeMaskReading, AttentionRope):
    """``MaskReadingAttention`` for timm's ``AttentionRope``."""


def _strided_grid(layer: nn.Module, grid: Sequence[int]) -> tuple[int, int]:
    """``grid`` after a strided convolution or pooling ``layer``."""
    (kh, kw), (sh, sw), (ph, pw) = (to_2tuple(getattr(layer, a)) for a in ("kernel_size", "stride", "padding"))
    return (grid[0] + 2 * ph - kh) // sh + 1, (grid[1] + 2 * pw - kw) // sw + 1


def _reduced_grid(attn: nn.Module, grid: Sequence[int]) -> tuple[int, int]:
    """The grid of a spatial-reduction attention's keys and values: its input ``grid`` after its
    adaptive pooling (PVTv2's linear mode) and its strided ``sr`` convolution."""
    h, w = grid[0], grid[1]
    pool = getattr(attn, "pool", None)
    if pool is not None:
        h, w = to_2tuple(pool.output_size)
    sr = getattr(attn, "sr", None)
    return _strided_grid(sr, (h, w)) if isinstance(sr, nn.Conv2d) else (h, w)


class GridReadingPvtAttention(pvt_v2.Attention):
    """PVTv2's spatial-reduction attention that hands its branch the grids of its values and its output."""

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        self.muse.see(CallLayout(_reduced_grid(self, feat_size), feat_size))
        return super().forward(x, feat_size)


class GridReadingMultiScaleAttention(mvitv2.MultiScaleAttention):
    """MViTv2's pooling attention that hands its branch the grids of its values (the block's input; the
    convolution reads the value projection before the attention pools it) and of its output (the pooled
    queries')."""

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> tuple[torch.Tensor, list[int]]:
        output = feat_size if self.pool_q is None else _strided_grid(self.pool_q, feat_size)
        self.muse.see(CallLayout(feat_size, output))
        return super().forward(x, feat_size)


class GridReadingSubSampleAttn(twins.GlobalSubSampleAttn):
    """Twins' global sub-sampled attention that hands its branch the grids of its values and its output."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        self.muse.see(CallLayout(_reduced_grid(self, size), size))
        return super().forward(x, size)


class GridReadingSamAttention(vision_transformer_sam.Attention):
    """SAM ViT's attention, which takes ``(B, H, W, C)`` maps (a window, or the whole image in global blocks, of
    any size), handing its branch their grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.muse.see(CallLayout(x.shape[1:3], x.shape[1:3]))
        return super().forward(x)


class GridReadingFastVitAttention(fastvit.Attention):
    """FastViT's attention, which takes ``(B, C, H, W)`` maps of any size, handing its branch their grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.muse.see(CallLayout(x.shape[2:], x.shape[2:]))
        return super().forward(x)


class GridReadingLocallyGroupedAttn(twins.LocallyGroupedAttn):
    """Twins' locally grouped attention that hands its branch the grid whose windows its values are."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        self.muse.see(CallLayout(size, windowed=True))
        return super().forward(x, size)


class GridReadingFactorAttn(coat.FactorAttnConvRelPosEnc):
    """CoaT's factorized attention that hands its branch the grid of its tokens after the class token."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        self.muse.see(CallLayout(size, size))
        return super().forward(x, size)


class GridReadingLevitDownsample(levit.AttentionDownsample):
    """LeViT's downsampling attention (token mode) that hands its branch its grid and its strided queries'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            h, w = to_2tuple(self.resolution)
            self.muse.see(CallLayout((h, w), ((h - 1) // self.stride + 1, (w - 1) // self.stride + 1)))
        return super().forward(x)


class GridReadingEfficientAttention(nextvit.EfficientAttention):
    """NextViT's attention that, where it pools its keys and values over runs of tokens, hands its branch
    the number of runs and of tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sr is not None:
            self.muse.see(CallLayout((1, x.shape[1] // self.N_ratio), (1, x.shape[1])))
        return super().forward(x)


class MaskReadingGemma4Attention(gemma4_vit.Gemma4Attention):
    """``MaskReadingAttention`` for Gemma4's attention (its padding never read by the convolution)."""

    def forward(
            self,
            x: torch.Tensor,
            rope_cos: torch.Tensor,
            rope_sin: torch.Tensor,
            attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.muse.see(masks_layout(attn_mask, False))
        return super().forward(x, rope_cos, rope_sin, attn_mask=attn_mask)


@dataclass(frozen=True)
class AttentionAdapter:
    """How MUSE's branch attaches to one attention class.

    Attributes:
        layout: ``(attention, its ancestors nearest first) -> TokenLayout``.
        values: Candidate value layers, ``(path, split)`` (a dotted path in the attention): the first
            present is tapped: a pointwise layer (an ``nn.Linear``, or a 1 x 1 ``nn.Conv2d`` over
            ``(B, C, H, W)`` maps with a ``feature_map`` layout, each alone or with its norm and
            activation), or an ``nn.ModuleList`` of them whose values are joined in order (one per
            head). ``split`` is an int ``p``, the values being the last ``1 / p`` of its output
            channels (3 for a fused ``qkv``), or ``attention -> (groups, slice)`` where the output is
            ``groups`` equal groups (one per head) whose ``slice`` of channels are values.
        output: The attention's output projection (pointwise: the branch is added to its output; an
            ``nn.ConvTranspose2d``: to its input), or candidates, the first present taken.
        prepare: Called with the attention (its branch set as ``muse``) and its ancestors before tapping, e.g.
            to route its values through the layer.
        left_alone: ``attention -> reason or None``: why this one is left alone (a cross attention, whose
            values are another sequence's), None to swap it.
        attention_class: A subclass of the attention's class (same weights, a forward that first hands its
            masks to the branch, as ``MaskReadingAttention``) the attention becomes.
    """

    layout: LayoutFn = sequence
    values: tuple[tuple[str, int | Callable[[nn.Module], tuple[int, int]]], ...] = (("qkv", 3), ("v_proj", 1))
    output: str | tuple[str, ...] = "proj"
    prepare: Callable[[nn.Module, Sequence[nn.Module]], None] | None = None
    left_alone: Callable[[nn.Module], str | None] | None = None
    attention_class: type[nn.Module] | None = None


ATTENTION_ADAPTERS: dict[type[nn.Module], AttentionAdapter | str] = {}
# Named like attention, but no attention over tokens: never reported as left alone. NextViT's multi-head
# convolutional attention is a grouped 3 x 3 convolution; the others are CNN gates, channel or spatial
# weights from pooled statistics (CBAM, coordinate and strip attention, selective-kernel and split attention,
# CSATv2's spatial gate).
NOT_ATTENTION: set[type[nn.Module]] = {
    nextvit.ConvAttention, cbam.ChannelAttn, cbam.LightChannelAttn, cbam.SpatialAttn, cbam.LightSpatialAttn,
    coord_attn.CoordAttn, coord_attn.SimpleCoordAttn, coord_attn.EfficientLocalAttn, coord_attn.StripAttn,
    selective_kernel.SelectiveKernelAttn, split_attn.SplitAttn, CSATSpatialAttention,
}


def register_attention_adapter(cls: type[nn.Module], adapter: AttentionAdapter | str) -> None:
    """Tell ``swap_attention`` how to attach MUSE to attention class ``cls`` (exact type), or with a
    string, why it leaves ``cls`` alone (``swap_attention`` warns with it)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not isinstance(adapter, (AttentionAdapter, str)):
        raise TypeError(f"adapter must be an AttentionAdapter or a reason (str), got {type(adapter).__name__}")
    ATTENTION_ADAPTERS[cls] = adapter


def ancestors_of(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules holding ``model``'s submodule ``name``, nearest first (``model`` last)."""
    return [model.get_submodule(".".join(name.split(".")[:i])) for i in range(name.count("."), -1, -1)]


def adapter_for(attn: nn.Module) -> AttentionAdapter | None:
    """The adapter ``attn`` was swapped with (its class, or the class its adapter swapped it from)."""
    entry = next((ATTENTION_ADAPTERS[c] for c in type(attn).__mro__ if c in ATTENTION_ADAPTERS), None)
    return entry if isinstance(entry, AttentionAdapter) else None


def refresh_token_layouts(model: nn.Module) -> None:
    """Read each swapped attention's grid again from its adapter, after the model changed its input size
    (timm's ``set_input_size``: a new patch grid or window)."""
    for name, attn in model.named_modules():
        branch, adapter = getattr(attn, "muse", None), adapter_for(attn)
        if branch is None or adapter is None or not hasattr(branch, "grid_size"):
            continue
        branch.grid_size = adapter.layout(attn, ancestors_of(model, name)).grid_size


# A fused qkv that is per head [q | k | v] of key_dim, key_dim, val_dim (TinyViT, EfficientFormer, LeViT).
_PER_HEAD_QKV = values_after("key_dim", per_head=True)
_CLASS_ATTENTION = "class attention: only the class token queries, so it has no token-wise output to add to"
_CHANNEL = (
    "channel attention: it mixes channels, not tokens; the model's own token mixing (convolutions, window "
    "attention) sits beside it"
)
_LINEAR = (
    "linear attention (EfficientViT-MIT, MobileViTv2, lambda layers): a context summed over all tokens, no "
    "token-wise attention output of values to set a convolution beside"
)
_POOLING = "a pooling head: learned or pooled queries attend over the tokens, no token-wise values to convolve"
for _cls, _adapter in (
        (Attention, AttentionAdapter(patch_grid, attention_class=MaskReadingAttention)),
        (AttentionRope, AttentionAdapter(patch_grid, attention_class=MaskReadingAttentionRope)),
        (DiffAttention, AttentionAdapter(patch_grid)),
        *((cls, AttentionAdapter(
            patch_grid, values=(("in_proj", _parallel_block_values),), output=("out_proj", "attn_out_proj"),
        )) for cls in (vision_transformer.ParallelScalingBlock, vision_transformer.DiffParallelScalingBlock)),
        (eva.EvaAttention, AttentionAdapter(
            patch_grid, prepare=_separate_qkv_bias, attention_class=MaskReadingEvaAttention,
        )),
        (beit.Attention, AttentionAdapter(patch_grid, prepare=_separate_qkv_bias)),
        (vision_transformer_relpos.RelPosAttention, AttentionAdapter(patch_grid)),
        (vision_transformer_sam.Attention, AttentionAdapter(
            block_window_grid, attention_class=GridReadingSamAttention,
        )),
        (cait.TalkingHeadAttn, AttentionAdapter(patch_grid_without_prefix)),
        (swin_transformer.WindowAttention, AttentionAdapter(window_grid)),
        (swin_transformer_v2.WindowAttention, AttentionAdapter(window_grid, prepare=_separate_qkv_bias)),
        (swin_transformer_v2_cr.WindowMultiHeadAttention, AttentionAdapter(window_grid)),
        (davit.WindowAttention, AttentionAdapter(window_grid)),
        (pvt_v2.Attention, AttentionAdapter(
            square_grid, values=(("kv", 2),), attention_class=GridReadingPvtAttention,
        )),
        (mvitv2.MultiScaleAttention, AttentionAdapter(
            mvit_tokens, attention_class=GridReadingMultiScaleAttention,
        )),
        (twins.GlobalSubSampleAttn, AttentionAdapter(
            square_grid, values=(("kv", 2),), attention_class=GridReadingSubSampleAttn,
        )),
        (gcvit.WindowAttentionGlobal, AttentionAdapter(window_grid, values=(("qkv", _gcvit_values),))),
        (tnt.Attention, AttentionAdapter(tnt_grid, values=(("v", 1),))),
        (tiny_vit.Attention, AttentionAdapter(block_window_grid, values=(("qkv", _PER_HEAD_QKV),))),
        (efficientformer.Attention, AttentionAdapter(square_grid, values=(("qkv", _PER_HEAD_QKV),))),
        (metaformer.Attention, AttentionAdapter(square_grid)),
        (fastvit.Attention, AttentionAdapter(square_grid, attention_class=GridReadingFastVitAttention)),
        (nest.Attention, AttentionAdapter(square_grid)),
        (convit.GPSA, AttentionAdapter(patch_grid_without_prefix, values=(("v", 1),))),
        (convit.MHSA, AttentionAdapter(patch_grid)),
        (maxxvit.AttentionCl, AttentionAdapter(feature_map, values=(("qkv", _head_first_qkv),))),
        (maxxvit.Attention2d, AttentionAdapter(feature_map, values=(("qkv", _head_first_qkv),))),
        (visformer.Attention, AttentionAdapter(feature_map)),
        (volo.Attention, AttentionAdapter(feature_map)),
        (volo.OutlookAttention, AttentionAdapter(feature_map, values=(("v", 1),))),
        (volo.ClassAttention, _CLASS_ATTENTION),
        (twins.LocallyGroupedAttn, AttentionAdapter(square_grid, attention_class=GridReadingLocallyGroupedAttn)),
        (coat.FactorAttnConvRelPosEnc, AttentionAdapter(class_token_grid, attention_class=GridReadingFactorAttn)),
        (levit.Attention, AttentionAdapter(levit_tokens, values=(("qkv", _PER_HEAD_QKV),))),
        (levit.AttentionDownsample, AttentionAdapter(
            levit_tokens, values=(("kv", values_after("key_dim", 1, per_head=True)),),  # per head [k | v]
            attention_class=GridReadingLevitDownsample,
        )),
        (efficientformer_v2.Attention2d, AttentionAdapter(feature_map, values=(("v", 1),))),
        (efficientformer_v2.Attention2dDownsample, AttentionAdapter(feature_map, values=(("v", 1),))),
        (nextvit.EfficientAttention, AttentionAdapter(
            nextvit_tokens, values=(("v", 1),), attention_class=GridReadingEfficientAttention,
        )),
        (efficientvit_msra.CascadedGroupAttention, AttentionAdapter(  # each head its own [q | k | v]
            feature_map, values=(("qkvs", values_after("key_dim")),),
        )),
        (Attention2d, AttentionAdapter(feature_map, values=(("qkv", _head_first_qkv),))),
        (MultiQueryAttention2d, AttentionAdapter(feature_map, values=(("value.proj", 1),), output="output.proj")),
        (shvit.SHSA, AttentionAdapter(feature_map, values=(("qkv", values_after("qk_dim")),))),  # single head
        (iformer.SHMA, AttentionAdapter(feature_map, values=(("v_gate", _value_gate),))),
        *((cls, AttentionAdapter(
            feature_map, values=(("pwise", values_after("head_dim", per_head=True)),),
            output=("o_proj", "upsampling.0", "upsampling"),
        )) for cls in (lowformer.ConvAttention, cpubone.ConvAttention)),
        (gemma4_vit.Gemma4Attention, AttentionAdapter(
            sequence, output="o_proj", attention_class=MaskReadingGemma4Attention,
        )),
        (hieradet_sam2.MultiScaleAttention, AttentionAdapter(feature_map)),
        (hiera.MaskUnitAttention, AttentionAdapter(square_grid, prepare=_hiera_order)),
        (crossvit.CrossAttention, "cross attention: one branch's class token queries the other branch's tokens"),
        (davit.ChannelAttention, _CHANNEL),
        (davit.ChannelAttentionV2, _CHANNEL),
        (xcit.XCA, _CHANNEL),
        (edgenext.CrossCovarianceAttn, _CHANNEL),
        (swiftformer.EfficientAdditiveAttention, "additive attention: one pooled global query and no value projection"),
        (efficientvit_mit.LiteMLA, _LINEAR),
        (mobilevit.LinearSelfAttention, _LINEAR),
        (LambdaLayer, _LINEAR),
        (BatNonLocalAttn, "a bilinear attention transform (it resamples blocks of the map), no token-wise values"),
        (NonLocalAttn, AttentionAdapter(feature_map, values=(("g", 1),), output="z")),
        (BottleneckAttn, AttentionAdapter(feature_map, values=(("qkv", values_after("dim_out_qk")),), output="pool")),
        (HaloAttn, AttentionAdapter(
            feature_map, values=(("kv", values_after("dim_head_qk", 1, per_head=True)),), output="pool",
        )),
        (cait.ClassAttn, _CLASS_ATTENTION),
        (AttentionPoolLatent, _POOLING),
        (AttentionPoolPrr, _POOLING),
        (AttentionPool2d, _POOLING),
        (RotAttentionPool2d, _POOLING),
):
    register_attention_adapter(_cls, _adapter)


def _first_sentence(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    return " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())


def _values_cell(adapter: AttentionAdapter) -> str:
    """Where an adapter reads V: its candidate layers and the share of each that is values."""
    shares = {1: "", 2: " (last half)", 3: " (last third)"}
    return ", ".join(
        f"`{path}`" + (shares.get(split, f" (last 1/{split})") if isinstance(split, int) else " (a slice it computes)")
        for path, split in adapter.values
    )


def adapter_table() -> str:
    """The registry as markdown: each swapped attention class with its value and output layers and its token
    layout (the layout function's docstring), then each class left alone with the reason ``swap_attention``
    gives, with the Hugging Face adapters where ``transformers`` is installed. The documentation's family
    table is this table (a test keeps the two equal)."""
    with contextlib.suppress(ImportError):
        from . import hf  # noqa: F401  (registers the transformers adapters)
    swapped = ["| attention class | values read from | branch added to | convolution layout |",
               "| --- | --- | --- | --- |"]
    left = ["| attention class | left alone because |", "| --- | --- |"]
    name = lambda cls: f"`{cls.__module__.removeprefix('timm.')}.{cls.__qualname__}`"  # noqa: E731
    for cls, adapter in ATTENTION_ADAPTERS.items():
        if isinstance(adapter, str):
            left.append(f"| {name(cls)} | {adapter} |")
            continue
        outputs = (adapter.output,) if isinstance(adapter.output, str) else adapter.output
        layout = _first_sentence(adapter.layout)
        if adapter.attention_class is not None:
            layout += f" ({_first_sentence(adapter.attention_class)})"
        swapped.append(f"| {name(cls)} | {_values_cell(adapter)} | {', '.join(f'`{o}`' for o in outputs)} | {layout} |")
    return "\n".join(swapped) + "\n\n" + "\n".join(left)
