"""MUSE's convolution branch over an attention's value projection, and the taps that attach it to any attention.

``TokenConv`` is the branch's logic, shared by ``MUSEAttention`` and ``MUSEBranch``: it convolves
the value tokens over their layout (the sequence, or a row-major ``H x W`` grid after
``num_prefix_tokens`` attention-only tokens) and adds the result to the attention's output
projection. ``MUSEBranch`` carries that branch for an attention module it does not own:
``ValueTap`` (the attention's value ``nn.Linear``, class-swapped; ``ValueTapConv`` for a 1 x 1
convolution) hands it the values as the attention computes them, and ``BranchOutput`` (the
attention's output layer; ``BranchOutputConv``) adds the branch to the projection, so the
attention's own forward, state_dict keys and weights stay as they are.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._fx import is_tracing
from .conv import ConvLayout, ConvType, create_conv

__all__ = [
    "BranchOutput", "BranchOutputConv", "ConvProj", "MUSEBranch", "TokenConv", "TokenLayout", "ValueTap",
    "ValueTapConv", "key_padding_from_mask",
]

ConvProj = Literal["separate", "shared", "per_kernel"]
CONV_PROJS: tuple[str, ...] = ("separate", "shared", "per_kernel")


def square_side(num_tokens: int) -> int:
    """The side of the square grid of ``num_tokens`` tokens (a leaf in ``torch.fx`` graphs, computed at run time)."""
    return math.isqrt(num_tokens)


torch.fx.wrap("square_side")


def key_padding_from_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """Keys that an SDPA ``attn_mask`` (bool ``True`` = may attend, or additive float) blocks for every query
    of every head, ``(B or 1, N)``: padding, which the convolution must not read either."""
    blocked = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask <= torch.finfo(attn_mask.dtype).min / 2
    while blocked.dim() < 4:
        blocked = blocked.unsqueeze(0)
    return blocked.all(dim=-2).all(dim=1)


class TokenLayout(NamedTuple):
    """Where an attention's tokens sit: ``"1d"`` a sequence, ``"2d"`` a row-major ``grid_size`` grid,
    after ``num_prefix_tokens`` tokens (class, register, distillation) that the convolution skips;
    ``feature_map``: the attention's values and output are ``(B, H, W, C)`` maps, their grid."""

    layout: ConvLayout = "1d"
    num_prefix_tokens: int = 0
    grid_size: tuple[int, int] | None = None
    feature_map: bool = False


