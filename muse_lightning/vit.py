"""MUSE Vision Transformers registered with timm (``muse_vit_*``), and the patch-grid tracker.

``import muse_lightning`` registers the models, so ``timm.create_model("muse_vit_small_patch16_224")``
works like any timm ViT. They are timm ``VisionTransformer``s whose blocks are ``MUSEBlock``s
(mixer and MLP in parallel) with the 2-D convolution layout over the patch grid, pooling the
patch tokens for the head.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from .attention import MUSEAttention
from .block import MUSEBlock

__all__ = ["PatchGridTracker", "track_token_layout"]


class PatchGridTracker:
    """Forward hook on a ``patch_embed`` that hands the current patch grid to 2-D MUSE mixers.

    timm's blocks pass only the tokens, so a mixer cannot see the grid of a dynamically sized
    image; this hook reads it from the patch embedding's ``(B, H, W, C)`` output (or its fixed
    ``grid_size``) and sets each mixer's ``grid_size`` before the blocks run. A callable object
    rather than a closure, so that ``copy.deepcopy`` of the model (EMA) points the copy's hook at the
    copy's mixers.
    """

    def __init__(self, mixers: list[MUSEAttention]) -> None:
        self.mixers = mixers

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        grid = tuple(output.shape[1:3]) if output.dim() == 4 else tuple(module.grid_size)
        for mixer in self.mixers:
            mixer.grid_size = grid


def track_token_layout(model: nn.Module) -> None:
    """Fit the MUSE mixers of a timm ViT-style ``model`` to its tokens.

    Every mixer gets the model's ``num_prefix_tokens`` (class and register tokens go through
    attention only); 2-D mixers are kept told of the current patch grid by a ``PatchGridTracker``.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(patch_embed, "grid_size") or not hasattr(model, "num_prefix_tokens"):
        raise ValueError("track_token_layout needs a timm ViT-style model (patch_embed.grid_size, num_prefix_tokens)")
    mixers = [m for m in model.modules() if isinstance(m, MUSEAttention)]
    for mixer in mixers:
        mixer.num_prefix_tokens = model.num_prefix_tokens
    grid_mixers = [m for m in mixers if m.conv_layout == "2d"]
    if grid_mixers and not any(isinstance(h, PatchGridTracker) for h in patch_embed._forward_hooks.values()):
        for mixer in grid_mixers:
            mixer.grid_size = tuple(patch_embed.grid_size)
        patch_embed.register_forward_hook(PatchGridTracker(grid_mixers))


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


def _muse_vision_transformer(**kwargs: Any) -> VisionTransformer:
    model = VisionTransformer(**kwargs)
    track_token_layout(model)  # before timm wraps it (features_only)
    return model


def _create_muse_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Build a ``VisionTransformer`` of ``MUSEBlock``s with 2-D mixers over the patch grid.

    The convolution branch works on patch tokens only, so the models pool the patch tokens
    (``global_pool="avg"``, no class token, as timm's ``*_gap`` ViTs) and every block's
    convolution reaches the logits; ``class_token=True, global_pool="token"`` gives the classic head.

    MUSE options (``kernel_sizes``, ``conv_type``, ``conv_proj``, ``conv_layout``, and the block's
    ``parallel``) may be given as keyword arguments beside timm's; ``block_fn`` replaces the block (e.g. timm's ``Block`` for a
    sequential block, whose ``attn_layer`` then defaults to a 2-D ``MUSEAttention``).
    """
    out_indices = kwargs.pop("out_indices", 3)
    kwargs.setdefault("class_token", False)
    kwargs.setdefault("global_pool", "avg")
    mixer_kwargs = {k: kwargs.pop(k) for k in ("kernel_sizes", "conv_type", "conv_proj", "conv_layout") if k in kwargs}
    block_kwargs = {"parallel": kwargs.pop("parallel")} if "parallel" in kwargs else {}
    mixer_kwargs.setdefault("conv_layout", "2d")
    block_fn = kwargs.pop("block_fn", MUSEBlock)
    if block_fn is MUSEBlock:
        kwargs["block_fn"] = partial(MUSEBlock, **mixer_kwargs, **block_kwargs)
    else:
        kwargs["block_fn"] = block_fn
        kwargs.setdefault("attn_layer", partial(MUSEAttention, **mixer_kwargs))
    return build_model_with_cfg(
        _muse_vision_transformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


@register_model
def muse_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MUSE ViT-Ti/16 at 224 px."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_muse_vit("muse_vit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def muse_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MUSE ViT-S/16 at 224 px."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_muse_vit("muse_vit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def muse_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MUSE ViT-B/16 at 224 px."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_muse_vit("muse_vit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def muse_vit_tiny_patch4_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MUSE ViT-Ti/4 for 28 x 28 single-channel images (Fashion-MNIST): a 7 x 7 patch grid."""
    model_args = dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create_muse_vit("muse_vit_tiny_patch4_28", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def muse_vit_tiny_convstem_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MUSE ViT-Ti for 28 x 28 grey images with a convolutional stem instead of 4 x 4 patches.

    Two overlapping 3 x 3 stride-2 convolutions (BatchNorm and GELU between; Xiao et al. 2021,
    "Early Convolutions Help Transformers See Better") turn the image into the same 7 x 7 token grid,
    with ``stem_chs`` channels after the first and ``embed_dim`` after the second.
    """
    model_args = {**dict(img_size=28, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3), **kwargs}
    stem = ConvStem(
        in_chans=model_args["in_chans"], depth=2, channels=(model_args.pop("stem_chs", 32), model_args["embed_dim"]),
        kernel_size=3, stride=(2, 2), padding=1, act_layer=nn.GELU,
    )
    model_args.update(embed_layer=partial(HybridEmbed, backbone=stem, proj=False), patch_size=1)
    return _create_muse_vit("muse_vit_tiny_convstem_28", pretrained=pretrained, **model_args)


@register_model
def muse_vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MUSE ViT-Ti/4 for 32 x 32 colour images (CIFAR): an 8 x 8 patch grid."""
    model_args = dict(img_size=32, num_classes=10, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create_muse_vit("muse_vit_tiny_patch4_32", pretrained=pretrained, **dict(model_args, **kwargs))
