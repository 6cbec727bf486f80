"""Swap MUSE into an existing timm model, keeping the function it computes."""
from __future__ import annotations

import logging
from typing import Any, Literal, overload

import torch
from timm.layers import Attention
from torch import nn

from .attention import MUSEAttention
from .vit import track_token_layout

__all__ = ["swap_attention"]

_logger = logging.getLogger(__name__)

MIXER_OPTIONS: tuple[str, ...] = ("kernel_sizes", "conv_type", "conv_proj", "conv_layout")
# Taken from the attention being replaced (its trained weights fix them).
_FROM_MODEL = (
    "dim", "num_heads", "attn_head_dim", "dim_out", "qkv_bias", "qk_norm", "scale_norm", "proj_bias", "gated",
    "attn_drop", "proj_drop", "norm_layer", "num_prefix_tokens", "grid_size", "device", "dtype",
)


@overload
def swap_attention(model: nn.Module, *, return_names: Literal[False] = ..., **mixer_kwargs: Any) -> nn.Module: ...


@overload
def swap_attention(
        model: nn.Module, *, return_names: Literal[True], **mixer_kwargs: Any,
) -> tuple[nn.Module, list[str]]: ...


def swap_attention(
        model: nn.Module, *, return_names: bool = False, **mixer_kwargs: Any,
) -> nn.Module | tuple[nn.Module, list[str]]:
    """Replace every timm ``Attention`` in ``model`` by a ``MUSEAttention`` computing the same function.

    The query/key/value and output projections (and any q/k norm, scale norm and gate) move into
    the new mixer as they are; the convolution branch starts silent (its output projection, or with
    ``conv_proj="shared"`` its kernels, at zero), so the swapped model's outputs equal the
    original's and fine-tuning starts from its accuracy. ViT-style models (a ``patch_embed`` and
    ``num_prefix_tokens``: ViT, DeiT, the other ``VisionTransformer`` families) get the 2-D layout
    by default, their class and register tokens attention-only; other models get the 1-D layout.

    Args:
        model: A timm model (changed in place and returned).
        return_names: Also return the names of the swapped modules.
        mixer_kwargs: MUSE options: ``kernel_sizes``, ``conv_type``, ``conv_proj``, ``conv_layout``.
    """
    taken = sorted(set(mixer_kwargs) & set(_FROM_MODEL))
    if taken:
        raise ValueError(f"{taken} are taken from the model's attention modules; mixer options are {MIXER_OPTIONS}")
    unknown = sorted(set(mixer_kwargs) - set(MIXER_OPTIONS))
    if unknown:
        raise TypeError(f"unknown mixer options {unknown}; mixer options are {MIXER_OPTIONS}")
    if mixer_kwargs.get("conv_type") == "none":
        raise ValueError("conv_type='none' would swap attention for attention; use 'static' or 'dynamic'")
    if mixer_kwargs.get("conv_proj") == "shared" and mixer_kwargs.get("conv_type") == "dynamic":
        raise ValueError(
            "conv_proj='shared' with conv_type='dynamic' cannot start silent (dynamic kernels sum to one): "
            "use conv_proj='separate' to keep the model's function"
        )
    targets = [(name, m) for name, m in model.named_modules() if type(m) is Attention]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no timm Attention module to swap (swap_attention replaces "
            "timm.layers.Attention, as used by ViT, DeiT and the other VisionTransformer families)"
        )
    vit_like = hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
    mixer_kwargs.setdefault("conv_layout", "2d" if vit_like else "1d")
    if mixer_kwargs["conv_layout"] == "2d" and not vit_like:
        raise ValueError(f"conv_layout='2d' needs a ViT-style model with a patch grid, got {type(model).__name__}")
    for name, old in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _mixer_from(old, **mixer_kwargs))
    if vit_like:
        track_token_layout(model)
    names = [name for name, _ in targets]
    _logger.info("swap_attention: %d timm Attention modules swapped for MUSEAttention: %s", len(names), names)
    return (model, names) if return_names else model


def _mixer_from(old: Attention, **mixer_kwargs: Any) -> MUSEAttention:
    """A MUSE mixer that reuses ``old``'s projections and norms, its convolution branch silent."""
    weight = old.qkv.weight
    new = MUSEAttention(
        old.qkv.in_features,
        num_heads=old.num_heads,
        attn_head_dim=old.head_dim,
        dim_out=old.proj.out_features,
        qkv_bias=old.qkv.bias is not None,
        proj_bias=old.proj.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
        **mixer_kwargs,
    )
    new.fused_attn = old.fused_attn
    for attr in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
        setattr(new, attr, getattr(old, attr))
    new.gate = getattr(old, "gate", None)
    with torch.no_grad():
        if new.conv_proj is not None:
            new.conv_proj.weight.zero_()
        else:  # conv_proj="shared", static kernels: the convolution's own output must be zero
            for w in new.conv.weight:
                w.zero_()
            new.conv.bias.zero_()
    return new
