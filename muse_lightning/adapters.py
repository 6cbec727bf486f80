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

from timm.layers import Attention, AttentionPoolLatent, AttentionRope
from timm.layers.attention_pool2d import AttentionPool2d, RotAttentionPool2d
from timm.models import beit, cait, eva, swin_transformer, swin_transformer_v2, vision_transformer_relpos
from timm.models import vision_transformer_sam
from torch import nn

from .branch import TokenLayout

__all__ = [
    "ATTENTION_ADAPTERS", "AttentionAdapter", "patch_grid", "patch_grid_without_prefix", "register_attention_adapter",
    "sam_grid", "sequence", "window_grid",
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


def patch_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The enclosing ViT-style model's patch grid after its prefix tokens; a sequence outside one."""
    owner = _vit_owner(ancestors)
    if owner is None:
        return TokenLayout("1d")
    return TokenLayout("2d", int(owner.num_prefix_tokens), tuple(owner.patch_embed.grid_size))


def patch_grid_without_prefix(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The patch grid, all tokens patches (CaiT: the class token joins only in the class-attention head)."""
    return patch_grid(attn, ancestors)._replace(num_prefix_tokens=0)


def window_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """The attention's window (Swin): each window's tokens are a ``window_size`` grid."""
    size = attn.window_size
    return TokenLayout("2d", 0, (size, size) if isinstance(size, int) else tuple(size))


def sam_grid(attn: nn.Module, ancestors: Sequence[nn.Module]) -> TokenLayout:
    """SAM's ViT: the block's window where it has one, else the whole patch grid (no prefix tokens)."""
    window = getattr(ancestors[0], "window_size", 0) if ancestors else 0
    if window:
        return TokenLayout("2d", 0, (window, window))
    owner = _vit_owner(ancestors, prefix=False)
    return TokenLayout("1d") if owner is None else TokenLayout("2d", 0, tuple(owner.patch_embed.grid_size))


def _separate_qkv_bias(attn: nn.Module) -> None:
    """Add the q/k/v bias after calling the ``qkv`` layer (these attentions' ``qkv_bias_separate``), so that
    the layer runs and its tap sees the values."""
    if getattr(attn, "q_bias", None) is not None:
        attn.qkv_bias_separate = True


@dataclass(frozen=True)
class AttentionAdapter:
    """How MUSE's branch attaches to one attention class.

    Attributes:
        layout: ``(attention, its ancestors nearest first) -> TokenLayout``.
        values: Candidate value layers, ``(attribute, parts)``: the first ``nn.Linear`` present is
            tapped, its values the last ``1 / parts`` of its output channels (3 for a fused ``qkv``).
        output: The ``nn.Linear`` whose output the branch is added to (the attention's output projection).
        prepare: Called on the attention before tapping, e.g. to route its values through the layer.
    """

    layout: LayoutFn = sequence
    values: tuple[tuple[str, int], ...] = (("qkv", 3), ("v_proj", 1))
    output: str = "proj"
    prepare: Callable[[nn.Module], None] | None = None


ATTENTION_ADAPTERS: dict[type[nn.Module], AttentionAdapter | str] = {}


def register_attention_adapter(cls: type[nn.Module], adapter: AttentionAdapter | str) -> None:
    """Tell ``swap_attention`` how to attach MUSE to attention class ``cls`` (exact type), or with a
    string, why it leaves ``cls`` alone (``swap_attention`` warns with it)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not isinstance(adapter, (AttentionAdapter, str)):
        raise TypeError(f"adapter must be an AttentionAdapter or a reason (str), got {type(adapter).__name__}")
    ATTENTION_ADAPTERS[cls] = adapter


_POOLING = "a pooling head: learned or pooled queries attend over the tokens, no token-wise values to convolve"
for _cls, _adapter in (
        (Attention, AttentionAdapter(patch_grid)),
        (AttentionRope, AttentionAdapter(patch_grid)),
        (eva.EvaAttention, AttentionAdapter(patch_grid, prepare=_separate_qkv_bias)),
        (beit.Attention, AttentionAdapter(patch_grid, prepare=_separate_qkv_bias)),
        (vision_transformer_relpos.RelPosAttention, AttentionAdapter(patch_grid)),
        (vision_transformer_sam.Attention, AttentionAdapter(sam_grid)),
        (cait.TalkingHeadAttn, AttentionAdapter(patch_grid_without_prefix)),
        (swin_transformer.WindowAttention, AttentionAdapter(window_grid)),
        (swin_transformer_v2.WindowAttention, AttentionAdapter(window_grid, prepare=_separate_qkv_bias)),
        (cait.ClassAttn, "class attention: only the class token queries, so it has no token-wise output to add to"),
        (AttentionPoolLatent, _POOLING),
        (AttentionPool2d, _POOLING),
        (RotAttentionPool2d, _POOLING),
):
    register_attention_adapter(_cls, _adapter)
