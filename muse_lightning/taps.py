"""The taps that attach a ``MUSEBranch`` to an attention module it does not own.

The attention's value layers are class-swapped to value taps (``tap_class``: any pointwise layer, an
``nn.Linear`` or a 1 x 1 convolution with its norm), which hand the branch the values as the attention
computes them; its output layer, swapped likewise, adds the branch to the projection (or, not pointwise,
joins it at its input). The attention's own forward, state_dict keys and weights stay as they are.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from .branch import MUSEBranch

__all__ = ["Split", "attach", "tap_class", "tap_role", "widths"]


Split = tuple[int, slice]  # (groups, channels of each group that are values)


def _value_channels(out: torch.Tensor, split: Split, maps: bool) -> torch.Tensor:
    """The value channels of a value layer's output ``out`` (channels last, or ``(B, C, H, W)`` ``maps``):
    ``groups`` equal groups (1, or one per head where a head's q, k and v sit side by side), each group's
    ``slice`` of channels."""
    groups, channels = split
    if maps:
        return out[:, channels] if groups == 1 else out.unflatten(1, (groups, -1))[:, :, channels].flatten(1, 2)
    return out[..., channels] if groups == 1 else out.unflatten(-1, (groups, -1))[..., channels].flatten(-2)


class _Tap:
    """What the taps share: the tapped layer's class (``_muse_base``), whether it works on ``(B, C, H, W)``
    maps (``_muse_maps``), and pickling by that class (the tap classes are made per class by ``tap_class``)."""

    _muse_base: type[nn.Module]
    _muse_role: str
    _muse_maps: bool

    def __reduce_ex__(self, protocol: int):  # pickle and deepcopy rebuild the tap class from its parts
        return _new_tap, (self._muse_base, self._muse_role, self._muse_maps), self.__dict__


class _ValueTap(_Tap):
    """A value-producing layer that also hands its values (split by ``muse_value_split``) to its branch; maps
    go as ``(B, H, W, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        split, part = self.__dict__["muse_value_split"], self.__dict__["muse_value_part"]
        values = _value_channels(out, split, self._muse_maps)
        self.__dict__["muse_branch"].stash(values.permute(0, 2, 3, 1) if self._muse_maps else values, part)
        return out


class _BranchOutput(_Tap):
    """An attention's output layer that adds its branch to the projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.__dict__["muse_branch"]
        if not self._muse_maps:
            return branch(x, super().forward)
        layer = super().forward
        out = branch(x.permute(0, 2, 3, 1), lambda t: layer(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return out.permute(0, 3, 1, 2)


class _BranchInput(_Tap):
    """An attention's output layer that is not pointwise (LowFormer's upsampling transposed convolution): the
    branch is added to its input, in the attention's value space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = self.__dict__["muse_branch"](x.permute(0, 2, 3, 1), lambda t: t)
        return super().forward(joined.permute(0, 3, 1, 2))


_ROLES: dict[str, type[_Tap]] = {"value": _ValueTap, "output": _BranchOutput, "input": _BranchInput}


@functools.cache
def tap_class(base: type[nn.Module], role: str, maps: bool) -> type[nn.Module]:
    """The class a layer of class ``base`` becomes to play ``role`` (``"value"``, ``"output"``, ``"input"``)."""
    mixin = _ROLES[role]
    return type(f"{mixin.__name__.lstrip('_')}{base.__name__}", (mixin, base),
                {"_muse_base": base, "_muse_role": role, "_muse_maps": maps, "__module__": __name__})


def _new_tap(base: type[nn.Module], role: str, maps: bool) -> nn.Module:
    cls = tap_class(base, role, maps)
    return cls.__new__(cls)


def _elementwise(layer: nn.Module) -> bool:
    """A norm, activation, dropout or identity: what a pointwise layer may hold beside its projection."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Identity, nn.Dropout)
    return isinstance(layer, norms) or type(layer).__module__ == "torch.nn.modules.activation"


def _core(layer: nn.Module | None) -> nn.Module | None:
    """The projection of a pointwise layer: a plain ``nn.Linear``, a 1 x 1 ``nn.Conv2d`` (stride 1, ungrouped),
    or a module holding exactly one of them and only norms and activations beside it (LeViT's ``LinearNorm``,
    the ``ConvNorm`` layers, ``Sequential(act, ConvNorm)``, Gemma4's ``Gemma4ClippableLinear``)."""
    if layer is None:
        return None
    if type(layer) is nn.Linear:
        return layer
    if type(layer) is nn.Conv2d:
        return layer if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.groups == 1 else None
    leaves = [m for m in layer.modules() if next(m.children(), None) is None and m is not layer]
    cores = [m for m in leaves if type(m) in (nn.Linear, nn.Conv2d)]
    if len(cores) != 1 or _core(cores[0]) is None or not all(m is cores[0] or _elementwise(m) for m in leaves):
        return None
    return cores[0]


def tap_role(layer: nn.Module | None, output: bool) -> str | None:
    """How ``layer`` can be tapped: ``"value"`` (values) or ``"output"`` (a pointwise layer, the branch added to
    its projection), ``"input"`` (an output layer over ``(B, C, H, W)`` maps that is not pointwise, the branch
    added to its input: an upsampling ``nn.ConvTranspose2d``, or the pooling or identity an attention without
    output projection ends in); None: not."""
    if _core(layer) is not None:
        return "output" if output else "value"
    return "input" if output and type(layer) in (nn.ConvTranspose2d, nn.AvgPool2d, nn.Identity) else None


def widths(layer: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` channels of a tappable layer (None: a pooling or identity, as wide as what it is given)."""
    core = _core(layer) or layer
    if isinstance(core, nn.Linear):
        return core.in_features, core.out_features
    return (core.in_channels, core.out_channels) if hasattr(core, "in_channels") else None


def _on_maps(layer: nn.Module) -> bool:
    return not isinstance(_core(layer), nn.Linear)


def attach(values: Sequence[nn.Module], split: Split, output: nn.Module, branch: MUSEBranch) -> None:
    """Turn ``values`` (the value layers, one or several whose values are joined in order) into value taps
    (values: ``split``, see ``_value_channels``) and ``output`` into the layer feeding ``branch``.

    The layers keep their weights and state_dict keys; ``branch`` is referenced, not registered,
    so it is registered once, on the attention.
    """
    roles = [(layer, tap_role(layer, False)) for layer in values] + [(output, tap_role(output, True))]
    for layer, role in roles:
        if role is None:
            raise TypeError(f"MUSE taps a pointwise layer (nn.Linear, 1 x 1 nn.Conv2d, with its norm), got {layer!r}")
    for part, (layer, role) in enumerate(roles):
        layer.__class__ = tap_class(type(layer), role, _on_maps(layer))
        layer.__dict__["muse_branch"] = branch
        layer.__dict__["muse_value_split"] = split
        layer.__dict__["muse_value_part"] = part
