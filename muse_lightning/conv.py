"""Multi-scale token convolutions for the MUSE convolution branch.

Both modules map value tokens ``(B, N, C)`` to ``(B, N, C)`` and weigh their kernel sizes with a
softmax gate that is an ordinary, trained parameter. The gated sum of kernels is linear, so it is
collapsed into one kernel of the largest size before it touches the tokens: one depthwise pass
whatever the number of kernel sizes.

Tap layout: without ``is_causal`` a kernel of size ``k`` is centred on the output token; with
``is_causal`` its last tap sits on the output token (as in fairseq's decoder convolutions), so the
output at ``t`` reads tokens ``t - k + 1 .. t`` only. Tokens outside the sequence read as zero.

Static kernels also come in a 2-D layout (``layout="2d"``): the tokens are a row-major ``H x W``
grid (image patches) and each kernel size ``k`` is a ``k x k`` depthwise kernel over that grid.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._fx import is_tracing

__all__ = [
    "ConvLayout", "ConvType", "MultiScaleDepthwiseConv", "MultiScaleDynamicConv", "check_kernel_sizes", "create_conv",
    "grid_tokens", "with_prefix",
]

ConvType = Literal["static", "dynamic", "none"]
CONV_TYPES: tuple[str, ...] = ("static", "dynamic", "none")
ConvLayout = Literal["1d", "2d"]
CONV_LAYOUTS: tuple[str, ...] = ("1d", "2d")
DEFAULT_KERNEL_SIZES: dict[str, tuple[int, ...]] = {"static": (1, 3, 5), "dynamic": (3, 15)}
# The convolutions' backend: "torch" (PyTorch's depthwise convolution and ``_DynamicConv``, the default) or "triton"
# (``muse_lightning.triton_conv``, on CUDA tensors or under TRITON_INTERPRET=1; not yet measured on a GPU).
CONV_BACKEND = os.environ.get("MUSE_CONV_BACKEND", "torch")
if CONV_BACKEND not in ("torch", "triton"):
    raise ValueError(f"MUSE_CONV_BACKEND must be 'torch' or 'triton', got {CONV_BACKEND!r}")
if CONV_BACKEND == "triton":
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise ImportError("MUSE_CONV_BACKEND=triton needs triton (PyPI's torch wheels for Linux ship it), or leave "
                          "MUSE_CONV_BACKEND unset for PyTorch's convolution") from error


def check_kernel_sizes(kernel_sizes: Sequence[int]) -> tuple[int, ...]:
    """Return ``kernel_sizes`` as a tuple, or raise if they are not distinct positive odd ints."""
    if isinstance(kernel_sizes, (str, bytes)) or not isinstance(kernel_sizes, Sequence):
        raise TypeError(f"kernel_sizes must be a sequence of ints, got {type(kernel_sizes).__name__}")
    sizes = tuple(kernel_sizes)
    bad = [k for k in sizes if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0]
    if not sizes or bad:
        raise ValueError(f"kernel_sizes must be a non-empty sequence of positive odd ints, got {kernel_sizes!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"kernel_sizes must be distinct, got {kernel_sizes!r}")
    return sizes


def _tap_padding(size: int, width: int, is_causal: bool) -> tuple[int, int]:
    """Zero taps (left, right) that place a ``size`` kernel inside a ``width`` kernel."""
    extra = width - size
    return (extra, 0) if is_causal else (extra // 2, extra // 2)


def _gate_weights(gate: torch.Tensor | None) -> torch.Tensor | None:
    """The kernel sizes' weights, ``softmax(gate)`` (``None`` for a single kernel size, which has no gate)."""
    return None if gate is None else gate.softmax(0)


def _gated_kernel(
        kernels: Sequence[torch.Tensor],
        sizes: Sequence[int],
        weights: torch.Tensor | None,
        is_causal: bool,
        spatial_dims: int = 1,
) -> torch.Tensor:
    """Collapse kernels ``(..., k_i)`` (or ``(..., k_i, k_i)``) weighted by the gate's ``weights`` into one
    kernel of the largest size: the smaller ones zero-padded and stacked, then one vector-matrix product (a few
    kernel launches, not a multiply and an add per size)."""
    if weights is None:
        return kernels[0]
    width = max(sizes)
    padded = [
        k if size == width else F.pad(k, _tap_padding(size, width, is_causal) * spatial_dims)
        for k, size in zip(kernels, sizes)
    ]
    stacked = torch.stack(padded)
    dtype = torch.promote_types(weights.dtype, stacked.dtype)  # as a product would (bf16 kernels under autocast)
    return torch.tensordot(weights.to(dtype), stacked.to(dtype), dims=1)


