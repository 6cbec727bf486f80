"""MUSE's convolution branch over an attention's value projection.

``TokenConv`` is the branch's logic, shared by ``MUSEAttention`` and ``MUSEBranch``: it convolves
the value tokens over their layout (the sequence, or a row-major ``H x W`` grid after
``num_prefix_tokens`` attention-only tokens) and adds the result to the attention's output
projection. ``MUSEBranch`` carries that branch for an attention module it does not own; the taps
(``muse_lightning.taps``) hand it the attention's values and add it to the attention's output.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._fx import is_tracing
from .conv import ConvLayout, create_conv, grid_tokens, with_prefix
from .options import MixerOptions

__all__ = [
    "CallLayout", "MUSEBranch", "TokenConv", "TokenLayout", "key_padding_from_mask", "masks_layout",
    "resize_grid",
]

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


class CallLayout(NamedTuple):
    """Where one call's tokens sit, as the attention (or its model) knows it; handed to a ``MUSEBranch`` with
    ``see`` during the call and used by that call's output alone.

    ``values_grid`` / ``output_grid``: the grids, after the prefix tokens, the values are convolved on and the
    output sits on (coarser in spatial-reduction attention, finer in query pooling: ``resize_grid``; None: the
    branch's own layout); ``windowed``: the values arrive as the windows ``(B, h, w, ws, ws, C)`` of the
    zero-padded ``values_grid`` (Twins' locally grouped attention); ``key_padding`` ``(B, N)``: keys never read;
    ``is_causal``: a causal 1-D convolution.
    """

    values_grid: tuple[int, int] | None = None
    output_grid: tuple[int, int] | None = None
    windowed: bool = False
    key_padding: torch.Tensor | None = None
    is_causal: bool = False


def masks_layout(attn_mask: torch.Tensor | None, is_causal: bool) -> CallLayout:
    """The layout an attention's SDPA masks give (bool ``True`` = may attend, or additive float): the keys blocked
    for every query are padding; under ``torch.fx`` none (the masks are graph inputs the convolution does not read)."""
    if is_tracing() or (attn_mask is None and not is_causal):
        return CallLayout()
    return CallLayout(key_padding=None if attn_mask is None else key_padding_from_mask(attn_mask), is_causal=is_causal)


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
        (``resize`` takes the convolved values to the output's tokens when they sit on another grid). The
        convolution itself zeroes the padding and skips the prefix tokens (inside its kernel on the Triton
        backend), unless the values must first be scattered to their grid or the output resized."""
        convolve = self.conv.forward_per_kernel if self.conv_proj_mode == "per_kernel" else self.conv
        indices = self.patch_indices
        if indices is None and resize is None:
            conv = convolve(values, key_padding_mask=key_padding_mask, num_prefix_tokens=self.num_prefix_tokens,
                            **conv_kwargs).flatten(2)
        else:
            values = grid_tokens(values, key_padding_mask, self.num_prefix_tokens)
            if indices is not None:  # the kept patches back in their places, the dropped ones zero
                grid = self.grid_size
                index = indices[..., None].expand(-1, -1, values.shape[-1])
                values = values.new_zeros(values.shape[0], grid[0] * grid[1], values.shape[-1]).scatter(1, index, values)
            conv = convolve(values, **conv_kwargs).flatten(2)
            if indices is not None:
                conv = conv.gather(1, indices[..., None].expand(-1, -1, conv.shape[-1]))
            if resize is not None:
                conv = resize(conv)
            conv = with_prefix(conv, self.num_prefix_tokens)
        if self.conv_proj_mode == "shared":
            return proj(attn + conv)
        return proj(attn) + self.conv_proj(conv)

    def _build_conv(
            self,
            value_dim: int,
            out_dim: int,
            num_heads: int,
            mixer: MixerOptions,
            layout: TokenLayout,
            dd: dict,
    ) -> None:
        """Create ``conv`` and ``conv_proj`` and set the layout attributes (``layout.layout`` the one convolved)."""
        n = layout.num_prefix_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {n!r}")
        grid = layout.grid_size
        if grid is not None and (len(grid) != 2 or min(grid) < 1):
            raise ValueError(f"grid_size must be (H, W) of positive ints, got {grid!r}")
        self.conv_type = mixer.conv_type
        self.conv_proj_mode = mixer.conv_proj
        self.conv_layout = layout.layout
        self.num_prefix_tokens = n
        self.grid_size = None if grid is None else (int(grid[0]), int(grid[1]))
        self.patch_indices = None
        self.conv = create_conv(mixer.conv_type, value_dim, num_heads, mixer.kernel_sizes, layout.layout, **dd)
        self.kernel_sizes = self.conv.kernel_sizes if self.conv is not None else ()
        widths = {"separate": value_dim, "shared": 0, "per_kernel": value_dim * len(self.kernel_sizes)}
        width = widths[mixer.conv_proj] if self.conv is not None else 0
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

    The attention's value layers (value taps, ``muse_lightning.taps``) hand over the values with ``stash``,
    and an attention that knows this call's layout hands it over with ``see``; its output layer calls the
    branch, which adds the convolution of those values. Built silent by ``swap_attention``.
    """

    def __init__(
            self,
            value_dim: int,
            out_dim: int,
            num_heads: int = 8,
            mixer: MixerOptions = MixerOptions(),
            layout: TokenLayout = TokenLayout(),
            num_value_parts: int = 1,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            value_dim: Width of the values the attention computes.
            out_dim: Width of the attention's output projection.
            num_heads: Kernel heads of the dynamic convolution.
            mixer: The convolution's options (its ``conv_layout``, where given, replaces ``layout.layout``).
            layout: The tokens' layout.
            num_value_parts: Value layers whose values are joined (one per head in EfficientViT-MSRA).
        """
        super().__init__()
        mixer = MixerOptions.of(mixer)
        if mixer.conv_type == "none":
            raise ValueError("conv_type='none' gives no branch; use 'static' or 'dynamic'")
        self._build_conv(value_dim, out_dim, num_heads, mixer, layout._replace(layout=mixer.layout_or(layout.layout)),
                         {"device": device, "dtype": dtype})
        self.feature_map = layout.feature_map
        self._values: list[torch.Tensor | None] = [None] * num_value_parts
        self._call = CallLayout()
        self.order_grids: tuple[tuple[int, int], tuple[int, int]] | None = None
        self.register_buffer("values_at", None, persistent=False)
        self.register_buffer("output_places", None, persistent=False)

    def follow_token_order(
            self,
            values_grid: Sequence[int],
            output_grid: Sequence[int],
            values_at: torch.Tensor,
            output_places: torch.Tensor,
    ) -> None:
        """Tokens that are not row-major (Hiera's unrolled mask units): the value token at each place of the
        row-major ``values_grid`` is ``values_at[place]``; output token ``j`` sits at ``output_places[j]`` of
        ``output_grid``. The values are put in row-major order, convolved, taken to the output's grid
        (``resize_grid``) and put in the output's order."""
        sizes = (values_grid[0] * values_grid[1], output_grid[0] * output_grid[1])
        if (values_at.numel(), output_places.numel()) != sizes:
            raise ValueError("values_at and output_places must hold one index per place of their grids")
        self.order_grids = ((int(values_grid[0]), int(values_grid[1])), (int(output_grid[0]), int(output_grid[1])))
        self.values_at, self.output_places = values_at.long(), output_places.long()

    def see(self, layout: CallLayout) -> None:
        """Take this call's layout, from the attention that knows it (see ``CallLayout``)."""
        values, output = (None if g is None else (g[0], g[1]) for g in (layout.values_grid, layout.output_grid))
        self._call = layout._replace(values_grid=values, output_grid=values if output is None else output)  # FX: indexed

    def stash(self, values: torch.Tensor, part: int = 0) -> None:
        """Keep the values (value layer ``part``'s) of the attention's current call for its output layer."""
        self._values[part] = values

    def _take_values(self) -> torch.Tensor:
        parts, self._values = self._values, [None] * len(self._values)
        if any(p is None for p in parts):
            raise RuntimeError(
                "MUSEBranch was called without values: the attention's value projection did not run first "
                "in this call (an attention whose forward this adapter does not fit)"
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(self, attn: torch.Tensor, proj: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``proj(attn)`` plus the convolution of the stashed values (tokens ``(..., N, C)``, or
        ``(B, H, W, C)`` maps with ``feature_map``)."""
        values = self._take_values()
        layout, self._call = self._call, CallLayout()
        if self.values_at is not None:
            if not is_tracing() and values.shape[1] != self.values_at.numel():
                raise RuntimeError(
                    f"values of {values.shape[1]} tokens, but this branch follows a fixed order of "
                    f"{self.values_at.numel()} (Hiera's unrolled tokens; masked inputs are not supported)"
                )
            return self._mix_grids(attn, values[:, self.values_at], proj, self.order_grids, self.output_places)
        if layout.windowed:
            values = _unpartition(values, layout.values_grid)
        if self.feature_map:  # the maps carry their grids
            (h, w), (H, W) = values.shape[1:3], attn.shape[1:3]
            flat_proj = lambda t: proj(t.unflatten(1, (H, W))).flatten(1, 2)  # the projection sees maps
            out = self._mix_grids(attn.flatten(1, 2), values.flatten(1, 2), flat_proj, ((h, w), (H, W)))
            return out.unflatten(1, (H, W))
        if layout.values_grid is not None:
            return self._mix_grids(attn, values, proj, (layout.values_grid, layout.output_grid))
        if not is_tracing() and values.shape[:-1] != attn.shape[:-1]:
            raise RuntimeError(
                f"the attention's values {tuple(values.shape)} and output {tuple(attn.shape)} are not over the same "
                "tokens: the adapter does not fit this attention"
            )
        # (..., N, C): leading dims (batch, and NesT's blocks) are all batch to the convolution.
        kwargs = self._conv_kwargs(values.shape[-2], layout.is_causal, None)
        out = self._mix_conv(attn.flatten(0, -3), values.flatten(0, -3), proj, layout.key_padding, kwargs)
        return out.unflatten(0, values.shape[:-2])

    def _mix_grids(
            self,
            attn: torch.Tensor,
            values: torch.Tensor,
            proj: Callable[[torch.Tensor], torch.Tensor],
            grids: tuple[tuple[int, int], tuple[int, int]],
            output_places: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The branch over values on an ``h x w`` grid for an output on ``H x W``, each after the prefix
        tokens: convolved on theirs, then taken to the output's (``resize_grid``; then to the places of
        the output tokens, ``output_places``, if they are not row-major)."""
        (h, w), (H, W) = grids
        n = self.num_prefix_tokens
        if not is_tracing() and (values.shape[1] != n + h * w or attn.shape[1] != n + H * W):
            raise RuntimeError(
                f"values {tuple(values.shape)} and output {tuple(attn.shape)} do not fill the {h} x {w} and "
                f"{H} x {W} grids after {n} prefix tokens: the adapter does not fit this attention"
            )
        kwargs = self._conv_kwargs(n + h * w, False, (h, w)) if self.conv_layout == "2d" else {"is_causal": False}

        def resize(conv: torch.Tensor) -> torch.Tensor:
            conv = resize_grid(conv, h, w, H, W)
            return conv if output_places is None else conv[:, output_places]

        same = output_places is None and not is_tracing() and (h, w) == (H, W)  # the convolution's own grid route
        return self._mix_conv(attn, values, proj, None, kwargs, None if same else resize)

    def __prepare_scriptable__(self) -> nn.Module:
        raise NotImplementedError(_NO_SCRIPT)


def resize_grid(tokens: torch.Tensor, h: int, w: int, H: int, W: int) -> torch.Tensor:
    """``tokens (B, h * w, C)`` of an ``h x w`` grid taken to an ``H x W`` grid (a leaf in ``torch.fx`` graphs).

    A coarser output (pooled or strided queries: MViTv2, SAM2-Hiera, LeViT, EfficientFormer v2) takes the
    token where each output token's window starts, every ``round(h / H)``-th; a finer one (spatial reduction:
    PVTv2, Twins, MobileNetV4, NextViT) repeats each token over the output tokens it covers (nearest).
    """
    if h == H and w == W:
        return tokens
    maps = tokens.unflatten(1, (h, w))
    if H <= h and W <= w:
        picked = maps[:, :: max(round(h / H), 1), :: max(round(w / W), 1)][:, :H, :W]
        if picked.shape[1] == H and picked.shape[2] == W:
            return picked.flatten(1, 2)
    maps = F.interpolate(maps.permute(0, 3, 1, 2), size=(H, W), mode="nearest")
    return maps.flatten(2).transpose(1, 2)


torch.fx.wrap("resize_grid")


def _unpartition(windows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Windows ``(B, h, w, ws, ws, C)`` of a zero-padded grid back to the ``grid``'s tokens ``(B, H * W, C)``."""
    B, h, w, ws, _, C = windows.shape
    maps = windows.transpose(2, 3).reshape(B, h * ws, w * ws, C)
    return maps[:, : grid[0], : grid[1]].flatten(1, 2)


_NO_SCRIPT = (
    "MUSE does not support torch.jit.script: its convolution branch resolves the token layout in Python "
    "(and a swapped attention hands its values over by attribute), which TorchScript cannot compile; "
    "use torch.compile or torch.export instead"
)