class TokenConv:
    """The convolution branch: ``conv`` over the value tokens, added to the attention's projection.

    Needs ``conv``, ``conv_proj``, ``conv_proj_mode``, ``conv_layout``, ``num_prefix_tokens``,
    ``grid_size`` and ``patch_indices`` on the module. ``patch_indices`` (``(B, K)``, set per call
    by ``MUSEVisionTransformer`` under patch dropout) are the kept patches' places in the grid: the
    convolution then reads each kept patch's real neighbours, the dropped ones reading as zero.
    """

    conv: nn.Module | None
    conv_proj: nn.Linear | None
    conv_proj_mode: str
    conv_layout: ConvLayout
    num_prefix_tokens: int
    grid_size: tuple[int, int] | None
    patch_indices: torch.Tensor | None

    def _conv_kwargs(self, seq_len: int, is_causal: bool, grid_size: tuple[int, int] | None) -> dict:
        """The convolution's arguments: ``is_causal`` for 1-D, the resolved ``grid_size`` for 2-D.

        The grid is ``grid_size`` if given, else the module's own, else a square inferred when the
        module has none; a grid that does not hold the tokens is an error, never a guess.
        """
        if is_tracing():  # FX: the module's grid (or the square one) and a non-causal convolution, no checks
            if self.conv_layout == "1d":
                return {"is_causal": False}
            if grid_size is None and self.grid_size is None and self.patch_indices is None:
                side = square_side(seq_len - self.num_prefix_tokens)
                return {"grid_size": (side, side)}
            return {"grid_size": grid_size or self.grid_size}
        num_tokens = seq_len - self.num_prefix_tokens
        if num_tokens < 1:
            raise ValueError(f"x has {seq_len} tokens, not more than num_prefix_tokens={self.num_prefix_tokens}")
        if self.patch_indices is not None:
            if self.patch_indices.shape[-1] != num_tokens or self.grid_size is None:
                raise ValueError(
                    f"patch_indices {tuple(self.patch_indices.shape)} must index the {num_tokens} kept patch tokens "
                    f"into the module's grid_size ({self.grid_size})"
                )
            return {"is_causal": is_causal} if self.conv_layout == "1d" else {"grid_size": self.grid_size}
        if self.conv_layout == "1d":
            return {"is_causal": is_causal}
        if is_causal:
            raise ValueError("is_causal=True is not defined for conv_layout='2d'")
        if grid_size is not None:
            if len(grid_size) != 2 or min(grid_size) < 1 or grid_size[0] * grid_size[1] != num_tokens:
                raise ValueError(
                    f"grid_size must be (H, W) of positive ints with H * W = {num_tokens} (tokens after "
                    f"{self.num_prefix_tokens} prefix tokens), got {tuple(grid_size)}"
                )
            return {"grid_size": (grid_size[0], grid_size[1])}
        if self.grid_size is not None:
            if self.grid_size[0] * self.grid_size[1] != num_tokens:
                raise ValueError(
                    f"{num_tokens} tokens (after {self.num_prefix_tokens} prefix tokens) do not fill the "
                    f"{self.grid_size[0]} x {self.grid_size[1]} token grid: pass grid_size=(H, W)"
                )
            return {"grid_size": self.grid_size}
        side = square_side(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"cannot infer the token grid of {num_tokens} tokens (after {self.num_prefix_tokens} prefix tokens): "
                "pass grid_size=(H, W)"
            )
        return {"grid_size": (side, side)}

    def _mix_conv(
            self,
            attn: torch.Tensor,
            values: torch.Tensor,
            proj: Callable[[torch.Tensor], torch.Tensor],
            key_padding_mask: torch.Tensor | None,
            conv_kwargs: dict,
            resize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``proj``-ected attention output ``attn`` plus the convolution branch on the shared ``values``
        (``resize`` takes the convolved values to the output's tokens when they sit on a coarser grid)."""
        if key_padding_mask is not None:
            values = values.masked_fill(key_padding_mask[..., None], 0.0)
        values = values[:, self.num_prefix_tokens:]
        indices = self.patch_indices
        if indices is not None:  # the kept patches back in their places, the dropped ones zero
            grid = self.grid_size
            index = indices[..., None].expand(-1, -1, values.shape[-1])
            values = values.new_zeros(values.shape[0], grid[0] * grid[1], values.shape[-1]).scatter(1, index, values)
        if self.conv_proj_mode == "per_kernel":
            conv = self.conv.forward_per_kernel(values, **conv_kwargs).flatten(2)
        else:
            conv = self.conv(values, **conv_kwargs)
        if indices is not None:
            conv = conv.gather(1, indices[..., None].expand(-1, -1, conv.shape[-1]))
        if resize is not None:
            conv = resize(conv)
        if self.num_prefix_tokens:
            conv = F.pad(conv, (0, 0, self.num_prefix_tokens, 0))  # prefix tokens: attention only
        if self.conv_proj_mode == "shared":
            return proj(attn + conv)
        return proj(attn) + self.conv_proj(conv)

    def _build_conv(
            self,
            value_dim: int,
            out_dim: int,
            num_heads: int,
            kernel_sizes: Sequence[int] | None,
            conv_type: ConvType,
            conv_proj: ConvProj,
            layout: TokenLayout,
            dd: dict,
    ) -> None:
        """Create ``conv`` and ``conv_proj`` and set the layout attributes."""
        if conv_proj not in CONV_PROJS:
            raise ValueError(f"conv_proj must be one of {CONV_PROJS}, got {conv_proj!r}")
        n = layout.num_prefix_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {n!r}")
        grid = layout.grid_size
        if grid is not None and (len(grid) != 2 or min(grid) < 1):
            raise ValueError(f"grid_size must be (H, W) of positive ints, got {grid!r}")
        self.conv_type = conv_type
        self.conv_proj_mode = conv_proj
        self.conv_layout = layout.layout
        self.num_prefix_tokens = n
        self.grid_size = None if grid is None else (int(grid[0]), int(grid[1]))
        self.patch_indices = None
        self.conv = create_conv(conv_type, value_dim, num_heads, kernel_sizes, layout.layout, **dd)
        self.kernel_sizes = self.conv.kernel_sizes if self.conv is not None else ()
        widths = {"separate": value_dim, "shared": 0, "per_kernel": value_dim * len(self.kernel_sizes)}
        width = widths[conv_proj] if self.conv is not None else 0
        self.conv_proj = nn.Linear(width, out_dim, bias=False, **dd) if width else None

    def silence(self) -> None:
        """Make the branch's output exactly zero (its projection, or with ``conv_proj="shared"`` its kernels)."""
        with torch.no_grad():
            if self.conv_proj is not None:
                self.conv_proj.weight.zero_()
            elif self.conv is not None:
                for w in self.conv.weight:
                    w.zero_()
                self.conv.bias.zero_()


class MUSEBranch(TokenConv, nn.Module):
    """MUSE's convolution branch attached to an attention module it does not own.

    The attention's value projection (a ``ValueTap``) hands over the values with ``stash``; its
    output projection (a ``BranchOutput``) calls the branch, which adds the convolution of those
    values. Built silent by ``swap_attention``.
    """

    def __init__(
            self,
            value_dim: int,
            out_dim: int,
            num_heads: int = 8,
            kernel_sizes: Sequence[int] | None = None,
            conv_type: ConvType = "static",
            conv_proj: ConvProj = "separate",
            layout: TokenLayout = TokenLayout(),
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            value_dim: Width of the values the attention computes.
            out_dim: Width of the attention's output projection.
            num_heads: Kernel heads of the dynamic convolution.
            kernel_sizes, conv_type, conv_proj: as ``MUSEAttention``.
            layout: The tokens' layout.
        """
        super().__init__()
        if conv_type == "none":
            raise ValueError("conv_type='none' gives no branch; use 'static' or 'dynamic'")
        self._build_conv(value_dim, out_dim, num_heads, kernel_sizes, conv_type, conv_proj, layout,
                         {"device": device, "dtype": dtype})
        self.feature_map = layout.feature_map
        self._values: torch.Tensor | None = None
        self._padding: torch.Tensor | None = None
        self._is_causal = False
        self._grids: tuple[tuple[int, int], tuple[int, int]] | None = None

    def see_grids(self, values_grid: Sequence[int], output_grid: Sequence[int]) -> None:
        """Take this call's grids where the values sit on another than the output (spatial-reduction attention,
        PVTv2 and Twins: coarser; pooling attention, MViTv2: finer): the values are convolved on theirs,
        then resized (nearest) to the output's."""
        self._grids = ((values_grid[0], values_grid[1]), (output_grid[0], output_grid[1]))  # no iteration: FX

    def see_masks(self, attn_mask: torch.Tensor | None, is_causal: bool) -> None:
        """Take this call's attention masks (by a mask-reading attention, e.g. ``MaskReadingAttention``): keys
        blocked for every query are padding, never read; ``is_causal`` makes the 1-D convolution causal."""
        if is_tracing():  # FX: the masks are graph inputs, not read by the convolution
            return
        self._padding = None if attn_mask is None else key_padding_from_mask(attn_mask)
        self._is_causal = is_causal

    def stash(self, values: torch.Tensor) -> None:
        """Keep the values of the attention's current call for its output projection."""
        self._values = values

    def forward(self, attn: torch.Tensor, proj: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``proj(attn)`` plus the convolution of the stashed values (tokens ``(..., N, C)``, or
        ``(B, H, W, C)`` maps with ``feature_map``)."""
        values, self._values = self._values, None
        if values is None:
            raise RuntimeError(
                "MUSEBranch was called without values: the attention's value projection did not run first "
                "in this call (an attention whose forward this adapter does not fit)"
            )
        grids, self._grids = self._grids, None
        if grids is not None:
            return self._mix_coarse(attn, values, proj, grids)
        if not is_tracing() and values.shape[:-1] != attn.shape[:-1]:
            raise RuntimeError(
                f"the attention's values {tuple(values.shape)} and output {tuple(attn.shape)} are not over the same "
                "tokens: the adapter does not fit this attention"
            )
        if self.feature_map:
            B, H, W, C = values.shape
            kwargs = self._conv_kwargs(H * W, False, (H, W)) if self.conv_layout == "2d" else {"is_causal": False}
            flat_proj = lambda t: proj(t.unflatten(1, (H, W))).flatten(1, 2)  # noqa: E731 (the projection sees maps)
            out = self._mix_conv(attn.flatten(1, 2), values.flatten(1, 2), flat_proj, None, kwargs)
            return out.unflatten(1, (H, W))
        # (..., N, C): leading dims (batch, and NesT's blocks) are all batch to the convolution.
        padding, self._padding = self._padding, None
        kwargs = self._conv_kwargs(values.shape[-2], self._is_causal, None)
        out = self._mix_conv(attn.flatten(0, -3), values.flatten(0, -3), proj, padding, kwargs)
        return out.unflatten(0, values.shape[:-2])

    def _mix_coarse(
            self,
            attn: torch.Tensor,
            values: torch.Tensor,
            proj: Callable[[torch.Tensor], torch.Tensor],
            grids: tuple[tuple[int, int], tuple[int, int]],
    ) -> torch.Tensor:
        """The branch over values on an ``h x w`` grid for an output on ``H x W`` (coarser or finer), each
        after the prefix tokens: convolved on theirs, then resized (nearest) to the output's."""
        (h, w), (H, W) = grids
        n = self.num_prefix_tokens
        if not is_tracing() and (values.shape[1] != n + h * w or attn.shape[1] != n + H * W):
            raise RuntimeError(
                f"values {tuple(values.shape)} and output {tuple(attn.shape)} do not fill the {h} x {w} and "
                f"{H} x {W} grids after {n} prefix tokens: the adapter does not fit this attention"
            )

        def resize(conv: torch.Tensor) -> torch.Tensor:
            maps = conv.unflatten(1, (h, w)).permute(0, 3, 1, 2)
            return F.interpolate(maps, size=(H, W), mode="nearest").flatten(2).transpose(1, 2)

        kwargs = self._conv_kwargs(n + h * w, False, (h, w)) if self.conv_layout == "2d" else {"is_causal": False}
        return self._mix_conv(attn, values, proj, None, kwargs, resize)

    def __prepare_scriptable__(self) -> nn.Module:
        raise NotImplementedError(_NO_SCRIPT)


_NO_SCRIPT = (
    "MUSE does not support torch.jit.script: its convolution branch resolves the token layout in Python "
    "(and a swapped attention hands its values over by attribute), which TorchScript cannot compile; "
    "use torch.compile or torch.export instead"
)


class ValueTap(nn.Linear):
    """An attention's value-producing ``nn.Linear`` that also hands the values to its ``MUSEBranch``.

    The output channels are ``groups`` equal groups (1, or one per head where a head's q, k and v
    sit side by side) and each group's channels from ``offset`` on are values: the last third of a
    fused ``qkv``, or all of a ``v_proj``. Made by ``attach``, which swaps the class of the layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        groups, offset = self.__dict__["muse_value_split"]
        values = out[..., offset:] if groups == 1 else out.unflatten(-1, (groups, -1))[..., offset:].flatten(-2)
        self.__dict__["muse_branch"].stash(values)
        return out


class BranchOutput(nn.Linear):
    """An attention's output ``nn.Linear`` that adds its ``MUSEBranch`` to the projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__["muse_branch"](x, super().forward)


class ValueTapConv(nn.Conv2d):
    """``ValueTap`` for a 1 x 1 ``nn.Conv2d`` over ``(B, C, H, W)`` maps (CoAtNet, Visformer): the values,
    split along the channels, go to the branch as a ``(B, H, W, C)`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        groups, offset = self.__dict__["muse_value_split"]
        values = out[:, offset:] if groups == 1 else out.unflatten(1, (groups, -1))[:, :, offset:].flatten(1, 2)
        self.__dict__["muse_branch"].stash(values.permute(0, 2, 3, 1))
        return out


class BranchOutputConv(nn.Conv2d):
    """``BranchOutput`` for a 1 x 1 ``nn.Conv2d`` output projection over ``(B, C, H, W)`` maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = super().forward
        out = self.__dict__["muse_branch"](
            x.permute(0, 2, 3, 1), lambda t: conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1),
        )
        return out.permute(0, 3, 1, 2)


_TAPS: dict[type[nn.Module], tuple[type[nn.Module], type[nn.Module]]] = {
    nn.Linear: (ValueTap, BranchOutput), nn.Conv2d: (ValueTapConv, BranchOutputConv),
}


def is_tappable(layer: nn.Module | None) -> bool:
    """A plain ``nn.Linear``, or a 1 x 1 ``nn.Conv2d`` (stride 1, ungrouped): the layers MUSE taps."""
    if type(layer) is nn.Conv2d:
        return layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.groups == 1
    return type(layer) is nn.Linear


def widths(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` channels of a tappable layer."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


def attach(value: nn.Module, split: tuple[int, int], output: nn.Module, branch: MUSEBranch) -> None:
    """Turn ``value`` into a value tap (values: ``split = (groups, offset)``, see ``ValueTap``) and
    ``output`` into a branch output feeding ``branch``; both tappable layers of one kind.

    The layers keep their weights and state_dict keys; ``branch`` is referenced, not registered,
    so it is registered once, on the attention.
    """
    for layer, role in ((value, 0), (output, 1)):
        if not is_tappable(layer):
            raise TypeError(f"MUSE taps a plain nn.Linear or a 1 x 1 nn.Conv2d, got {layer!r}")
        layer.__class__ = _TAPS[type(layer)][role]
        layer.__dict__["muse_branch"] = branch
    value.__dict__["muse_value_split"] = split
