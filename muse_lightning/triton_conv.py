"""A Triton depthwise convolution over channels-last tokens, MUSE's convolution branch on the GPU.

``depthwise_conv(v, kernel, bias, grid_h, pad_h, pad_w, prefix, padding)`` convolves the tokens of
``v (B, prefix + N, C)`` after its ``prefix`` tokens (class / register tokens), which sit on a row-major
``grid_h x (N / grid_h)`` grid (``grid_h = 1``: a sequence), with one kernel (the gated kernels already
collapsed), channels-last as the tokens: ``(KH, KW, C)``, so each tap's channels load as one vector; and adds
``bias``: output ``(h, w)`` reads tokens ``(h + i - pad_h, w + j -
pad_w)``, and the grid's border, the tokens marked in ``padding`` (bool ``(B, prefix + N)``, True on
padding) and the prefix read as zero; the output's prefix rows are zero. So the padding mask, the prefix
slice and pad and the bias add, each a pass over the tokens in PyTorch, happen inside the one kernel.
It is a ``torch.library`` custom op with its own autograd (input, kernel and bias gradients by Triton
kernels; the kernel and bias gradients without atomics, so they reproduce bit for bit), so
``torch.compile(fullgraph=True)`` and DDP see one op. The tokens stay channels-last: each program loads
contiguous channel vectors, no transposes, and ``v`` is read through its batch and token strides (the value
slice of a fused ``qkv`` projection needs no copy).

``gated_kernel(kernels, sizes, bias, gate, two_d, causal)`` is the gate collapse that makes the one kernel: the
kernels of several sizes (flattened one after another), weighed by ``softmax(gate)`` and summed into the largest
size, channels-last, and their biases likewise, in one launch; its backward, one more, gives every kernel's, the
biases' and the gate's gradients (the gate's summed over channels by one program, in order: no atomics). In
PyTorch those are a dozen tiny ops each way, each a kernel launch in eager mode. The kernels come packed rather
than as a list of tensors: torch 2.11's custom-op autograd rejects the gradients of a ``Tensor[]`` input.

``dynamic_conv(v, kernel, before)`` is the dynamic convolution (per-token, per-head kernels ``(B, N, H, W)``, a
head's channels sharing them): one launch forward, two backward (the input gradient, and the kernel gradient, whose
every output is one program's sum over a head's channels: no atomics), where PyTorch's ``conv._DynamicConv`` pads
the tokens (or the gradient) into a copy for each of its batched products. Masking and the prefix stay outside it,
as the kernels are computed from the masked tokens anyway.

The ops run where Triton does: CUDA tensors, or any tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` before this module is imported), which is how it is tested on CPU against
PyTorch's convolution. ``MultiScaleDepthwiseConv`` and ``MultiScaleDynamicConv`` use them only when
``MUSE_CONV_BACKEND=triton``
(not yet measured on a GPU: the default stays PyTorch's cuDNN path).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["depthwise_conv", "depthwise_conv_backward", "dynamic_conv", "dynamic_conv_backward", "gated_kernel",
           "gated_kernel_backward", "reference_depthwise_conv"]

# The tile of the forward and input-gradient kernel (``_taps``: tokens of a grid row, channels, warps), that of the
# kernel-gradient kernel (tap x token lanes, channels, warps: all the taps of ``lanes // taps`` tokens, see
# ``_grad_block``) and the number of programs the latter aims at (a few waves on a 132-multiprocessor GPU; the
# token tiles each sums follow). Not yet tuned on a GPU: scripts/triton_tiles.py times each kernel's on one.
_TAPS_TILE = (16, 64, 4)
_GRAD_TILE = (64, 64, 4)
_GRAD_PROGRAMS = 1024
# The most taps of a kernel row that ``_taps`` unrolls (a longer row runs in chunks of this many, the last masked).
_ROW_TAPS = 16
# The channels that a program of the gate collapse (``_collapse``) takes at a time, one a thread, and the most that
# the one program of its gradient (``_collapse_grad``) takes at a time, with as many threads.
_COLLAPSE_BLOCK_C = 128
_COLLAPSE_GRAD_BLOCK_C = 1024
# The dynamic convolution's tile (tokens of a sequence, at most that many channels of a head, warps), for its three
# kernels alike. Not yet tuned on a GPU.
_DYNAMIC_TILE = (16, 64, 4)


@triton.jit
def _taps(
        src_ptr, kernel_ptr, bias_ptr, pad_ptr, out_ptr, H, W, C, P, src_sb, src_st,
        PAD_H: tl.constexpr, PAD_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr,
        HAS_PAD: tl.constexpr, ROW_TAPS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One ``(BLOCK_W, BLOCK_C)`` tile of grid row ``h`` of batch ``b``: ``sum_ij kernel[i, j, c] * src[b, h +
    s(i - PAD_H), w + s(j - PAD_W), c]`` on the grid after ``P`` prefix tokens. Forward (``s = +1``): padded
    tokens read as zero, plus the bias. Input gradient (``FLIP``, ``s = -1``): padded tokens get zero. ``src`` may
    be strided (batch and token strides ``src_sb``, ``src_st``: the value slice of a fused projection); ``out`` and
    ``pad`` are contiguous. The first program axis runs over the grid rows' column tiles, row after row (CUDA
    allows 2**31 - 1 programs on it, 65,535 on the others: a sequence of 2**21 tokens has 131,072 tiles)."""
    n_w = tl.cdiv(W, BLOCK_W)
    row = tl.program_id(0) // n_w  # b * H + h
    h, w0 = row % H, (tl.program_id(0) % n_w) * BLOCK_W
    lane = tl.arange(0, BLOCK_W)
    w = w0 + lane
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    # 64-bit offsets of the tile's first token (tensors may exceed 2**31 elements); the taps' are relative to it.
    b = (row // H).to(tl.int64)
    start = P + h * W + w0  # in batch b's tokens
    first_token = b * (P + H * W) + start  # in out's and pad's tokens
    tile_src = src_ptr + (b * src_sb + start.to(tl.int64) * src_st)
    tile_pad = pad_ptr + first_token
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    # Kernel rows in a loop, and a row's taps ROW_TAPS at a time, those unrolled: registers grow with ROW_TAPS, not
    # KH * KW (a whole 9 x 9 kernel unrolled spills registers on Hopper; tests/test_triton_conv.py keeps every
    # kernel in registers).
    for i in range(KH):
        dh = (PAD_H - i) if FLIP else (i - PAD_H)
        hh = h + dh
        for j0 in range(0, KW, ROW_TAPS):
            for jj in tl.static_range(ROW_TAPS):
                j = j0 + jj
                dw = (PAD_W - j) if FLIP else (j - PAD_W)
                ww = w + dw
                ok = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                tap_ok = c_ok
                if KW % ROW_TAPS:  # the last ROW_TAPS run past the row's end
                    ok, tap_ok = ok & (j < KW), tap_ok & (j < KW)
                rel = dh * W + dw + lane
                if HAS_PAD and not FLIP:
                    ok = ok & (tl.load(tile_pad + rel, mask=ok, other=1) == 0)
                x = tl.load(tile_src + rel[:, None] * src_st + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
                k = tl.load(kernel_ptr + (i * KW + j) * C + c, mask=tap_ok, other=0.0)
                acc += x.to(tl.float32) * k.to(tl.float32)[None, :]
    if not FLIP:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_PAD and FLIP:
        padded = tl.load(tile_pad + lane, mask=w < W, other=1) != 0
        acc = tl.where(padded[:, None], 0.0, acc)
    out = out_ptr + first_token * C + (lane[:, None] * C + c[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(w < W)[:, None] & c_ok[None, :])


@triton.jit
def _kernel_grad(
        v_ptr, grad_ptr, pad_ptr, part_ptr, R, H, W, C, P, v_sb, v_st,
        PAD_H: tl.constexpr, PAD_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_PAD: tl.constexpr,
        ITEMS: tl.constexpr, TAPS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The kernel and bias gradients of ``ITEMS`` consecutive token tiles, in one ``BLOCK_C`` channel tile: the tiles
    are the ``BLOCK_W`` tokens of each grid row (of the ``R = B * H``) one after another, row after row, so that a
    long sequence is split among programs as a tall grid is. ``part[p, i * KW + j, c] = sum grad[b, h, w, c] *
    v[b, h + i - PAD_H, w + j - PAD_W, c]`` (padded tokens of ``v`` reading as zero) and ``part[p, KH * KW, c] = sum
    grad[b, h, w, c]`` over program ``p``'s tiles. All taps at once: each tile's products fill a ``(TAPS, BLOCK_W,
    BLOCK_C)`` accumulator elementwise (tap ``KH * KW``, the bias, multiplies by one; the taps up to the power of
    two ``TAPS`` read nothing), and its tokens are summed, across threads, once per program, not at every tile. No
    atomics: the partial sums are added in a fixed order, so gradients reproduce. ``v`` may be strided as ``src`` in
    ``_taps``; ``grad`` is contiguous."""
    n_w = tl.cdiv(W, BLOCK_W)
    lane = tl.arange(0, BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    tap = tl.arange(0, TAPS)
    dh, dw = tap // KW - PAD_H, tap % KW - PAD_W
    # (TAPS, BLOCK_W): the tokens each tap reads, counted from the tile's first.
    rel = dh[:, None] * W + dw[:, None] + lane[None, :]
    x_tile = rel[:, :, None] * v_st + c[None, None, :]
    bias_tap = tl.where((tap == KH * KW)[:, None, None], 1.0, 0.0).to(v_ptr.dtype.element_ty)
    # The output gradient loaded straight into the taps' layout (the same tokens for every tap): no layout change.
    g_tile = tl.broadcast_to((lane[:, None] * C + c[None, :])[None, :, :], (TAPS, BLOCK_W, BLOCK_C))
    first = tl.program_id(0) * ITEMS
    row, w0 = first // n_w, (first % n_w) * BLOCK_W  # stepped along the tiles below, no division there
    b, h = row // H, row % H
    acc = tl.zeros((TAPS, BLOCK_W, BLOCK_C), dtype=tl.float32)
    for _ in range(ITEMS):
        tile_ok = row < R
        ww = w0 + dw[:, None] + lane[None, :]
        hh = h + dh
        ok = (tap < KH * KW)[:, None] & (ww >= 0) & (ww < W) & ((hh >= 0) & (hh < H))[:, None] & tile_ok
        # 64-bit offsets of the tile's first token (tensors may exceed 2**31 elements): in batch b's tokens, in grad's.
        b64, in_batch = b.to(tl.int64), P + h * W + w0
        start = b64 * (P + H * W) + in_batch
        g_ok = ((w0 + lane < W)[:, None] & c_ok[None, :])[None, :, :] & tile_ok
        g = tl.load(grad_ptr + start * C + g_tile, mask=g_ok, other=0.0)
        if HAS_PAD:
            ok = ok & (tl.load(pad_ptr + start + rel, mask=ok, other=1) == 0)
        x = tl.load(v_ptr + (b64 * v_sb + in_batch.to(tl.int64) * v_st) + x_tile,
                    mask=ok[:, :, None] & c_ok[None, None, :], other=bias_tap)
        acc += g.to(tl.float32) * x.to(tl.float32)
        w0 += BLOCK_W
        if w0 >= W:
            w0 = 0
            row += 1
            h += 1
            if h == H:
                h = 0
                b += 1
    part = part_ptr + tl.program_id(0).to(tl.int64) * (KH * KW + 1) * C
    tl.store(part + tap[:, None] * C + c[None, :], tl.sum(acc, axis=1), mask=(tap <= KH * KW)[:, None] & c_ok[None, :])


@triton.jit
def _gate_weights(gate_ptr, S: tl.constexpr, S_POW2: tl.constexpr):
    """``softmax(gate)`` of the ``S`` gate logits in fp32, in ``S_POW2`` lanes (the lanes past ``S`` zero)."""
    lanes = tl.arange(0, S_POW2)
    logits = tl.load(gate_ptr + lanes, mask=lanes < S, other=float("-inf")).to(tl.float32)
    w = tl.exp(logits - tl.max(logits))
    return w / tl.sum(w)


@triton.jit
def _lane(x, s):
    """Lane ``s`` of the vector ``x``, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, x.shape[0]) == s, x, 0.0))


@triton.jit
def _window_tap(t, c, C, k: tl.constexpr, start: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                CAUSAL: tl.constexpr):
    """Where tap ``t`` of the gated ``KH x KW`` kernel falls in the size-``k`` kernel that starts at ``C * start`` in
    the packed kernels of ``_collapse``: the offsets of its channels ``c`` there, and whether the tap is inside the
    kernel's window."""
    rows = k if KH > 1 else 1
    ii = t // KW - (KH - rows) // 2
    jj = t % KW - ((KW - k) if CAUSAL else (KW - k) // 2)
    inside = (ii >= 0) & (ii < rows) & (jj >= 0) & (jj < k)
    return C * start + c * (rows * k) + (ii * k + jj), inside


@triton.jit
def _collapse(
        kernels_ptr, bias_ptr, gate_ptr, out_ptr, out_bias_ptr, C,
        SIZES: tl.constexpr, STARTS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, CAUSAL: tl.constexpr,
        S_POW2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One ``BLOCK_C`` channel tile of the gated kernel, channels-last: ``out[i, j, c] = sum_s w_s * k_s[c, i - oh_s,
    j - ow_s]`` (zero outside size ``s``'s window, placed at ``(oh_s, ow_s)`` in the ``KH x KW`` one: centred, or
    with ``CAUSAL`` at the row's end) and ``out_bias[c] = sum_s w_s * bias[s, c]``, ``w = softmax(gate)``. The
    kernels ``k_s``, ``(C, k)`` (``KH = 1``) or ``(C, k, k)``, lie one after another in ``kernels``, ``k_s`` from
    ``C * STARTS[s]``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    S: tl.constexpr = len(SIZES)
    w = _gate_weights(gate_ptr, S, S_POW2)
    bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s in tl.static_range(S):
        bias += _lane(w, s) * tl.load(bias_ptr + s * C + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(out_bias_ptr + c, bias.to(out_bias_ptr.dtype.element_ty), mask=c_ok)
    for i in range(KH):  # rows in a loop, a row's taps unrolled (their loads in flight together)
        for j in tl.static_range(KW):
            t = i * KW + j
            acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for s in tl.static_range(S):
                offset, inside = _window_tap(t, c, C, SIZES[s], STARTS[s], KH, KW, CAUSAL)
                x = tl.load(kernels_ptr + offset, mask=c_ok & inside, other=0.0)
                acc += _lane(w, s) * x.to(tl.float32)
            tl.store(out_ptr + t * C + c, acc.to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _collapse_grad(
        kernels_ptr, bias_ptr, gate_ptr, grad_ptr, grad_bias_ptr, kernels_grad_ptr, bias_grad_ptr, gate_grad_ptr, C,
        SIZES: tl.constexpr, STARTS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, CAUSAL: tl.constexpr,
        S_POW2: tl.constexpr, BLOCK_C: tl.constexpr, C_TILES: tl.constexpr,
):
    """The gradients of ``_collapse`` from those of its kernel (``grad``, ``(KH, KW, C)``) and bias (``grad_bias``):
    ``k_s``'s is ``w_s * grad`` over size ``s``'s window, ``bias[s]``'s ``w_s * grad_bias``, and the gate's ``w_s *
    (d_s - sum_r w_r d_r)`` with ``d_s = <grad, k_s> + <grad_bias, bias[s]>``. One program, which walks the
    ``C_TILES`` channel tiles in order and adds each size's products elementwise into a sizes x channels
    accumulator, summed over the channels once, at the end: the gate's gradient reproduces bit for bit, without
    atomics."""
    S: tl.constexpr = len(SIZES)
    lanes = tl.arange(0, S_POW2)
    w = _gate_weights(gate_ptr, S, S_POW2)
    d = tl.zeros((S_POW2, BLOCK_C), dtype=tl.float32)
    for tile in range(C_TILES):
        c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        g_bias = tl.load(grad_bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        for s in tl.static_range(S):
            b = tl.load(bias_ptr + s * C + c, mask=c_ok, other=0.0).to(tl.float32)
            tl.store(bias_grad_ptr + s * C + c, (_lane(w, s) * g_bias).to(bias_grad_ptr.dtype.element_ty), mask=c_ok)
            d += tl.where((lanes == s)[:, None], (g_bias * b)[None, :], 0.0)
        for i in range(KH):  # the taps as in _collapse, each size's window within them
            for j in tl.static_range(KW):
                t = i * KW + j
                g = tl.load(grad_ptr + t * C + c, mask=c_ok, other=0.0).to(tl.float32)
                for s in tl.static_range(S):
                    offset, inside = _window_tap(t, c, C, SIZES[s], STARTS[s], KH, KW, CAUSAL)
                    x = tl.load(kernels_ptr + offset, mask=c_ok & inside, other=0.0).to(tl.float32)
                    tl.store(kernels_grad_ptr + offset, (_lane(w, s) * g).to(kernels_grad_ptr.dtype.element_ty),
                             mask=c_ok & inside)
                    d += tl.where((lanes == s)[:, None], (g * x)[None, :], 0.0)
    d_sum = tl.sum(d, axis=1)
    tl.store(gate_grad_ptr + lanes, (w * (d_sum - tl.sum(w * d_sum))).to(gate_grad_ptr.dtype.element_ty),
             mask=lanes < S)


def _grad_block(KH: int, KW: int) -> tuple[int, int]:
    """``(TAPS, BLOCK_W)`` of ``_kernel_grad``: the taps and bias padded to a power of two, and the tokens that
    make up the tile's ``_GRAD_TILE[0]`` tap-token lanes (at least one)."""
    taps = triton.next_power_of_2(KH * KW + 1)
    return taps, max(1, _GRAD_TILE[0] // taps)


def _taps_grid(B: int, H: int, W: int, C: int) -> tuple[int, int]:
    """The program grid of ``_taps`` over ``B`` grids of ``H x W`` tokens: (rows x column tiles, channel tiles)."""
    return B * H * triton.cdiv(W, _TAPS_TILE[0]), triton.cdiv(C, _TAPS_TILE[1])


def _grad_grid(B: int, H: int, W: int, C: int, KH: int, KW: int) -> tuple[tuple[int, int], int]:
    """The program grid of ``_kernel_grad`` (programs along the token tiles, channel tiles) and the token tiles
    (``ITEMS``) each program sums: ``_GRAD_PROGRAMS`` programs or up to half as many in all (``ITEMS`` a power of
    two, so that few kernels are compiled however the shapes vary), whatever the grid's shape."""
    tiles = B * H * triton.cdiv(W, _grad_block(KH, KW)[1])
    channel_tiles = triton.cdiv(C, _GRAD_TILE[1])
    items = triton.next_power_of_2(max(1, triton.cdiv(tiles * channel_tiles, _GRAD_PROGRAMS)))  # 1 if no tokens
    return (triton.cdiv(tiles, items), channel_tiles), items


def _run_taps(src: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, pad: torch.Tensor, out: torch.Tensor,
              grid_h: int, pad_h: int, pad_w: int, prefix: int, flip: bool, has_pad: bool) -> None:
    """Launch ``_taps`` over ``src (B, prefix + N, C)`` into ``out`` with the module's tile (``bias`` is not read
    with ``flip``)."""
    (B, T, C), (KH, KW) = src.shape, kernel.shape[:2]
    W = (T - prefix) // grid_h
    block_w, block_c, warps = _TAPS_TILE
    _taps[_taps_grid(B, grid_h, W, C)](
        src, kernel, bias, pad, out, grid_h, W, C, prefix, src.stride(0), src.stride(1),
        PAD_H=pad_h, PAD_W=pad_w, KH=KH, KW=KW, FLIP=flip, HAS_PAD=has_pad, ROW_TAPS=min(KW, _ROW_TAPS),
        BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps,
    )


def _check(v: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, grid_h: int, prefix: int,
           padding: torch.Tensor | None) -> None:
    if v.dim() != 3 or kernel.dim() != 3 or kernel.shape[-1] != v.shape[-1] or bias.shape != (v.shape[-1],):
        raise ValueError(
            f"depthwise_conv takes v (B, N, C), kernel (KH, KW, C) and bias (C,), got {tuple(v.shape)}, "
            f"{tuple(kernel.shape)} and {tuple(bias.shape)}"
        )
    if not 0 <= prefix < v.shape[1]:
        raise ValueError(f"prefix={prefix} must leave tokens to convolve of the {v.shape[1]}")
    if grid_h < 1 or (v.shape[1] - prefix) % grid_h:
        raise ValueError(f"grid_h={grid_h} does not divide the {v.shape[1] - prefix} tokens into rows")
    if padding is not None and (padding.dtype != torch.bool or padding.shape != v.shape[:2]):
        raise ValueError(f"padding must be a bool (B, N) = {tuple(v.shape[:2])} tensor, got {padding.dtype} "
                         f"{tuple(padding.shape)}")


def _channels_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where its channels are adjacent (a value slice of a fused projection is), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """``t``'s CUDA device made the current one for the launches: Triton launches on the current device, not on the
    tensors' (a model on ``cuda:1`` in a process whose current device is ``cuda:0``)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _pad_arg(padding: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """The padding mask as bytes for the kernels (``v``, never read, where there is none)."""
    return v if padding is None else padding.contiguous().view(torch.uint8)


@torch.library.custom_op("muse_lightning::depthwise_conv", mutates_args=())
def depthwise_conv(
        v: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, grid_h: int, pad_h: int, pad_w: int,
        prefix: int = 0, padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise convolution of channels-last tokens ``v (B, prefix + N, C)`` with a ``kernel (KH, KW, C)`` on a
    ``grid_h``-row grid after ``prefix`` tokens, padded tokens unread (see the module)."""
    _check(v, kernel, bias, grid_h, prefix, padding)
    v, kernel = _channels_unit_stride(v), kernel.contiguous()
    out = v.new_empty(v.shape)
    out[:, :prefix].zero_()
    with _on_device(v):
        _run_taps(v, kernel, bias.contiguous(), _pad_arg(padding, v), out, grid_h, pad_h, pad_w, prefix, flip=False,
                  has_pad=padding is not None)
    return out


@depthwise_conv.register_fake
def _(v: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, grid_h: int, pad_h: int, pad_w: int,
      prefix: int = 0, padding: torch.Tensor | None = None) -> torch.Tensor:
    return v.new_empty(v.shape)


def _setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    v, kernel, bias, grid_h, pad_h, pad_w, prefix, padding = inputs
    ctx.save_for_backward(v, kernel, padding)
    ctx.layout = (grid_h, pad_h, pad_w, prefix, bias.dtype)


@torch.library.custom_op("muse_lightning::depthwise_conv_backward", mutates_args=())
def depthwise_conv_backward(
        grad: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor, grid_h: int, pad_h: int, pad_w: int,
        prefix: int = 0, padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input, kernel and bias gradients of ``depthwise_conv`` (the kernel's and the bias's in fp32)."""
    grad, v, kernel = grad.contiguous(), _channels_unit_stride(v), kernel.contiguous()
    KH, KW, C = kernel.shape
    W = (v.shape[1] - prefix) // grid_h
    has_pad, pad = padding is not None, _pad_arg(padding, v)
    grad_v = v.new_empty(v.shape)
    grad_v[:, :prefix].zero_()
    taps, block_w = _grad_block(KH, KW)
    grid, items = _grad_grid(v.shape[0], grid_h, W, C, KH, KW)
    part = torch.empty(grid[0], KH * KW + 1, C, device=v.device, dtype=torch.float32)
    with _on_device(v):
        # The input gradient is the convolution of the output gradient with the flipped kernel.
        _run_taps(grad, kernel, kernel, pad, grad_v, grid_h, pad_h, pad_w, prefix, flip=True, has_pad=has_pad)
        # The kernel and bias gradients: partial sums over each program's token tiles, then added in a fixed order.
        _kernel_grad[grid](
            v, grad, pad, part, v.shape[0] * grid_h, grid_h, W, C, prefix, v.stride(0), v.stride(1), PAD_H=pad_h,
            PAD_W=pad_w, KH=KH, KW=KW, HAS_PAD=has_pad, ITEMS=items, TAPS=taps, BLOCK_W=block_w, BLOCK_C=_GRAD_TILE[1],
            num_warps=_GRAD_TILE[2],
        )
    sums = part.sum(dim=0)
    # Contiguous, as the fake kernel says, and not aliasing each other: taps-major as the kernel, so no transpose.
    return grad_v, sums[:KH * KW].view(KH, KW, C), sums[KH * KW].clone()


@depthwise_conv_backward.register_fake
def _(grad: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor, grid_h: int, pad_h: int, pad_w: int,
      prefix: int = 0, padding: torch.Tensor | None = None) -> tuple:
    f32 = {"device": kernel.device, "dtype": torch.float32}
    return v.new_empty(v.shape), torch.empty(kernel.shape, **f32), torch.empty(kernel.shape[-1], **f32)


def _backward(ctx, grad: torch.Tensor) -> tuple:
    v, kernel, padding = ctx.saved_tensors
    grid_h, pad_h, pad_w, prefix, bias_dtype = ctx.layout
    grad_v, grad_kernel, grad_bias = depthwise_conv_backward(grad, v, kernel, grid_h, pad_h, pad_w, prefix, padding)
    return grad_v, grad_kernel.to(kernel.dtype), grad_bias.to(bias_dtype), None, None, None, None, None


depthwise_conv.register_autograd(_backward, setup_context=_setup)


def _check_gated(kernels: torch.Tensor, sizes: list[int], bias: torch.Tensor, gate: torch.Tensor, two_d: bool,
                 causal: bool) -> None:
    S, C = len(sizes), bias.shape[-1]
    taps = sum(k ** (1 + two_d) for k in sizes)
    if not (sizes and all(k > 0 and k % 2 for k in sizes) and bias.dim() == 2 and bias.shape[0] == S
            and gate.shape == (S,) and kernels.shape == (C * taps,)):
        raise ValueError(
            f"gated_kernel takes the kernels (C, k) (or (C, k, k) if two_d) of odd sizes k, flattened one after "
            f"another, their sizes, bias (S, C) and gate (S,), got {tuple(kernels.shape)}, {sizes}, "
            f"{tuple(bias.shape)} and {tuple(gate.shape)}"
        )
    if causal and two_d:
        raise ValueError("causal is not defined for 2-D kernels")


def _collapse_args(sizes: list[int], two_d: bool) -> dict:
    """The constexprs of ``_collapse`` and ``_collapse_grad``: the sizes, where each size's kernel starts in the
    packed kernels (in taps; times C), the gated kernel's ``KH x KW``, the sizes' lanes and the channel tile."""
    starts = [0]
    for k in sizes[:-1]:
        starts.append(starts[-1] + k ** (1 + two_d))
    width = max(sizes)
    return {"SIZES": tuple(sizes), "STARTS": tuple(starts), "KH": width if two_d else 1, "KW": width,
            "S_POW2": triton.next_power_of_2(len(sizes)), "BLOCK_C": _COLLAPSE_BLOCK_C}


def _collapse_grad_args(sizes: list[int], two_d: bool, C: int) -> dict:
    """The constexprs of ``_collapse_grad``: ``_collapse``'s, with a channel tile of all ``C`` channels (up to
    ``_COLLAPSE_GRAD_BLOCK_C``) and the number of tiles."""
    block_c = min(triton.next_power_of_2(C), _COLLAPSE_GRAD_BLOCK_C)
    return {**_collapse_args(sizes, two_d), "BLOCK_C": block_c, "C_TILES": triton.cdiv(C, block_c)}


@torch.library.custom_op("muse_lightning::gated_kernel", mutates_args=())
def gated_kernel(
        kernels: torch.Tensor, sizes: list[int], bias: torch.Tensor, gate: torch.Tensor, two_d: bool = False,
        causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated kernel channels-last, ``(KH, KW, C)`` in fp32: ``sum_s softmax(gate)_s * k_s``, the kernels ``k_s``
    of ``sizes`` (``(C, k)``, or ``(C, k, k)`` if ``two_d``; flattened and concatenated in ``kernels``) each
    zero-padded to the largest size (centred, or right-aligned if ``causal``); and its bias ``sum_s softmax(gate)_s *
    bias[s]`` (``bias (S, C)``): one launch."""
    _check_gated(kernels, sizes, bias, gate, two_d, causal)
    args, C = _collapse_args(sizes, two_d), bias.shape[1]
    f32 = {"device": bias.device, "dtype": torch.float32}
    out, out_bias = torch.empty(args["KH"], args["KW"], C, **f32), torch.empty(C, **f32)
    with _on_device(bias):
        _collapse[(triton.cdiv(C, _COLLAPSE_BLOCK_C),)](
            kernels.contiguous(), bias.contiguous(), gate.contiguous(), out, out_bias, C, CAUSAL=causal, **args,
            num_warps=_COLLAPSE_BLOCK_C // 32,
        )
    return out, out_bias


@gated_kernel.register_fake
def _(kernels: torch.Tensor, sizes: list[int], bias: torch.Tensor, gate: torch.Tensor, two_d: bool = False,
      causal: bool = False) -> tuple:
    args, f32 = _collapse_args(sizes, two_d), {"device": bias.device, "dtype": torch.float32}
    return torch.empty(args["KH"], args["KW"], bias.shape[1], **f32), torch.empty(bias.shape[1], **f32)


@torch.library.custom_op("muse_lightning::gated_kernel_backward", mutates_args=())
def gated_kernel_backward(
        grad: torch.Tensor, grad_bias: torch.Tensor, kernels: torch.Tensor, sizes: list[int], bias: torch.Tensor,
        gate: torch.Tensor, two_d: bool = False, causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``gated_kernel``'s ``kernels``, ``bias`` and ``gate`` from those of its two outputs."""
    grads = [torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (kernels, bias, gate)]
    with _on_device(bias):
        _collapse_grad[(1,)](
            kernels.contiguous(), bias.contiguous(), gate.contiguous(), grad.contiguous(), grad_bias.contiguous(),
            *grads, bias.shape[1], CAUSAL=causal, **_collapse_grad_args(sizes, two_d, bias.shape[1]), num_warps=4,
        )
    return tuple(grads)


@gated_kernel_backward.register_fake
def _(grad: torch.Tensor, grad_bias: torch.Tensor, kernels: torch.Tensor, sizes: list[int], bias: torch.Tensor,
      gate: torch.Tensor, two_d: bool = False, causal: bool = False) -> tuple:
    return tuple(torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (kernels, bias, gate))


def _gated_setup(ctx, inputs: tuple, output: tuple) -> None:
    kernels, sizes, bias, gate, two_d, causal = inputs
    ctx.save_for_backward(kernels, bias, gate)
    ctx.layout = (sizes, two_d, causal)


def _gated_backward(ctx, grad: torch.Tensor, grad_bias: torch.Tensor) -> tuple:
    kernels, bias, gate = ctx.saved_tensors
    sizes, two_d, causal = ctx.layout
    grads = gated_kernel_backward(grad, grad_bias, kernels, sizes, bias, gate, two_d, causal)
    return grads[0], None, grads[1], grads[2], None, None


gated_kernel.register_autograd(_gated_backward, setup_context=_gated_setup)


@triton.jit
def _dynamic_taps(
        src_ptr, kernel_ptr, out_ptr, N, NH, D, src_sb, src_st,
        BEFORE: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr, ROW_TAPS: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
):
    """One ``(BLOCK_N, BLOCK_D)`` tile of head ``h``'s channels of a sequence of the dynamic convolution, per-token
    kernels ``kernel (B, N, NH, KW)`` shared by a head's ``D`` channels. Forward: ``out[b, n, c] = sum_j src[b, n + j -
    BEFORE, c] * kernel[b, n, h, j]``; input gradient (``FLIP``): ``out[b, t, c] = sum_j src[b, t + BEFORE - j, c] *
    kernel[b, t + BEFORE - j, h, j]``; tokens outside the sequence read as zero. ``src`` may be strided (batch and
    token strides ``src_sb``, ``src_st``); ``kernel`` and ``out`` are contiguous. Axis 0 runs over the sequences'
    token tiles, axis 1 over the heads' channel tiles."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    b = (tl.program_id(0) // n_tiles).to(tl.int64)
    n0 = (tl.program_id(0) % n_tiles) * BLOCK_N
    d_tiles = tl.cdiv(D, BLOCK_D)
    head = tl.program_id(1) // d_tiles
    d = (tl.program_id(1) % d_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    c = head * D + d
    lane = tl.arange(0, BLOCK_N)
    n = n0 + lane
    # 64-bit offsets of the tile's first token (tensors may exceed 2**31 elements); the taps' are relative to it.
    first = b * N + n0
    tile_src = src_ptr + (b * src_sb + n0.to(tl.int64) * src_st)
    tile_kernel = kernel_ptr + (first * NH + head) * KW
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, KW, ROW_TAPS):  # ROW_TAPS taps at a time, those unrolled (as in _taps)
        for jj in tl.static_range(ROW_TAPS):
            j = j0 + jj
            shift = (BEFORE - j) if FLIP else (j - BEFORE)
            ok = (n + shift >= 0) & (n + shift < N) & (n < N)
            if KW % ROW_TAPS:  # the last ROW_TAPS run past the kernel's end
                ok = ok & (j < KW)
            rel = shift + lane
            x = tl.load(tile_src + rel[:, None] * src_st + c[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            # The kernel of the output token (forward) or of the token that reads this one (input gradient).
            k = tl.load(tile_kernel + (rel if FLIP else lane) * (NH * KW) + j, mask=ok, other=0.0)
            acc += x.to(tl.float32) * k.to(tl.float32)[:, None]
    out = out_ptr + first * (NH * D) + (lane[:, None] * (NH * D) + c[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(n < N)[:, None] & d_ok[None, :])


@triton.jit
def _dynamic_kernel_grad(
        v_ptr, grad_ptr, out_ptr, N, NH, D, v_sb, v_st,
        BEFORE: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr, ROW_TAPS: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
):
    """The dynamic convolution's kernel gradient for ``BLOCK_N`` tokens of a sequence and head ``h``: ``out[b, n, h,
    j] = sum_d v[b, n + j - BEFORE, h * D + d] * grad[b, n, h * D + d]`` (tokens outside the sequence read as zero).
    Each program owns its outputs (the sum runs over one head's channels, ``BLOCK_D`` at a time): no atomics, the same
    bits every run. ``v`` may be strided as ``src`` in ``_dynamic_taps``; ``grad`` and ``out`` are contiguous."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    b = (tl.program_id(0) // n_tiles).to(tl.int64)
    n0 = (tl.program_id(0) % n_tiles) * BLOCK_N
    head = tl.program_id(1)
    lane = tl.arange(0, BLOCK_N)
    n = n0 + lane
    tap = tl.arange(0, TAPS)
    first = b * N + n0
    tile_v = v_ptr + (b * v_sb + n0.to(tl.int64) * v_st)
    tile_grad = grad_ptr + first * (NH * D)
    acc = tl.zeros((BLOCK_N, TAPS), dtype=tl.float32)  # the tile's taps, tap j in column j
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        c = head * D + d
        g = tl.load(tile_grad + lane[:, None] * (NH * D) + c[None, :], mask=(n < N)[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        for j0 in range(0, KW, ROW_TAPS):
            for jj in tl.static_range(ROW_TAPS):
                j = j0 + jj
                ok = (n + j - BEFORE >= 0) & (n + j - BEFORE < N) & (n < N)
                if KW % ROW_TAPS:
                    ok = ok & (j < KW)
                x = tl.load(tile_v + (j - BEFORE + lane)[:, None] * v_st + c[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                acc += tl.where(tap[None, :] == j, tl.sum(x.to(tl.float32) * g, axis=1)[:, None], 0.0)
    out = out_ptr + (first * NH + head) * KW + (lane[:, None] * (NH * KW) + tap[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(n < N)[:, None] & (tap < KW)[None, :])


def _dynamic_block_d(D: int) -> int:
    """The channels of a head that a dynamic-convolution program takes at a time: all ``D`` up to the tile's."""
    return min(triton.next_power_of_2(D), _DYNAMIC_TILE[1])


def _dynamic_grids(B: int, N: int, NH: int, D: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The program grids of ``_dynamic_taps`` (sequences' token tiles, heads' channel tiles) and of
    ``_dynamic_kernel_grad`` (the same token tiles, heads)."""
    tiles = B * triton.cdiv(N, _DYNAMIC_TILE[0])
    return (tiles, NH * triton.cdiv(D, _dynamic_block_d(D))), (tiles, NH)


def _dynamic_launch(kernel_fn, tokens: torch.Tensor, other: torch.Tensor, out: torch.Tensor, kernel_shape: torch.Size,
                    before: int, **consts) -> None:
    """Launch ``_dynamic_taps`` or ``_dynamic_kernel_grad`` (``kernel_fn``) on ``tokens (B, N, C)`` (the one operand
    read through its strides), ``other`` and ``out``, for kernels of ``kernel_shape`` (B, N, NH, KW), over the grid
    each takes."""
    (B, N, C), (NH, KW) = tokens.shape, kernel_shape[2:]
    grid = _dynamic_grids(B, N, NH, C // NH)[kernel_fn is _dynamic_kernel_grad]
    kernel_fn[grid](
        tokens, other, out, N, NH, C // NH, tokens.stride(0), tokens.stride(1), BEFORE=before, KW=KW,
        ROW_TAPS=min(KW, _ROW_TAPS), BLOCK_N=_DYNAMIC_TILE[0], BLOCK_D=_dynamic_block_d(C // NH),
        num_warps=_DYNAMIC_TILE[2], **consts,
    )


def _check_dynamic(v: torch.Tensor, kernel: torch.Tensor, before: int) -> None:
    if v.dim() != 3 or kernel.dim() != 4 or kernel.shape[:2] != v.shape[:2] or v.shape[-1] % max(kernel.shape[2], 1):
        raise ValueError(f"dynamic_conv takes v (B, N, C) and kernel (B, N, H, W) with H dividing C, got "
                         f"{tuple(v.shape)} and {tuple(kernel.shape)}")
    if not 0 <= before < kernel.shape[-1]:
        raise ValueError(f"before={before} must be in [0, {kernel.shape[-1]}), the kernel's taps")


def _dynamic_out(v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The output as PyTorch's product would type it (bf16 tokens times fp32 kernels, as under autocast: fp32)."""
    return torch.empty(v.shape, device=v.device, dtype=torch.promote_types(v.dtype, kernel.dtype))


@torch.library.custom_op("muse_lightning::dynamic_conv", mutates_args=())
def dynamic_conv(v: torch.Tensor, kernel: torch.Tensor, before: int) -> torch.Tensor:
    """The dynamic convolution of tokens ``v (B, N, C)`` with per-token, per-head kernels ``kernel (B, N, H, W)``:
    ``out[b, n, c] = sum_j v[b, n + j - before, c] * kernel[b, n, c // (C / H), j]``, tokens outside the sequence
    reading as zero; one launch."""
    _check_dynamic(v, kernel, before)
    v, kernel = _channels_unit_stride(v), kernel.contiguous()
    out = _dynamic_out(v, kernel)
    if out.numel():
        with _on_device(v):
            _dynamic_launch(_dynamic_taps, v, kernel, out, kernel.shape, before, FLIP=False)
    return out


@dynamic_conv.register_fake
def _(v: torch.Tensor, kernel: torch.Tensor, before: int) -> torch.Tensor:
    return _dynamic_out(v, kernel)


@torch.library.custom_op("muse_lightning::dynamic_conv_backward", mutates_args=())
def dynamic_conv_backward(
        grad: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor, before: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and kernel gradients of ``dynamic_conv``, each in its input's dtype; one launch each."""
    grad, v, kernel = grad.contiguous(), _channels_unit_stride(v), kernel.contiguous()
    grad_v, grad_kernel = torch.empty(v.shape, device=v.device, dtype=v.dtype), torch.empty_like(kernel)
    if v.numel():
        with _on_device(v):
            _dynamic_launch(_dynamic_taps, grad, kernel, grad_v, kernel.shape, before, FLIP=True)
            _dynamic_launch(_dynamic_kernel_grad, v, grad, grad_kernel, kernel.shape, before,
                            TAPS=triton.next_power_of_2(kernel.shape[-1]))
    else:
        grad_kernel.zero_()
    return grad_v, grad_kernel


@dynamic_conv_backward.register_fake
def _(grad: torch.Tensor, v: torch.Tensor, kernel: torch.Tensor, before: int) -> tuple:
    return torch.empty(v.shape, device=v.device, dtype=v.dtype), torch.empty(kernel.shape, device=kernel.device,
                                                                             dtype=kernel.dtype)


def _dynamic_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    v, kernel, ctx.before = inputs
    ctx.save_for_backward(v, kernel)


def _dynamic_backward(ctx, grad: torch.Tensor) -> tuple:
    v, kernel = ctx.saved_tensors
    return *dynamic_conv_backward(grad, v, kernel, ctx.before), None


dynamic_conv.register_autograd(_dynamic_backward, setup_context=_dynamic_setup)


def reference_depthwise_conv(
        v: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, grid_h: int, pad_h: int, pad_w: int,
        prefix: int = 0, padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """``depthwise_conv`` by PyTorch's convolution (the reference the Triton kernels are tested against)."""
    if padding is not None:
        v = v.masked_fill(padding[..., None], 0.0)
    B, T, C = v.shape
    KH, KW = kernel.shape[:2]
    x = v[:, prefix:].reshape(B, grid_h, (T - prefix) // grid_h, C).permute(0, 3, 1, 2)
    x = torch.nn.functional.pad(x, (pad_w, KW - 1 - pad_w, pad_h, KH - 1 - pad_h))
    out = torch.nn.functional.conv2d(x, kernel.permute(2, 0, 1).unsqueeze(1), bias, groups=C)
    return torch.nn.functional.pad(out.permute(0, 2, 3, 1).reshape(B, T - prefix, C), (0, 0, prefix, 0))
