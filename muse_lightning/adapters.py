"""Per-attention-class adapters: how ``swap_attention`` attaches MUSE's convolution branch to each timm attention.

An ``AttentionAdapter`` says where the values come from (the attention's fused ``qkv`` layer, V
its last third, or its own value projection), which layer's output the branch is added to, and
the tokens' layout (``TokenLayout``). Supporting a new attention class is one
``register_attention_adapter`` call; registering a reason instead of an adapter marks a class that
``swap_attention`` deliberately leaves (pooling and class-attention heads).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from timm.layers import Attention, AttentionPoolLatent, AttentionRope, DiffAttention, to_2tuple
from timm.layers.attention_pool2d import AttentionPool2d, RotAttentionPool2d
from timm.models import (
    beit, cait, convit, crossvit, davit, edgenext, efficientformer, efficientvit_mit, eva, fastvit, gcvit, maxxvit,
    metaformer, mvitv2, nest, pvt_v2, swiftformer, swin_transformer, tnt, twins,
    swin_transformer_v2, swin_transformer_v2_cr, tiny_vit, vision_transformer, vision_transformer_relpos,
    vision_transformer_sam, visformer, volo,
    xcit,
)
from timm.models.csatv2 import SpatialAttention as CSATSpatialAttention  # the module is shadowed by its model
import torch
from torch import nn

from .branch import TokenLayout, widths

__all__ = [
    "ATTENTION_ADAPTERS", "AttentionAdapter", "MaskReadingAttention", "block_window_grid", "feature_map", "patch_grid",
    "mvit_tokens", "patch_grid_without_prefix", "register_attention_adapter", "sequence", "square_grid", "tnt_grid",
    "window_grid",
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
    """The enclosing ViT-style model's patch grid after its prefix tokens; after a model's class tokens,
    the square grid of each call (PiT, CrossViT); a sequence otherwise, after the enclosing model's
    ``num_prefix_tokens`` if it has them (NaFlexViT)."""
    owner = _vit_owner(ancestors)
    if owner is not None:
        return TokenLayout("2d", int(owner.num_prefix_tokens), tuple(owner.patch_embed.grid_size))
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
    """A square grid of each call, no prefix tokens: the flattened feature map of a stage (MetaFormer,
    EfficientFormer, FastViT) or a block of one (NesT). A non-square map is an error, never a guess."""
    return TokenLayout("2d")


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


def _per_head_qkv(attn: nn.Module) -> tuple[int, int]:
    """A fused ``qkv`` whose output is per head ``[q | k | v]`` of ``key_dim``, ``key_dim``, ``val_dim``
    (TinyViT, EfficientFormer)."""
    return attn.num_heads, 2 * attn.key_dim


def _maxvit_qkv(attn: nn.Module) -> tuple[int, int]:
    """MaxViT's and CoAtNet's ``qkv``: per head ``[q | k | v]`` with ``head_first``, else the usual thirds."""
    if attn.head_first:
        return attn.num_heads, 2 * attn.dim_head
    return 1, 2 * widths(attn.qkv)[1] // 3


def _parallel_block_values(block: nn.Module) -> tuple[int, int]:
    """ViT's parallel-scaling blocks fuse ``[mlp | q | k | v]`` into one ``in_proj``: V is its last ``dim`` channels."""
    return 1, block.in_proj.out_features - block.in_split[-1]


def tnt_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """TNT: the inner attention over each patch's grid of pixel tokens, the outer over the patch grid after
    the class token."""
    model = next(m for m in ancestors if hasattr(m, "pixel_embed"))
    if attn is ancestors[0].attn_in:
        return TokenLayout("2d", 0, tuple(model.pixel_embed.new_patch_size))
    return TokenLayout("2d", int(model.num_prefix_tokens), tuple(model.pixel_embed.grid_size))


def _gcvit_values(attn: nn.Module) -> tuple[int, int]:
    """GCViT's ``qkv`` is ``[k | v]`` where a global query comes from outside, else ``[q | k | v]``."""
    out = widths(attn.qkv)[1]
    return 1, out - out // (2 if attn.use_global else 3)


def _separate_qkv_bias(attn: nn.Module) -> None:
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
        self.muse.see_masks(attn_mask, is_causal)
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


