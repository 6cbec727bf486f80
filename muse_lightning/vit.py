"""MUSE Vision Transformers registered with timm (``muse_vit_*``).

``import muse_lightning`` registers the models, so ``timm.create_model("muse_vit_small_patch16_224")``
works like any timm ViT. They are timm ``VisionTransformer``s whose blocks are ``MUSEBlock``s
(mixer and MLP in parallel) with the 2-D convolution layout over the patch grid, pooling the
patch tokens for the head.
"""
from __future__ import annotations

import dataclasses
import itertools
from functools import partial
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import HybridEmbed, PatchDropout, PatchDropoutWithIndices, apply_keep_indices_nlc
from timm.layers.patch_dropout import patch_dropout_forward
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.beit import Beit
from timm.models.deepseek_vit import DeepseekVitEncoder
from timm.models.eva import Eva
from timm.models.metaformer import MetaFormerStage
from timm.models.naflexvit import NaFlexVit
from timm.models.nextvit import NextTransformerBlock
from timm.models.qwen3_vit import Qwen3VitEncoder
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from .attention import MUSEAttention
from .block import MUSEBlock
from .options import MixerOptions
from ._fx import is_tracing
from .adapters import GridRope, refresh_token_layouts
from .branch import TokenConv

__all__ = [
    "MUSEBeit", "MUSEDeepseekVitEncoder", "MUSEEva", "MUSEMetaFormerStage", "MUSENaFlexVit", "MUSENextTransformerBlock",
    "MUSEQwen3VitEncoder", "MUSESwinTransformer", "MUSESwinTransformerV2", "MUSESwinTransformerV2Cr",
    "MUSEVisionTransformer", "MUSEVisionTransformerRelPos", "follow_token_layout", "run_block",
]


BlockKwargs = Callable[[int], dict[str, Any]]


def run_block(block: nn.Module, x: torch.Tensor, layout: tuple | None, **kwargs: Any) -> torch.Tensor:
    """Run ``block(x, **kwargs)``, its MUSE convolutions told this call's ``(grid, kept patch indices)``
    (``layout``; None: the static ones) for this call alone: afterwards they hold their static layout again,
    so no later call reads this one's. Checkpointing this call repeats the telling in its recompute."""
    if layout is None:
        return block(x, **kwargs)
    grid, patch_indices = layout  # unpacked, not starred: an FX proxy unpacks only so
    convs = [m for m in block.modules() if isinstance(m, TokenConv)]
    static = [(m.grid_size, m.patch_indices) for m in convs]
    for m in convs:
        m.grid_size, m.patch_indices = grid, patch_indices
    try:
        return block(x, **kwargs)
    finally:
        for m, (static_grid, static_indices) in zip(convs, static):
            m.grid_size, m.patch_indices = static_grid, static_indices


def run_block_of(
        owner: nn.Module, block: nn.Module, x: torch.Tensor, layout: tuple | None, **kwargs: Any,
) -> torch.Tensor:
    """``run_block``, under activation checkpointing when ``owner`` (a model or stage) has it on."""
    if owner.grad_checkpointing and not torch.jit.is_scripting():
        return checkpoint(run_block, block, x, layout, **kwargs)
    return run_block(block, x, layout, **kwargs)