def _token_padding(width: int, is_causal: bool) -> tuple[int, int]:
    """Zero tokens (before, after) the sequence that a ``width`` kernel reads."""
    return (width - 1, 0) if is_causal else (width // 2, width // 2)


def _pad_tokens(x: torch.Tensor, before: int, after: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` ``(B, N, H, D)`` with ``before`` and ``after`` zero tokens, contiguous, in ``dtype`` (one copy, the cast
    in it; only the padding is zeroed, where ``F.pad`` fills the whole tensor first)."""
    B, N, H, D = x.shape
    out = x.new_empty(B, before + N + after, H, D, dtype=dtype)
    for pad in (out[:, :before], out[:, before + N:]):
        if pad.numel():
            pad.zero_()
    out[:, before:before + N].copy_(x)
    return out


class _DynamicConv(torch.autograd.Function):
    """``out[n] = sum_j x[n + j] * kernel[n, j]`` for tokens ``v`` ``(B, N, H, D)`` and per-token kernels
    ``kernel`` ``(B, N, H, W)``, ``x`` the tokens after ``before`` and ``W - 1 - before`` zero tokens.

    Each pass is one batched matrix product over the zero-padded sequences laid end to end (``_windows``): forward,
    each token's kernel row times the ``W`` tokens from it (``_window_sums``); the input gradient the same sum over
    the padded gradient, each window's taps read along an anti-diagonal of the padded kernels; the kernel gradient,
    each token's gradient times its ``W`` tokens (``_window_products``). A multiply-add a tap would pass over the
    whole output ``W`` times each way, and autograd's graph of that sum also spends a zero-filled gradient buffer, a
    copy and an add on every tap's slice of the tokens. It computes in the inputs' promoted dtype, autocast or not
    (as the Triton backend's ``dynamic_conv``), and its backward is differentiable (it reads the saved inputs, not
    the padded copy).
    """

    # torch.func's vmap (and so its per-sample gradients) runs it over a batch.
    generate_vmap_rule = True

    @staticmethod
    def forward(v: torch.Tensor, kernel: torch.Tensor, before: int) -> torch.Tensor:
        dtype = torch.promote_types(v.dtype, kernel.dtype)
        _, N, H, W = kernel.shape
        x = _pad_tokens(v, before, W - 1 - before, dtype)
        # Each token's kernel row where its window starts, the sequences laid end to end.
        rows = _pad_tokens(kernel, 0, W - 1, dtype).reshape(-1, H, W)[:_num_windows(x, W)]
        return _window_sums(rows, x, N)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        v, kernel, ctx.before = inputs
        ctx.save_for_backward(v, kernel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        v, kernel = ctx.saved_tensors
        dtype = torch.promote_types(grad.dtype, kernel.dtype)
        _, N, H, W = kernel.shape
        after = W - 1 - ctx.before
        # d v[t] = sum_i g[t + i] * k[t + i, W - 1 - i], g the gradient and k the kernels after `after` zero tokens
        # and before `before`: the forward's sum over the padded gradient, each window's taps read along an
        # anti-diagonal of the padded kernels (rows that run past a sequence read the next one's: left out).
        g = _pad_tokens(grad, after, ctx.before, dtype)
        k = _pad_tokens(kernel, after, ctx.before, dtype)
        rows = k.as_strided((_num_windows(g, W), H, W), (H * W, W, H * W - 1), W - 1).contiguous()  # for BLAS
        grad_v = _window_sums(rows, g, N)
        x = _pad_tokens(v, ctx.before, after, dtype)
        return grad_v.to(v.dtype), _window_products(x, g, after, N).to(kernel.dtype), None


def _num_windows(x: torch.Tensor, W: int) -> int:
    """How many ``W``-token windows ``x`` ``(B, P, H, D)`` has, the sequences laid end to end (none if empty)."""
    return max(x.shape[0] * x.shape[1] - (W - 1), 0)


def _windows(x: torch.Tensor, W: int) -> torch.Tensor:
    """The ``W`` tokens from each token of ``x`` ``(B, P, H, D)``, the sequences laid end to end, up to the last
    whole window: ``(T * H, W, D)`` (``T = _num_windows(x, W)``), an overlapping strided view (no copy). The few
    windows that straddle two sequences are computed and left out of the outputs kept."""
    _, _, H, D = x.shape
    return x.contiguous().as_strided((_num_windows(x, W) * H, W, D), (D, H * D, 1))


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm`` in the operands' dtype: autocast would cast the overlapping windows to its own, a copy of each
    token ``W`` times."""
    if not torch.amp.is_autocast_available(a.device.type):  # no autocast to leave (meta tensors: FLOP counting)
        return torch.bmm(a, b)
    with torch.autocast(a.device.type, enabled=False):
        return torch.bmm(a, b)


def _window_sums(rows: torch.Tensor, x: torch.Tensor, N: int) -> torch.Tensor:
    """``out[b, n, h] = sum_j rows[b * P + n, h, j] * x[b, n + j, h]`` for ``n < N``, ``rows`` ``(T, H, W)`` and
    ``x`` ``(B, P, H, D)``: one batched product of each window's row with its tokens."""
    B, P, H, D = x.shape
    T, _, W = rows.shape
    if not x.numel():
        return x.new_zeros(B, N, H, D)
    out = _bmm(rows.reshape(T * H, 1, W), _windows(x, W))
    return out.as_strided((B, N, H, D), (P * H * D, H * D, D, 1))


def _window_products(x: torch.Tensor, g: torch.Tensor, start: int, N: int) -> torch.Tensor:
    """``out[b, n, h, j] = <x[b, n + j, h], g[b, start + n, h]>`` over ``D`` for ``n < N``, ``x`` and ``g``
    ``(B, N + W - 1, H, D)``: one batched matrix product of each token's ``g`` with the ``W`` tokens of ``x`` from
    it (``_windows``)."""
    B, P, H, D = x.shape
    W = P - N + 1
    if not g.numel():
        return g.new_zeros(B, N, H, W)
    T = _num_windows(x, W)
    grads = g.reshape(B * P, H, D)[start:start + T].reshape(T * H, 1, D)
    return _bmm(grads, _windows(x, W).transpose(1, 2)).as_strided((B, N, H, W), (P * H * W, H * W, W, 1))


def _dynamic_conv(v: torch.Tensor, kernel: torch.Tensor, before: int) -> torch.Tensor:
    """``_DynamicConv``, one node of a ``torch.fx`` graph (whose proxies cannot run an autograd Function)."""
    return _DynamicConv.apply(v, kernel, before)


torch.fx.wrap("_dynamic_conv")


class _WideDepthwiseConv2d(torch.autograd.Function):
    """``F.conv2d(x, kernel, bias, padding=k // 2, groups=C)`` for channels-last ``x (B, C, H, W)`` and a ``kernel
    (C, 1, k, k)`` more than 3 wide, with its kernel gradient in pieces that oneDNN's depthwise kernel takes: that
    kernel takes a kernel gradient up to 3 wide (any height), and a wider one falls to oneDNN's generic grouped
    path, several times slower. The middle
    three columns are one convolution backward over the tokens and the gradient as they are, which gives the bias
    gradient too; each other column, which reads the tokens at one offset along the rows, is one more over the
    gradient shifted by that offset (a copy of it each); the forward and the input gradient are PyTorch's. The
    backward is differentiable, and reads ``ctx.saved_tensors`` once (activation checkpointing allows no more).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, kernel, bias, padding=kernel.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, kernel, bias = inputs
        ctx.save_for_backward(x, kernel)
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        x, kernel = ctx.saved_tensors
        (C, k), dtypes = (x.shape[1], kernel.shape[-1]), (x.dtype, kernel.dtype)
        p = k // 2
        # As autocast ran the forward; dense, or each of the convolutions below would copy them (the tokens after
        # prefix tokens, and their gradient, are a slice).
        x, kernel = x.to(grad.dtype).contiguous(memory_format=torch.channels_last), kernel.to(grad.dtype)
        grad = grad.contiguous(memory_format=torch.channels_last)

        def conv_backward(g: torch.Tensor, columns: slice, pad_w: int, mask: list[bool]) -> tuple:
            return torch.ops.aten.convolution_backward(
                g, x, kernel[..., columns], [C] if mask[2] else None, [1, 1], [p, pad_w], [1, 1], False, [0, 0], C,
                mask,
            )

        needs = ctx.needs_input_grad
        grad_x = conv_backward(grad, slice(None), p, [True, False, False])[0] if needs[0] else None
        # The bias gradient with the middle columns' (oneDNN computes it in the kernel gradient's pass).
        _, middle, grad_bias = conv_backward(grad, slice(p - 1, p + 2), 1, [False, True, ctx.bias_dtype is not None])

        def column(j: int) -> torch.Tensor:
            return conv_backward(_shift_rows(grad, j - p), slice(j, j + 1), 0, [False, True, False])[1]

        pieces = [column(j) for j in range(p - 1)] + [middle] + [column(j) for j in range(p + 2, k)]
        grad_kernel = torch.cat(pieces, dim=-1).to(dtypes[1])
        grad_bias = None if grad_bias is None else grad_bias.to(ctx.bias_dtype)
        return None if grad_x is None else grad_x.to(dtypes[0]), grad_kernel, grad_bias


def _shift_rows(t: torch.Tensor, shift: int) -> torch.Tensor:
    """Channels-last ``t (B, C, H, W)`` moved ``shift`` columns along its rows (``out[..., w] = t[..., w - shift]``,
    zero where that is outside), channels-last."""
    rows = t.permute(0, 2, 3, 1)  # (B, H, W, C), contiguous
    W, n = rows.shape[2], min(abs(shift), rows.shape[2])
    moved = F.pad(rows[:, :, :W - n], (0, 0, n, 0)) if shift > 0 else F.pad(rows[:, :, n:], (0, 0, 0, n))
    return moved.permute(0, 3, 1, 2)


def _depthwise_conv2d(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The depthwise ``k x k`` convolution of channels-last ``x (B, C, H, W)``, ``padding = k // 2``: on CPU, a
    kernel more than 3 wide through ``_WideDepthwiseConv2d``. One node of a ``torch.fx`` graph, as the device is
    known only when it runs."""
    if kernel.shape[-1] > 3 and x.device.type == "cpu":
        return _WideDepthwiseConv2d.apply(x, kernel, bias)
    return F.conv2d(x, kernel, bias, padding=kernel.shape[-1] // 2, groups=x.shape[1])


torch.fx.wrap("_depthwise_conv2d")


def grid_tokens(v: torch.Tensor, key_padding_mask: torch.Tensor | None, num_prefix_tokens: int) -> torch.Tensor:
    """The tokens a convolution reads: padding zeroed, the prefix tokens left out."""
    if key_padding_mask is not None:
        v = v.masked_fill(key_padding_mask[..., None], 0.0)
    return v[:, num_prefix_tokens:]


def with_prefix(out: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """``out`` ``(B, N, ...)`` after ``num_prefix_tokens`` zero rows (the prefix tokens get attention only)."""
    if not num_prefix_tokens:
        return out
    # Concatenated, not padded: the backward of a pad copies the gradient, that of a concatenation is a view.
    return torch.cat([out.new_zeros(out.shape[:1] + (num_prefix_tokens,) + out.shape[2:]), out], dim=1)


def _channels_last(kernel: torch.Tensor) -> torch.Tensor:
    """A depthwise kernel ``(C, k)`` or ``(C, k, k)`` as the Triton convolution takes it, ``(KH, KW, C)``: a copy of
    its few values, whose gradient's transpose is a view."""
    return (kernel.unsqueeze(1) if kernel.dim() == 2 else kernel).permute(1, 2, 0).contiguous()


def _use_triton(v: torch.Tensor) -> bool:
    """The Triton backend where it is chosen and runs: CUDA tensors, or any under Triton's interpreter."""
    return CONV_BACKEND == "triton" and not is_tracing() and (v.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


class MultiScaleDepthwiseConv(nn.Module):
    """Gated multi-scale depthwise convolution with static (learned, input-independent) kernels.

    ``y = sum_i softmax(gate)_i * (DepthwiseConv_{k_i}(v) + b_i)``, computed as one depthwise
    convolution with the collapsed kernel, over the token sequence (``layout="1d"``) or over the
    tokens' ``H x W`` grid with ``k x k`` kernels (``layout="2d"``).
    """

    def __init__(
            self,
            dim: int,
            kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES["static"],
            layout: ConvLayout = "1d",
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            dim: Number of channels (the attention's value width).
            kernel_sizes: Distinct positive odd kernel sizes.
            layout: ``"1d"``: along the sequence; ``"2d"``: over a row-major token grid.
        """
        super().__init__()
        if layout not in CONV_LAYOUTS:
            raise ValueError(f"conv_layout must be one of {CONV_LAYOUTS}, got {layout!r}")
        dd = {"device": device, "dtype": dtype}
        self.kernel_sizes = check_kernel_sizes(kernel_sizes)
        self.layout = layout
        self.spatial_dims = 2 if layout == "2d" else 1
        self.weight = nn.ParameterList(
            nn.Parameter(torch.empty(dim, *(k,) * self.spatial_dims, **dd)) for k in self.kernel_sizes
        )
        self.bias = nn.Parameter(torch.empty(len(self.kernel_sizes), dim, **dd))
        self.gate = nn.Parameter(torch.empty(len(self.kernel_sizes), **dd)) if len(self.kernel_sizes) > 1 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's depthwise-conv init (uniform in +-1/sqrt(taps)), zero bias, uniform gate."""
        for w in self.weight:
            bound = 1.0 / math.sqrt(w[0].numel())
            nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.bias)
        if self.gate is not None:
            nn.init.zeros_(self.gate)

    def forward(
            self,
            v: torch.Tensor,
            is_causal: bool = False,
            grid_size: tuple[int, int] | None = None,
            key_padding_mask: torch.Tensor | None = None,
            num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """Convolve the tokens of ``v`` ``(B, N, C)`` after its ``num_prefix_tokens`` (whose outputs are zero),
        tokens marked in ``key_padding_mask`` (``(B, N)``, True on padding) reading as zero; the 2-D layout
        needs ``grid_size = (H, W)`` of the tokens after the prefix."""
        self._check_layout(v, is_causal, grid_size, num_prefix_tokens)
        if _use_triton(v):  # the gate collapse in one launch, its kernel channels-last as the Triton convolution's
            from .triton_conv import gated_kernel
            kernel, bias = (_channels_last(self.weight[0]), self.bias[0]) if self.gate is None else gated_kernel(
                torch.cat([w.flatten() for w in self.weight]), self.kernel_sizes, self.bias, self.gate,
                self.layout == "2d", is_causal)
        else:
            weights = _gate_weights(self.gate)
            kernel = _gated_kernel(list(self.weight), self.kernel_sizes, weights, is_causal, self.spatial_dims)
            bias = self.bias[0] if weights is None else weights @ self.bias
        return self._conv(v, kernel, bias, max(self.kernel_sizes), is_causal, grid_size, key_padding_mask,
                          num_prefix_tokens)

    def forward_per_kernel(
            self,
            v: torch.Tensor,
            is_causal: bool = False,
            grid_size: tuple[int, int] | None = None,
            key_padding_mask: torch.Tensor | None = None,
            num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """Gated output of each kernel size, stacked: ``(B, N, len(kernel_sizes), C)``."""
        self._check_layout(v, is_causal, grid_size, num_prefix_tokens)
        # PyTorch's path masks and slices the tokens once for all kernels; Triton's does it inside each.
        fused = _use_triton(v)
        x = v if fused else grid_tokens(v, key_padding_mask, num_prefix_tokens)
        mask, prefix = (key_padding_mask, num_prefix_tokens) if fused else (None, 0)
        outs = [
            self._conv(x, _channels_last(w) if fused else w, b, k, is_causal, grid_size, mask, prefix)
            for w, b, k in zip(self.weight, self.bias, self.kernel_sizes)
        ]
        out = torch.stack(outs, dim=2)
        weights = _gate_weights(self.gate)
        out = out if weights is None else out * weights[:, None]
        return out if fused else with_prefix(out, num_prefix_tokens)

    def _check_layout(self, v: torch.Tensor, is_causal: bool, grid_size: tuple[int, int] | None,
                      num_prefix_tokens: int) -> None:
        if self.layout == "2d":
            N = v.shape[1] - num_prefix_tokens
            if is_causal:
                raise ValueError("is_causal is not defined for the 2-D convolution layout")
            if not is_tracing() and (grid_size is None or grid_size[0] * grid_size[1] != N):
                raise ValueError(f"grid_size must be (H, W) with H * W = {N} tokens, got {grid_size}")

    def _conv(
            self,
            v: torch.Tensor,
            kernel: torch.Tensor,
            bias: torch.Tensor,
            width: int,
            is_causal: bool,
            grid_size: tuple[int, int] | None,
            key_padding_mask: torch.Tensor | None,
            num_prefix_tokens: int,
    ) -> torch.Tensor:
        """One depthwise pass of ``kernel``: ``(C, k)`` or ``(C, k, k)``, on the Triton backend ``(KH, KW, C)``."""
        B, T, C = v.shape
        N = T - num_prefix_tokens
        if _use_triton(v):  # masking, the prefix and the bias inside the one kernel; the kernel is (KH, KW, C)
            from .triton_conv import depthwise_conv
            if self.layout == "2d":
                grid_h, pad_h, pad_w = grid_size[0], width // 2, width // 2
            else:
                grid_h, pad_h, pad_w = 1, 0, width - 1 if is_causal else width // 2
            return depthwise_conv(v, kernel, bias, grid_h, pad_h, pad_w, num_prefix_tokens, key_padding_mask)
        v = grid_tokens(v, key_padding_mask, num_prefix_tokens)
        if self.layout == "2d":
            # (B, C, H, W) viewed from (B, H, W, C) is channels-last: no transposes.
            x = v.reshape(B, grid_size[0], grid_size[1], C).permute(0, 3, 1, 2)
            out = _depthwise_conv2d(x, kernel.unsqueeze(1), bias)
            return with_prefix(out.permute(0, 2, 3, 1).reshape(B, N, C), num_prefix_tokens)
        # (B, C, N, 1) viewed from (B, N, C) is channels-last 2-D: the fast depthwise path, no transposes. The
        # sequence runs down a column, the kernel is (k, 1): oneDNN's depthwise kernel takes the weight gradient
        # of a kernel up to 3 wide but any height, and a (1, k) row of 5 or more fell to its generic grouped path.
        x = v.unsqueeze(2).permute(0, 3, 1, 2)
        # Causal: pad width - 1 on both sides and keep the first N outputs (each reads t - width + 1 .. t).
        pad = width - 1 if is_causal else width // 2
        out = F.conv2d(x, kernel.view(C, 1, width, 1), bias, padding=(pad, 0), groups=C)
        # A view back to (B, N, C) (indexing the unit column would copy the whole gradient in the backward).
        out = out.permute(0, 2, 3, 1).flatten(1, 2)
        return with_prefix(out[:, :N] if is_causal else out, num_prefix_tokens)


class MultiScaleDynamicConv(nn.Module):
    """Gated multi-scale dynamic (input-dependent) lightweight convolution.

    As fairseq's ``DynamicConv1dTBC`` used by the official MUSE code: each token predicts, from the
    value it is convolving, one kernel per head (channels of a head share it), softmax-normalised
    over its taps. Kernel sizes are mixed by a softmax gate; a size-1 kernel is the identity.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES["dynamic"],
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            dim: Number of channels (the attention's value width); divisible by ``num_heads``.
            num_heads: Number of kernel heads.
            kernel_sizes: Distinct positive odd kernel sizes.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.kernel_sizes = check_kernel_sizes(kernel_sizes)
        num_taps = sum(k for k in self.kernel_sizes if k > 1)
        self.weight_proj = nn.Linear(dim, num_heads * num_taps, device=device, dtype=dtype) if num_taps else None
        self.gate = nn.Parameter(torch.empty(len(self.kernel_sizes), device=device, dtype=dtype)) \
            if len(self.kernel_sizes) > 1 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's Linear init (trunc normal, std 0.02; near-uniform kernels), uniform gate."""
        if self.weight_proj is not None:
            nn.init.trunc_normal_(self.weight_proj.weight, std=0.02)
            nn.init.zeros_(self.weight_proj.bias)
        if self.gate is not None:
            nn.init.zeros_(self.gate)

    def _kernels(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Per-token kernels, one ``(B, N, H, k)`` tensor per kernel size, each summing to 1."""
        B, N, _ = v.shape
        logits = (
            self.weight_proj(v).view(B, N, self.num_heads, self.weight_proj.out_features // self.num_heads)
            if self.weight_proj is not None else None
        )
        kernels, start = [], 0
        for k in self.kernel_sizes:
            if k == 1:
                kernels.append(v.new_ones(B, N, self.num_heads, 1))
            else:
                kernels.append(logits[..., start:start + k].softmax(-1))
                start += k
        return kernels

    def forward(
            self, v: torch.Tensor, is_causal: bool = False, key_padding_mask: torch.Tensor | None = None,
            num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """Convolve the tokens of ``v`` ``(B, N, C)`` after its ``num_prefix_tokens`` (whose outputs are zero)
        along N, tokens marked in ``key_padding_mask`` (True on padding) reading as zero."""
        v = grid_tokens(v, key_padding_mask, num_prefix_tokens)
        kernel = _gated_kernel(self._kernels(v), self.kernel_sizes, _gate_weights(self.gate), is_causal)
        return with_prefix(self._conv(v, kernel, max(self.kernel_sizes), is_causal), num_prefix_tokens)

    def forward_per_kernel(
            self, v: torch.Tensor, is_causal: bool = False, key_padding_mask: torch.Tensor | None = None,
            num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """Gated output of each kernel size, stacked: ``(B, N, len(kernel_sizes), C)``."""
        v = grid_tokens(v, key_padding_mask, num_prefix_tokens)
        kernels = zip(self._kernels(v), self.kernel_sizes)
        out = torch.stack([self._conv(v, k, size, is_causal) for k, size in kernels], dim=2)
        weights = _gate_weights(self.gate)
        out = out if weights is None else out * weights[:, None]
        return with_prefix(out, num_prefix_tokens)

    def _conv(self, v: torch.Tensor, kernel: torch.Tensor, width: int, is_causal: bool) -> torch.Tensor:
        before = _token_padding(width, is_causal)[0]
        if _use_triton(v):  # one launch each way, the tokens read where they lie
            from .triton_conv import dynamic_conv
            return dynamic_conv(v, kernel, before)
        B, N, C = v.shape
        tokens = v.reshape(B, N, self.num_heads, C // self.num_heads)
        return _dynamic_conv(tokens, kernel, before).reshape(B, N, C)


def create_conv(
        conv_type: ConvType,
        dim: int,
        num_heads: int,
        kernel_sizes: Sequence[int] | None = None,
        layout: ConvLayout = "1d",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
) -> MultiScaleDepthwiseConv | MultiScaleDynamicConv | None:
    """Build the convolution branch named by ``conv_type``: ``"static"``, ``"dynamic"``, or ``"none"``
    (no convolution: attention alone, the baseline of ablations).

    ``kernel_sizes=None`` takes the type's default: ``(1, 3, 5)`` (the seed's) for static,
    ``(3, 15)`` (the official code's) for dynamic. Dynamic kernels are 1-D only.
    """
    if conv_type not in CONV_TYPES:
        raise ValueError(f"conv_type must be one of {CONV_TYPES}, got {conv_type!r}")
    if layout not in CONV_LAYOUTS:
        raise ValueError(f"conv_layout must be one of {CONV_LAYOUTS}, got {layout!r}")
    if conv_type == "none":
        return None
    sizes = DEFAULT_KERNEL_SIZES[conv_type] if kernel_sizes is None else kernel_sizes
    if conv_type == "static":
        return MultiScaleDepthwiseConv(dim, sizes, layout, device=device, dtype=dtype)
    if layout != "1d":
        raise ValueError(f"conv_layout={layout!r} needs conv_type='static'; dynamic kernels are 1-D")
    return MultiScaleDynamicConv(dim, num_heads, sizes, device=device, dtype=dtype)