class _RopeMaskReading:
    """``MaskReadingAttention``'s forward for the attentions that take a RoPE argument first."""

    def forward(
            self,
            x: torch.Tensor,
            rope: torch.Tensor | None = None,
            attn_mask: torch.Tensor | None = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        self.muse.see_masks(attn_mask, is_causal)
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
        self.muse.see_grids(_reduced_grid(self, feat_size), feat_size)
        return super().forward(x, feat_size)


class GridReadingMultiScaleAttention(mvitv2.MultiScaleAttention):
    """MViTv2's pooling attention that hands its branch the grids of its values (the block's input; the
    convolution reads the value projection before the attention pools it) and of its output (the pooled
    queries')."""

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> tuple[torch.Tensor, list[int]]:
        self.muse.see_grids(feat_size, feat_size if self.pool_q is None else _strided_grid(self.pool_q, feat_size))
        return super().forward(x, feat_size)


class GridReadingSubSampleAttn(twins.GlobalSubSampleAttn):
    """Twins' global sub-sampled attention that hands its branch the grids of its values and its output."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        self.muse.see_grids(_reduced_grid(self, size), size)
        return super().forward(x, size)


@dataclass(frozen=True)
class AttentionAdapter:
    """How MUSE's branch attaches to one attention class.

    Attributes:
        layout: ``(attention, its ancestors nearest first) -> TokenLayout``.
        values: Candidate value layers, ``(attribute, split)``: the first present (an ``nn.Linear``,
            or a 1 x 1 ``nn.Conv2d`` over ``(B, C, H, W)`` maps with a ``feature_map`` layout) is
            tapped. ``split`` is an int ``p``, the values being the last ``1 / p`` of its output
            channels (3 for a fused ``qkv``), or ``attention -> (groups, offset)`` where the output
            is ``groups`` equal groups (one per head) whose channels from ``offset`` on are values.
        output: The ``nn.Linear`` whose output the branch is added to (the attention's output
            projection), or candidates, the first present taken.
        prepare: Called on the attention before tapping, e.g. to route its values through the layer.
        attention_class: A subclass of the attention's class (same weights, a forward that first hands its
            masks to the branch, as ``MaskReadingAttention``) the attention becomes.
    """

    layout: LayoutFn = sequence
    values: tuple[tuple[str, int | Callable[[nn.Module], tuple[int, int]]], ...] = (("qkv", 3), ("v_proj", 1))
    output: str | tuple[str, ...] = "proj"
    prepare: Callable[[nn.Module], None] | None = None
    attention_class: type[nn.Module] | None = None


ATTENTION_ADAPTERS: dict[type[nn.Module], AttentionAdapter | str] = {}


def register_attention_adapter(cls: type[nn.Module], adapter: AttentionAdapter | str) -> None:
    """Tell ``swap_attention`` how to attach MUSE to attention class ``cls`` (exact type), or with a
    string, why it leaves ``cls`` alone (``swap_attention`` warns with it)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not isinstance(adapter, (AttentionAdapter, str)):
        raise TypeError(f"adapter must be an AttentionAdapter or a reason (str), got {type(adapter).__name__}")
    ATTENTION_ADAPTERS[cls] = adapter


_CLASS_ATTENTION = "class attention: only the class token queries, so it has no token-wise output to add to"
_CHANNEL = (
    "channel attention: it mixes channels, not tokens; the model's own token mixing (convolutions, window "
    "attention) sits beside it"
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
        (vision_transformer_sam.Attention, AttentionAdapter(block_window_grid)),
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
        (tiny_vit.Attention, AttentionAdapter(block_window_grid, values=(("qkv", _per_head_qkv),))),
        (efficientformer.Attention, AttentionAdapter(square_grid, values=(("qkv", _per_head_qkv),))),
        (metaformer.Attention, AttentionAdapter(square_grid)),
        (fastvit.Attention, AttentionAdapter(square_grid)),
        (nest.Attention, AttentionAdapter(square_grid)),
        (convit.GPSA, AttentionAdapter(patch_grid_without_prefix, values=(("v", 1),))),
        (convit.MHSA, AttentionAdapter(patch_grid)),
        (maxxvit.AttentionCl, AttentionAdapter(feature_map, values=(("qkv", _maxvit_qkv),))),
        (maxxvit.Attention2d, AttentionAdapter(feature_map, values=(("qkv", _maxvit_qkv),))),
        (visformer.Attention, AttentionAdapter(feature_map)),
        (volo.Attention, AttentionAdapter(feature_map)),
        (volo.OutlookAttention, AttentionAdapter(feature_map, values=(("v", 1),))),
        (volo.ClassAttention, _CLASS_ATTENTION),
        (crossvit.CrossAttention, "cross attention: one branch's class token queries the other branch's tokens"),
        (CSATSpatialAttention, "a spatial gate over a 7 x 7 map of pooled channel statistics, not the model's tokens"),
        (davit.ChannelAttention, _CHANNEL),
        (xcit.XCA, _CHANNEL),
        (edgenext.CrossCovarianceAttn, _CHANNEL),
        (swiftformer.EfficientAdditiveAttention, "additive attention: one pooled global query and no value projection"),
        (efficientvit_mit.LiteMLA, "linear attention over convolutional (NCHW) projections: no token-wise value layer"),
        (cait.ClassAttn, _CLASS_ATTENTION),
        (AttentionPoolLatent, _POOLING),
        (AttentionPool2d, _POOLING),
        (RotAttentionPool2d, _POOLING),
):
    register_attention_adapter(_cls, _adapter)