class _PerCallLayout:
    """``forward_features`` / ``forward_intermediates`` as timm's ViTs', each block's MUSE convolutions told
    this call's layout right before the block runs (so activation checkpointing's recompute is told again).

    Subclasses give ``_embed(x, attn_mask, is_causal) -> (tokens, layout or None, block index -> block kwargs)``.
    """

    blocks: nn.Sequential
    grad_checkpointing: bool
    num_prefix_tokens: int
    norm: nn.Module
    patch_embed: nn.Module

    def _embed(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> tuple:
        raise NotImplementedError

    def _run_blocks(
            self,
            blocks: nn.Sequential,
            x: torch.Tensor,
            layout: tuple | None,
            block_kwargs: BlockKwargs,
            take_indices: Sequence[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last block's output and those of ``take_indices``."""
        taken = []
        for i, blk in enumerate(blocks):
            x = run_block_of(self, blk, x, layout, **block_kwargs(i))
            if i in take_indices:
                taken.append(x)
        return x, taken

    def forward_features(
            self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
    ) -> torch.Tensor:
        """As timm's: embeddings, blocks, final norm."""
        x, layout, block_kwargs = self._embed(x, attn_mask, is_causal)
        x, _ = self._run_blocks(self.blocks, x, layout, block_kwargs)
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: torch.Tensor | None = None,
            is_causal: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
        """As timm's ``VisionTransformer.forward_intermediates``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        height, width = x.shape[-2:]
        x, layout, block_kwargs = self._embed(x, attn_mask, is_causal)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        x, intermediates = self._run_blocks(blocks, x, layout, block_kwargs, take_indices)
        grid = self.patch_embed.dynamic_feat_size((height, width))
        return _intermediates_out(self, x, intermediates, grid, norm, return_prefix_tokens, output_fmt,
                                  intermediates_only, output_dict)


def _intermediates_out(
        model: nn.Module,
        x: torch.Tensor,
        intermediates: list[torch.Tensor],
        grid: Sequence[int],
        norm: bool,
        return_prefix_tokens: bool,
        output_fmt: str,
        intermediates_only: bool,
        output_dict: bool,
        extra: dict[str, Any] | None = None,
) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
    """``forward_intermediates``' result as timm's ViTs shape it: intermediates normed if ``norm``, prefix
    tokens split off, ``(B, C, H, W)`` maps of ``grid`` for ``output_fmt="NCHW"``; ``extra`` joins a dict."""
    if norm:
        intermediates = [model.norm(y) for y in intermediates]
    n = model.num_prefix_tokens
    prefix_tokens = [y[:, :n] for y in intermediates] if n else None
    intermediates = [y[:, n:] for y in intermediates]
    if output_fmt == "NCHW":
        H, W = grid
        intermediates = [y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
    if output_dict:
        result: dict[str, Any] = {"image_intermediates": intermediates, **(extra or {})}
        if prefix_tokens is not None and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefix_tokens
        if not intermediates_only:
            result["image_features"] = model.norm(x)
        return result
    if return_prefix_tokens and prefix_tokens is not None:
        intermediates = list(zip(intermediates, prefix_tokens))
    if intermediates_only:
        return intermediates
    return model.norm(x), intermediates


# timm's models and the MUSE subclasses that keep their MUSE convolutions on the layout of each call, each
# registered by ``@follows_layout`` at its definition.
_FOLLOWING: dict[type[nn.Module], type[nn.Module]] = {}
_M = TypeVar("_M", bound=type[nn.Module])


def follows_layout(cls: _M) -> _M:
    """Register ``cls``, a MUSE subclass of a timm model class (its last base), as what ``swap_attention``
    class-swaps that timm class into (``follow_token_layout``), as timm's ``@register_model`` registers a model."""
    base = cls.__bases__[-1]
    if not base.__module__.startswith("timm.") or base in _FOLLOWING:
        raise TypeError(f"{cls.__name__}'s last base must be a timm model class not yet followed, got {base!r}")
    _FOLLOWING[base] = cls
    return cls


class _FollowsInputSize:
    """timm's ``set_input_size`` (a new image size, patch size or window), the MUSE convolutions then told
    the model's new grids."""

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        super().set_input_size(*args, **kwargs)
        refresh_token_layouts(self)
        for m in self.modules():
            if isinstance(m, MUSEAttention) and m.grid_size is not None:
                m.grid_size = tuple(self.patch_embed.grid_size)


@follows_layout
class MUSEBeit(_FollowsInputSize, Beit):
    """timm's ``Beit`` whose MUSE convolutions follow ``set_input_size``."""


@follows_layout
class MUSEVisionTransformerRelPos(_FollowsInputSize, VisionTransformerRelPos):
    """timm's ``VisionTransformerRelPos`` whose MUSE convolutions follow ``set_input_size``."""


@follows_layout
class MUSESwinTransformer(_FollowsInputSize, SwinTransformer):
    """timm's ``SwinTransformer`` whose MUSE convolutions follow ``set_input_size`` (new windows)."""


@follows_layout
class MUSESwinTransformerV2(_FollowsInputSize, SwinTransformerV2):
    """timm's ``SwinTransformerV2`` whose MUSE convolutions follow ``set_input_size`` (new windows)."""


@follows_layout
class MUSESwinTransformerV2Cr(_FollowsInputSize, SwinTransformerV2Cr):
    """timm's ``SwinTransformerV2Cr`` whose MUSE convolutions follow ``set_input_size`` (new windows)."""


def _masks(attn_mask: torch.Tensor | None, is_causal: bool) -> dict[str, Any]:
    return {"attn_mask": attn_mask, "is_causal": is_causal} if attn_mask is not None or is_causal else {}


@follows_layout
class MUSEVisionTransformer(_FollowsInputSize, _PerCallLayout, VisionTransformer):
    """timm's ``VisionTransformer`` that tells its MUSE convolutions where the tokens sit.

    Mixers get the model's ``num_prefix_tokens`` and patch grid when the model is built. With
    ``dynamic_img_size=True`` the grid of each input, and in training under patch dropout the kept
    patches' places in the grid, are handed to each block's convolutions right before the block
    runs, without hooks: the model traces with ``torch.fx`` and compiles with ``fullgraph=True``.
    Everything else is timm's. ``swap_attention`` turns a swapped ``VisionTransformer`` into one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for m in self.modules():
            if isinstance(m, MUSEAttention):
                m.num_prefix_tokens = self.num_prefix_tokens
                m.grid_size = tuple(self.patch_embed.grid_size)

    def _embed(
            self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
    ) -> tuple[torch.Tensor, tuple | None, BlockKwargs]:
        x = self.patch_embed(x)
        grid = (x.shape[1], x.shape[2]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x = self._pos_embed(x)
        keep = None
        dropout = isinstance(self.patch_drop, PatchDropout)
        if dropout:
            p = self.patch_drop
            x, keep = patch_dropout_forward(x, p.prob, p.num_prefix_tokens, p.ordered, p.training)
        masks = _masks(attn_mask, is_causal)
        return self.norm_pre(x), ((grid, keep) if self.dynamic_img_size or dropout else None), lambda i: masks


class _KeptPatches(PatchDropoutWithIndices):
    """Eva's patch dropout, keeping the indices of the patches it kept for ``MUSEEva`` to read."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, self.keep_indices = super().forward(x)
        return x, self.keep_indices


@follows_layout
class MUSEEva(_FollowsInputSize, _PerCallLayout, Eva):
    """timm's ``Eva`` (EVA, EVA-02, DINOv3, PE, ViT-RoPE) that hands its MUSE convolutions the patch grid
    of each input with ``dynamic_img_size=True`` and the kept patches under patch dropout, as
    ``MUSEVisionTransformer`` does. ``swap_attention`` turns a swapped ``Eva`` into one."""

    def _embed(
            self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
    ) -> tuple[torch.Tensor, tuple | None, BlockKwargs]:
        x = self.patch_embed(x)
        grid = (x.shape[1], x.shape[2]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x, rope = self._pos_embed(x)  # Eva drops patches here
        dropout = isinstance(self.patch_drop, _KeptPatches)
        layout = (grid, self.patch_drop.keep_indices if dropout else None) if self.dynamic_img_size or dropout else None
        mixed = getattr(self, "rope_mixed", False) and rope is not None  # one RoPE table a block

        def block_kwargs(i: int) -> dict[str, Any]:
            return {"rope": rope[i] if mixed else rope, "attn_mask": attn_mask, "is_causal": is_causal}

        return self.norm_pre(x), layout, block_kwargs


@follows_layout
class MUSENaFlexVit(NaFlexVit):
    """timm's ``NaFlexVit`` whose MUSE convolutions follow the patch grid of each call: an image's grid
    (patch dropout's kept patches at their places), or in NaFlex mode each sample's patches at their
    ``patch_coord`` on the batch's grid, its padding never read (one cell past the grid holds it). As
    ``MUSEVisionTransformer``, the layout is handed to each block right before it runs.
    ``swap_attention`` turns a swapped ``NaFlexVit`` into one."""

    def _layout(self, patches: torch.Tensor, patch_coord: torch.Tensor | None, embeds: dict) -> tuple:
        """``(grid, kept or placed patch indices)`` of this call."""
        pad = bool(self.embeds.dynamic_img_pad)
        # An FX graph takes either kind of input, so it always gets places (identity ones for a whole image).
        return naflex_layout(patches, patch_coord, embeds.get("patch_valid"), embeds.get("keep_indices"),
                             tuple(self.embeds.patch_size), pad, is_tracing())

    def _run_blocks(
            self,
            blocks: nn.Sequential,
            embeds: dict,
            layout: tuple,
            naflex_mode: bool,
            take_indices: Sequence[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """As timm's block loop (axial or mixed RoPE), each block told ``layout``; the last block's output and
        those of ``take_indices``."""
        x, rope, keep = embeds["patches"], embeds.get("rope_embeds"), embeds.get("keep_indices")
        mixed = self.rope_is_mixed and rope is not None
        ropes = iter(rope) if mixed else itertools.repeat(rope)
        taken = []
        for i, (blk, blk_rope) in enumerate(zip(blocks, ropes)):
            if mixed and self.training and self.patch_drop is not None and keep is not None:
                blk_rope = apply_keep_indices_nlc(x, blk_rope, keep, pos_embed_has_batch=naflex_mode)
            kwargs = {"attn_mask": embeds.get("attn_mask")} | ({} if rope is None else {"rope": blk_rope})
            x = run_block_of(self, blk, x, layout, **kwargs)
            if i in take_indices:
                taken.append(x)
        return x, taken

    def forward_features(
            self,
            patches: torch.Tensor,
            patch_coord: torch.Tensor | None = None,
            patch_valid: torch.Tensor | None = None,
            attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """As timm's: embeddings, blocks, final norm (NaFlex mode: a dict with ``patch_valid``)."""
        embeds = self._forward_embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=attn_mask)
        layout = self._layout(patches, patch_coord, embeds)
        x, _ = self._run_blocks(self.blocks, embeds, layout, patch_coord is not None)
        x = self.norm(x)
        if patch_coord is not None:
            return {"patches": x, "patch_valid": embeds.get("patch_valid")}
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor | dict[str, torch.Tensor],
            indices: int | list[int] | None = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
            patch_coord: torch.Tensor | None = None,
            patch_valid: torch.Tensor | None = None,
            attn_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
        """As timm's ``NaFlexVit.forward_intermediates`` (NaFlex dict inputs: ``output_fmt="NLC"`` only)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        if isinstance(x, dict):
            if output_fmt == "NCHW":
                raise ValueError('output_fmt="NCHW" is not supported for NaFlex (dict) inputs, use "NLC"')
            patch_coord, patch_valid = x["patch_coord"], x.get("patch_valid", patch_valid)
            attn_mask, patches = x.get("attn_mask", attn_mask), x["patches"]
        else:
            patches = x
        embeds = self._forward_embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=attn_mask)
        layout = self._layout(patches, patch_coord, embeds)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        x, intermediates = self._run_blocks(blocks, embeds, layout, patch_coord is not None, take_indices)
        valid = embeds.get("patch_valid")
        return _intermediates_out(self, x, intermediates, layout[0], norm, return_prefix_tokens, output_fmt,
                                  intermediates_only, output_dict, {} if valid is None else {"patch_valid": valid})


def naflex_layout(
        patches: torch.Tensor,
        patch_coord: torch.Tensor | None,
        valid: torch.Tensor | None,
        keep: torch.Tensor | None,
        patch_size: tuple[int, int],
        pad: bool,
        always_places: bool = False,
) -> tuple[tuple[int, int], torch.Tensor | None]:
    """A NaFlexViT call's grid and patch places (a leaf in ``torch.fx`` graphs, computed at run time).

    Images: their patch grid, and patch dropout's ``keep`` indices. NaFlex mode: the batch's grid from the
    patches' ``(y, x)`` ``patch_coord`` ``(B, N, 2)`` (of the kept ones), each patch's place in it;
    padding (``valid`` False) all in one cell past the grid, which the convolution reads as zero.
    ``always_places``: an image's places too, where it has no patch dropout (each patch its own).
    """
    if patch_coord is None:
        (h, w), (ph, pw) = patches.shape[-2:], patch_size
        grid = (-(-h // ph), -(-w // pw)) if pad else (h // ph, w // pw)
        if keep is None and always_places:
            keep = torch.arange(grid[0] * grid[1], device=patches.device).expand(patches.shape[0], -1)
        return grid, keep
    coord = patch_coord if keep is None else patch_coord.gather(1, keep[..., None].expand(-1, -1, 2))
    if valid is None:
        valid = torch.ones_like(coord[..., 0], dtype=torch.bool)
    rows, cols = (int(coord[..., i][valid].max()) + 1 for i in (0, 1))
    places = torch.where(valid, coord[..., 0] * cols + coord[..., 1], rows * cols)
    return (rows + int(not bool(valid.all())), cols), places


torch.fx.wrap("naflex_layout")


class _GridOfPatches:
    """``_pos_embed`` of the vision towers that take any image size (NHWC patches, RoPE of each call's grid),
    its RoPE table handed on as a ``GridRope``: each block passes it to its attention, which hands the grid to
    its branch, within the block's call (and so within its checkpoint's recompute)."""

    def _pos_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, GridRope]:
        grid = (x.shape[1], x.shape[2])
        x, rope = super()._pos_embed(x)
        return x, GridRope(rope, grid)


@follows_layout
class MUSEDeepseekVitEncoder(_GridOfPatches, DeepseekVitEncoder):
    """timm's DeepSeek vision tower whose MUSE convolutions follow each image's patch grid."""


@follows_layout
class MUSEQwen3VitEncoder(_GridOfPatches, Qwen3VitEncoder):
    """timm's Qwen3 vision tower whose MUSE convolutions follow each image's patch grid."""


@follows_layout
class MUSEMetaFormerStage(MetaFormerStage):
    """timm's ``MetaFormerStage`` (CAFormer) whose attention blocks' MUSE convolutions are told the grid of the
    map the stage flattens into their tokens (any size, square or not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, C, H, W = x.shape
        layout = None
        if not self.use_nchw:
            layout = ((H, W), None)
            x = x.reshape(B, C, -1).transpose(1, 2)
        for blk in self.blocks:  # timm checkpoints each block (checkpoint_seq); each recompute told again
            x = run_block_of(self, blk, x, layout)
        if not self.use_nchw:
            x = x.transpose(1, 2).reshape(B, C, H, W)
        return x


@follows_layout
class MUSENextTransformerBlock(NextTransformerBlock):
    """timm's NextViT transformer block whose attention's MUSE convolution is told the grid of the map the block
    flattens into its tokens (any size, square or not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        out = self.norm1(x)
        out = out.reshape(B, C, -1).transpose(-1, -2)
        out = self.mhsa_drop_path(run_block(self.e_mhsa, out, ((H, W), None)))
        x = x + out.transpose(-1, -2).reshape(B, C, H, W)
        out = self.projection(x)
        out = out + self.mhca_drop_path(self.mhca(out))
        x = torch.cat([x, out], dim=1)
        out = self.norm2(x)
        return x + self.mlp_drop_path(self.mlp(out))


def follow_token_layout(model: nn.Module) -> None:
    """Class-swap a timm model to its MUSE subclass (``_FOLLOWING``: ``VisionTransformer`` to
    ``MUSEVisionTransformer``, ``Eva`` to ``MUSEEva``, ...; weights and keys unchanged), so that its MUSE
    convolutions follow each call's layout and ``set_input_size``."""
    if type(model) in _FOLLOWING:
        model.__class__ = _FOLLOWING[type(model)]
    if type(model) is MUSEEva and type(model.patch_drop) is PatchDropoutWithIndices:
        model.patch_drop.__class__ = _KeptPatches


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# 28 x 28 grey images (Fashion-MNIST): its classes, size and normalisation.
_FASHION_MNIST_CFG = dict(num_classes=10, input_size=(1, 28, 28), crop_pct=1.0, mean=(0.2860,), std=(0.3530,))

default_cfgs = generate_default_cfgs({
    "muse_vit_tiny_patch16_224.untrained": _cfg(),
    "muse_vit_small_patch16_224.untrained": _cfg(),
    "muse_vit_base_patch16_224.untrained": _cfg(),
    # Small images (Fashion-MNIST 28 x 28 grey, CIFAR 32 x 32 colour): 4 x 4 patches, or a stem making that grid.
    "muse_vit_tiny_patch4_28.untrained": _cfg(**_FASHION_MNIST_CFG),
    "muse_vit_tiny_convstem_28.untrained": _cfg(**_FASHION_MNIST_CFG, first_conv="patch_embed.backbone.0.conv"),
    "muse_vit_tiny_patch4_32.untrained": _cfg(
        num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    ),
})


def _create_muse_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> MUSEVisionTransformer:
    """Build a ``VisionTransformer`` of ``MUSEBlock``s with 2-D mixers over the patch grid.

    The convolution branch works on patch tokens only, so the models pool the patch tokens
    (``global_pool="avg"``, no class token, as timm's ``*_gap`` ViTs) and every block's
    convolution reaches the logits; ``class_token=True, global_pool="token"`` gives the classic head.

    MUSE's options are ``mixer=MixerOptions(...)`` (or a mapping of its fields; ``conv_layout`` defaults to
    ``"2d"``), beside timm's keyword arguments and the block's ``parallel``; ``block_fn`` replaces the block
    (e.g. timm's ``Block`` for a sequential block, whose ``attn_layer`` then defaults to a 2-D ``MUSEAttention``).
    """
    flat = sorted(set(kwargs) & set(MixerOptions.names()))
    if flat:
        raise TypeError(f"{variant}: give {flat} as mixer=MixerOptions(...) (or mixer={{...}}), not as model arguments")
    out_indices = kwargs.pop("out_indices", 3)
    kwargs.setdefault("class_token", False)
    kwargs.setdefault("global_pool", "avg")
    mixer = MixerOptions.of(kwargs.pop("mixer", MixerOptions()))
    mixer = dataclasses.replace(mixer, conv_layout=mixer.layout_or("2d"))
    block_kwargs = {"parallel": kwargs.pop("parallel")} if "parallel" in kwargs else {}
    block_fn = kwargs.pop("block_fn", MUSEBlock)
    if block_fn is MUSEBlock:
        kwargs["block_fn"] = partial(MUSEBlock, mixer=mixer, **block_kwargs)
    else:
        kwargs["block_fn"] = block_fn
        kwargs.setdefault("attn_layer", partial(MUSEAttention, mixer=mixer))
    return build_model_with_cfg(
        MUSEVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


@register_model
def muse_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> MUSEVisionTransformer:
    """MUSE ViT-Ti/16 at 224 px."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_muse_vit("muse_vit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def muse_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> MUSEVisionTransformer:
    """MUSE ViT-S/16 at 224 px."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_muse_vit("muse_vit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def muse_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> MUSEVisionTransformer:
    """MUSE ViT-B/16 at 224 px."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_muse_vit("muse_vit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def muse_vit_tiny_patch4_28(pretrained: bool = False, **kwargs: Any) -> MUSEVisionTransformer:
    """MUSE ViT-Ti/4 for 28 x 28 single-channel images (Fashion-MNIST): a 7 x 7 patch grid."""
    model_args = dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create_muse_vit("muse_vit_tiny_patch4_28", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def muse_vit_tiny_convstem_28(pretrained: bool = False, **kwargs: Any) -> MUSEVisionTransformer:
    """MUSE ViT-Ti for 28 x 28 grey images with a convolutional stem instead of 4 x 4 patches.

    Two overlapping 3 x 3 stride-2 convolutions (BatchNorm and GELU between; Xiao et al. 2021,
    "Early Convolutions Help Transformers See Better") turn the image into the same 7 x 7 token grid,
    with ``stem_chs`` channels after the first and ``embed_dim`` after the second.
    """
    model_args = {**dict(img_size=28, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3), **kwargs}
    stem = ConvStem(
        in_chans=model_args["in_chans"], depth=2, channels=(model_args.pop("stem_chs", 32), model_args["embed_dim"]),
        kernel_size=3, stride=(2, 2), padding=1, act_layer=nn.GELU,
        device=model_args.get("device"), dtype=model_args.get("dtype"),
    )
    model_args.update(embed_layer=partial(HybridEmbed, backbone=stem, proj=False), patch_size=1)
    return _create_muse_vit("muse_vit_tiny_convstem_28", pretrained=pretrained, **model_args)


@register_model
def muse_vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> MUSEVisionTransformer:
    """MUSE ViT-Ti/4 for 32 x 32 colour images (CIFAR): an 8 x 8 patch grid."""
    model_args = dict(img_size=32, num_classes=10, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create_muse_vit("muse_vit_tiny_patch4_32", pretrained=pretrained, **dict(model_args, **kwargs))
