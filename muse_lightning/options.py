"""MUSE's options: one typed value that every mixer, block, network, LightningModule, ``swap_attention`` and the
CLI take (``mixer=MixerOptions(...)``; in a config, ``model.init_args.mixer.kernel_sizes: [1, 3, 5]``)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .conv import CONV_LAYOUTS, CONV_TYPES, ConvLayout, ConvType, check_kernel_sizes

__all__ = ["CONV_PROJS", "ConvProj", "MixerOptions"]

ConvProj = Literal["separate", "shared", "per_kernel"]
CONV_PROJS: tuple[str, ...] = ("separate", "shared", "per_kernel")


@dataclass(frozen=True)
class MixerOptions:
    """How MUSE mixes tokens beside attention.

    Args:
        kernel_sizes: Distinct positive odd convolution kernel sizes, in tokens; None takes the conv type's
            default, ``(1, 3, 5)`` for static and ``(3, 15)`` for dynamic.
        conv_type: ``"static"``: learned depthwise kernels; ``"dynamic"``: per-token kernels predicted from the
            values, softmax-normalised per head; ``"none"``: no convolution (attention alone, with the same
            masking: the baseline of ablations and the attention twins).
        conv_proj: How the convolution output is projected. ``"separate"``: its own bias-free linear layer,
            added to the attention's projection (the official code's concatenated output projection);
            ``"shared"``: added to the attention output before the attention's projection (no extra weights or
            FLOPs); ``"per_kernel"``: one projection per kernel size (the seed's layout).
        conv_layout: ``"1d"``: convolve along the sequence; ``"2d"``: over the row-major patch grid after the
            prefix tokens, with ``k x k`` static kernels. None: the tokens' own layout (a sequence for
            ``MUSEAttention`` and the text and sequence networks, the patch grid in ``muse_vit_*`` models, the
            swapped attention's layout in ``swap_attention``).
    """

    kernel_sizes: tuple[int, ...] | None = None
    conv_type: ConvType = "static"
    conv_proj: ConvProj = "separate"
    conv_layout: ConvLayout | None = None

    def __post_init__(self) -> None:
        if self.kernel_sizes is not None:
            object.__setattr__(self, "kernel_sizes", check_kernel_sizes(self.kernel_sizes))
        for name, allowed in (("conv_type", CONV_TYPES), ("conv_proj", CONV_PROJS), ("conv_layout", CONV_LAYOUTS)):
            value = getattr(self, name)
            if value not in allowed and not (name == "conv_layout" and value is None):
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.conv_type == "dynamic" and self.conv_layout == "2d":
            raise ValueError("conv_layout='2d' needs conv_type='static'; dynamic kernels are 1-D")

    @classmethod
    def of(cls, value: MixerOptions | Mapping[str, Any]) -> MixerOptions:
        """``value`` itself, or the options a mapping of their fields names (as a config or a checkpoint's
        hyper-parameters hold them)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.names()))
            if unknown:
                raise TypeError(f"unknown mixer options {unknown}; the options are {cls.names()}")
            return cls(**value)
        raise TypeError(f"mixer must be a MixerOptions or a mapping of its fields {cls.names()}, got {value!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The options' names."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def layout_or(self, default: ConvLayout) -> ConvLayout:
        """``conv_layout``, or ``default`` (the tokens' own layout) where it is None."""
        return default if self.conv_layout is None else self.conv_layout

    def as_dict(self) -> dict[str, Any]:
        """The options as plain values (a list of kernel sizes), as a config or a checkpoint keeps them."""
        sizes = None if self.kernel_sizes is None else list(self.kernel_sizes)
        return {**dataclasses.asdict(self), "kernel_sizes": sizes}
