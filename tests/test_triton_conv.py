"""The Triton depthwise convolution, run on CPU by Triton's interpreter, against PyTorch's: forward and every
gradient, on each layout, in float32, bfloat16 and float16; and MUSE's convolution branch on it."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

from muse_lightning import MixerOptions, MUSEAttention, conv

triton_conv = pytest.importorskip("muse_lightning.triton_conv")  # triton ships with PyPI's torch
# conftest.py turns Triton's interpreter on before triton is imported, and the kernels run on CPU tensors; with
# TRITON_INTERPRET=0 on a GPU machine (scripts/gpu_check.sh) they are compiled and run on CUDA tensors.
DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else ["cuda"] * torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _full_float32(monkeypatch):
    """On a GPU the PyTorch references run in true float32, not TF32 (cuDNN's default for convolutions; matmuls
    are float32 by default)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

# (B, H, W, C, KH, KW, pad_h, pad_w): a sequence centred and causal, grids with 3 x 3 and 5 x 5 kernels; widths
# and channels that are not multiples of the tiles (16 tokens, 64 channels).
LAYOUTS = {
    "1d": (2, 1, 21, 70, 1, 5, 0, 2),
    "1d-causal": (2, 1, 21, 70, 1, 5, 0, 4),
    "2d-3x3": (2, 5, 6, 33, 3, 3, 1, 1),
    "2d-5x5": (1, 4, 17, 20, 5, 5, 2, 2),
}


# Tokens around the grid: none, or two prefix tokens (class / register) and padding marks scattered over the
# prefix and the grid (a padded token is read as zero by the convolution and gets no gradient).
MASKING = {"grid-only": (0, False), "prefix-padding": (2, True)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("masking", MASKING)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_conv_and_its_gradients_match_pytorch(layout, masking, dtype, device):
    B, H, W, C, KH, KW, ph, pw = LAYOUTS[layout]
    prefix, padded = MASKING[masking]
    gen = torch.Generator().manual_seed(0)
    T = prefix + H * W
    v, k, b = (torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_() for shape in
               ((B, T, C), (KH, KW, C), (C,)))
    padding = (torch.rand(B, T, generator=gen) < 0.3).to(device) if padded else None
    grad = torch.randn(B, T, C, generator=gen).to(device, dtype)
    out = triton_conv.depthwise_conv(v, k, b, H, ph, pw, prefix, padding)
    grads = torch.autograd.grad(out, (v, k, b), grad)
    # The reference in float32 from the same (rounded) inputs.
    v32, k32, b32 = (t.detach().float().requires_grad_() for t in (v, k, b))
    ref = triton_conv.reference_depthwise_conv(v32, k32, b32, H, ph, pw, prefix, padding)
    ref_grads = torch.autograd.grad(ref, (v32, k32, b32), grad.float())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.float(), ref, **tol)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), expected, **(tol if dtype == torch.float32 else dict(
            atol=0.02 * expected.abs().max().item(), rtol=0.02)))
    if prefix:
        assert not out[:, :prefix].any() and not grads[0][:, :prefix].any()
    if padded:
        assert not grads[0][padding].any() and 0 < padding.sum() < padding.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["1d", "2d-5x5"])
def test_kernel_rows_longer_than_the_unrolled_taps_run_in_chunks(monkeypatch, layout, device):
    # Rows of 5 taps, 2 unrolled at a time: chunks of 2 + 2 + 2, the last tap past the row's end masked.
    monkeypatch.setattr(triton_conv, "_ROW_TAPS", 2)
    B, H, W, C, KH, KW, ph, pw = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    T = 2 + H * W
    v, k, b = (torch.randn(*shape, generator=gen).to(device).requires_grad_() for shape in
               ((B, T, C), (KH, KW, C), (C,)))
    padding = (torch.rand(B, T, generator=gen) < 0.3).to(device)
    grad = torch.randn(B, T, C, generator=gen).to(device)
    out = triton_conv.depthwise_conv(v, k, b, H, ph, pw, 2, padding)
    ref = triton_conv.reference_depthwise_conv(v, k, b, H, ph, pw, 2, padding)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for got, expected in zip(torch.autograd.grad(out, (v, k, b), grad), torch.autograd.grad(ref, (v, k, b), grad)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["value-slice", "sequence-first"])
def test_triton_conv_reads_strided_values_where_they_lie(layout, device):
    # The value third of a fused (B, T, 3 C) projection (token stride 3 C), and (T, B, C) tokens seen batch-first
    # (batch stride C): read through their strides, as a contiguous copy would be.
    B, H, W, C, KH, KW, ph, pw = LAYOUTS["2d-3x3"]
    T = 1 + H * W
    gen = torch.Generator().manual_seed(0)
    if layout == "value-slice":
        base = torch.randn(B, T, 3 * C, generator=gen).to(device).requires_grad_()
        v = base[..., 2 * C:]
    else:
        base = torch.randn(T, B, C, generator=gen).to(device).requires_grad_()
        v = base.transpose(0, 1)
    assert not v.is_contiguous() and v.stride(-1) == 1
    k, b = (torch.randn(*shape, generator=gen).to(device).requires_grad_() for shape in ((KH, KW, C), (C,)))
    padding = (torch.rand(B, T, generator=gen) < 0.3).to(device)
    grad = torch.randn(B, T, C, generator=gen).to(device)
    out = triton_conv.depthwise_conv(v, k, b, H, ph, pw, 1, padding)
    ref = triton_conv.reference_depthwise_conv(v.contiguous(), k, b, H, ph, pw, 1, padding)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for got, expected in zip(torch.autograd.grad(out, (base, k, b), grad), torch.autograd.grad(ref, (base, k, b), grad)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("programs", [1, 4, 10_000], ids=["one-chunk", "partial-last-chunk", "tile-per-program"])
@pytest.mark.parametrize("layout", ["1d", "2d-3x3"])
def test_kernel_and_bias_gradients_are_exact_and_reproducible_however_tiles_are_chunked(monkeypatch, programs, layout,
                                                                                          device):
    # The token tiles, row after row: 2 sequences of 3 tiles (8 tokens; 2 channel tiles), or 2 x 5 grid rows of 2
    # tiles (4 tokens), in chunks of a power of two tiles. 1 program sums them all; 4 programs become chunks of 4
    # tiles in 1-D (4 + 2: the first crosses from the first sequence to the second, the last runs past the last
    # tile) and of 8 in 2-D (8 + 8 + 4: the second crosses from the first grid to the second); 10,000 programs
    # take a tile each.
    monkeypatch.setattr(triton_conv, "_GRAD_PROGRAMS", programs)
    B, H, W, C, KH, KW, ph, pw = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    v, k, b = (torch.randn(*shape, generator=gen).to(device).requires_grad_() for shape in
               ((B, 2 + H * W, C), (KH, KW, C), (C,)))
    padding = (torch.rand(B, 2 + H * W, generator=gen) < 0.3).to(device)
    grad = torch.randn(B, 2 + H * W, C, generator=gen).to(device)

    def grads(conv):
        return torch.autograd.grad(conv(v, k, b, H, ph, pw, 2, padding), (k, b), grad)

    got, again = grads(triton_conv.depthwise_conv), grads(triton_conv.depthwise_conv)
    for g, expected, repeat in zip(got, grads(triton_conv.reference_depthwise_conv), again):
        torch.testing.assert_close(g, expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(g, repeat)  # partial sums added in a fixed order: no atomics


@pytest.mark.parametrize("shape", [(1, 1, 2 ** 21, 384, 1, 63), (65_536, 1, 16, 64, 1, 5), (512, 224, 224, 96, 7, 7)],
                         ids=["2M-token-sequence", "65536-short-sequences", "512-grids-224x224"])
def test_kernel_launches_fit_cuda_grid_limits_and_the_partial_sums_stay_small(shape):
    # CUDA launches at most 2**31 - 1 programs on the first grid axis and 65,535 on the others; the kernel
    # gradient's partial sums are a fixed number of programs' worth, however long the sequence (on a GPU, not
    # the interpreter, an axis over its limit is a launch error).
    B, H, W, C, KH, KW = shape
    (tiles, channel_tiles), (grad_programs, grad_channel_tiles) = triton_conv._taps_grid(B, H, W, C), \
        triton_conv._grad_grid(B, H, W, C, KH, KW)[0]
    assert tiles < 2 ** 31 and grad_programs < 2 ** 31 and max(channel_tiles, grad_channel_tiles) <= 65_535
    assert tiles * triton_conv._TAPS_TILE[0] >= B * H * W and channel_tiles * triton_conv._TAPS_TILE[1] >= C
    assert grad_programs <= -(-triton_conv._GRAD_PROGRAMS // grad_channel_tiles)  # ceil(_GRAD_PROGRAMS / channel tiles)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["1d", "2d-5x5"])
def test_an_empty_batch_convolves_to_nothing_with_zero_kernel_and_bias_gradients(layout, device):
    # As PyTorch's convolution does with a batch of 0 (no programs launched, partial sums of no tiles).
    _, H, W, C, KH, KW, ph, pw = LAYOUTS[layout]
    v, k, b = (torch.randn(*shape, device=device).requires_grad_() for shape in ((0, 1 + H * W, C), (KH, KW, C), (C,)))
    out = triton_conv.depthwise_conv(v, k, b, H, ph, pw, 1, torch.zeros(0, 1 + H * W, dtype=torch.bool, device=device))
    grads = torch.autograd.grad(out.sum(), (v, k, b))
    assert out.shape == v.shape and grads[0].shape == v.shape
    assert not grads[1].any() and not grads[2].any()


# (B, N, heads, head width, taps, tokens before the output's): the default 15 taps centred over two token tiles
# with heads of 70 channels (two channel tiles, the second part of one), causal, anti-causal, one tap, a
# sequence shorter than the kernel, and a ViT-S head over a token tile and a part of one.
DYNAMIC = {
    "centred": (2, 40, 2, 70, 15, 7),
    "causal": (2, 21, 3, 5, 5, 4),
    "anti-causal": (1, 9, 2, 8, 3, 0),
    "one-tap": (3, 5, 2, 4, 1, 0),
    "shorter-than-kernel": (1, 7, 1, 3, 15, 14),
    "vit-s-head": (1, 37, 1, 64, 15, 7),
}


def _dynamic_inputs(case, dtype, kernel_dtype, device, strided=False):
    B, N, NH, D, W, before = DYNAMIC[case]
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(B, N, 3 * NH * D if strided else NH * D, generator=gen)[..., -NH * D:]  # the value slice of qkv
    kernel = torch.randn(B, N, NH, W, generator=gen).softmax(-1)
    return v.to(device, dtype).requires_grad_(), kernel.to(device, kernel_dtype).requires_grad_(), before


def _dynamic_reference(v, kernel, before, grad):
    """PyTorch's dynamic convolution (``conv._dynamic_conv``) and its gradients, in float64 from the same inputs."""
    B, N, C = v.shape
    v64, k64 = (t.detach().double().requires_grad_() for t in (v, kernel))
    out = conv._dynamic_conv(v64.reshape(B, N, kernel.shape[2], C // kernel.shape[2]), k64, before).reshape(B, N, C)
    return out, *torch.autograd.grad(out, (v64, k64), grad.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "kernel_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16)], ids=["fp32", "autocast", "bf16"])
@pytest.mark.parametrize("case", DYNAMIC)
def test_triton_dynamic_conv_and_its_gradients_match_pytorchs(case, dtype, kernel_dtype, device):
    # Under bf16 autocast the tokens are bf16 and the softmax kernels fp32: the output is fp32, as PyTorch's product.
    v, kernel, before = _dynamic_inputs(case, dtype, kernel_dtype, device, strided=case == "centred")
    out = triton_conv.dynamic_conv(v, kernel, before)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, out.dtype)
    grads = torch.autograd.grad(out, (v, kernel), grad)
    ref, *ref_grads = _dynamic_reference(v, kernel, before, grad)
    assert out.dtype == torch.promote_types(dtype, kernel_dtype) and [g.dtype for g in grads] == [dtype, kernel_dtype]
    for got, expected, got_dtype in zip((out, *grads), (ref, *ref_grads), (out.dtype, dtype, kernel_dtype)):
        tol = {"atol": 1e-5, "rtol": 1e-5} if got_dtype == torch.float32 else {
            "atol": 0.02 * expected.abs().max().item(), "rtol": 0.02}
        torch.testing.assert_close(got.double(), expected, **tol)
    # Each output is one program's sum in a fixed order: the same bits every run.
    again = torch.autograd.grad(triton_conv.dynamic_conv(v, kernel, before), (v, kernel), grad)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_kernels_longer_than_the_unrolled_taps_run_in_chunks(monkeypatch, device):
    # 15 taps, 4 unrolled at a time: chunks of 4 + 4 + 4 + 4, the last tap past the kernel's end masked.
    monkeypatch.setattr(triton_conv, "_ROW_TAPS", 4)
    v, kernel, before = _dynamic_inputs("centred", torch.float32, torch.float32, device)
    out = triton_conv.dynamic_conv(v, kernel, before)
    grad = torch.randn_like(out)
    ref, *ref_grads = _dynamic_reference(v, kernel, before, grad)
    for got, expected in zip((out, *torch.autograd.grad(out, (v, kernel), grad)), (ref, *ref_grads)):
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 9, 16), (2, 0, 16)], ids=["no-sequences", "no-tokens"])
def test_triton_dynamic_conv_of_nothing_is_empty_each_way(shape, device):
    v = torch.randn(*shape, device=device, requires_grad=True)
    kernel = torch.rand(*shape[:2], 2, 15, device=device, requires_grad=True)
    out = triton_conv.dynamic_conv(v, kernel, 7)
    grads = torch.autograd.grad(out.sum(), (v, kernel))
    assert out.shape == v.shape and grads[0].shape == v.shape and grads[1].shape == kernel.shape


# (kernel sizes, 2-D, causal): the default sizes centred and causal, 2-D grids of two and of four sizes (the gate's
# lanes padded to a power of two), sizes that are not 1, 3, 5; 200 channels, a channel tile and a part of one.
GATED = {
    "1d": ((1, 3, 5), False, False),
    "1d-causal": ((1, 3, 5), False, True),
    "1d-3-7": ((7, 3), False, False),
    "2d-3-5": ((3, 5), True, False),
    "2d-1-3-5-7": ((1, 3, 5, 7), True, False),
}


def _gated_inputs(sizes, two_d, dtype=torch.float32, device="cpu", C=200):
    gen = torch.Generator().manual_seed(0)
    kernels = [torch.randn(C, *(k,) * (1 + two_d), generator=gen) for k in sizes]
    bias, gate = torch.randn(len(sizes), C, generator=gen), torch.randn(len(sizes), generator=gen)
    return [t.to(device, dtype).requires_grad_() for t in kernels], *(t.to(device, dtype).requires_grad_() for t in (bias, gate))


def _packed(kernels):
    """The kernels flattened one after another, as the module hands them to ``gated_kernel``."""
    return torch.cat([k.flatten() for k in kernels])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gated", GATED)
def test_gate_collapse_and_its_kernel_bias_and_gate_gradients_match_pytorch(gated, dtype, device):
    sizes, two_d, causal = GATED[gated]
    kernels, bias, gate = _gated_inputs(sizes, two_d, dtype, device)
    kernel, kernel_bias = triton_conv.gated_kernel(_packed(kernels), sizes, bias, gate, two_d, causal)
    grad, grad_bias = torch.randn_like(kernel), torch.randn_like(kernel_bias)
    inputs = (*kernels, bias, gate)
    grads = torch.autograd.grad((kernel, kernel_bias), inputs, (grad, grad_bias))
    # PyTorch's collapse (conv._gated_kernel, the module's on its own backend) in float32, moved channels-last.
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    *kernels32, bias32, gate32 = inputs32
    weights = gate32.softmax(0)
    ref = conv._gated_kernel(kernels32, sizes, weights, causal, 2 if two_d else 1)
    ref, ref_bias = (ref if two_d else ref.unsqueeze(1)).permute(1, 2, 0), weights @ bias32
    ref_grads = torch.autograd.grad((ref, ref_bias), inputs32, (grad, grad_bias))
    assert kernel.dtype == kernel_bias.dtype == torch.float32 and [g.dtype for g in grads] == [dtype] * len(inputs)
    # Both collapse the same (rounded) weights in float32; the gradients are rounded to the weights' dtype.
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(kernel, ref, **tol)
    torch.testing.assert_close(kernel_bias, ref_bias, **tol)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), expected, **(tol if dtype == torch.float32 else {
            "atol": 0.02 * expected.abs().max().item(), "rtol": 0.02}))
    # One program sums over the channels in a fixed order: the gate's gradient reproduces bit for bit.
    again = torch.autograd.grad(triton_conv.gated_kernel(_packed(kernels), sizes, bias, gate, two_d, causal), inputs,
                                (grad, grad_bias))
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_ops_pass_torch_library_opcheck(layout, device):
    """Schema, fake (meta) kernels with the real outputs' shapes and strides, autograd registration, and AOT
    dispatch, for the op and its backward, on a value slice with a prefix token and padding."""
    B, H, W, C, KH, KW, ph, pw = LAYOUTS[layout]
    T = 1 + H * W
    v = torch.randn(B, T, 3 * C, device=device)[..., 2 * C:].requires_grad_()
    k, b = (torch.randn(*shape, device=device, requires_grad=True) for shape in ((KH, KW, C), (C,)))
    padding = torch.rand(B, T, device=device) < 0.3
    torch.library.opcheck(triton_conv.depthwise_conv, (v, k, b, H, ph, pw, 1, padding))
    torch.library.opcheck(triton_conv.depthwise_conv_backward,
                          (torch.randn(B, T, C, device=device), v.detach(), k.detach(), H, ph, pw, 1, padding))
    sizes, causal = (1, KH) if KH > 1 else (1, 3, KW), pw == KW - 1
    kernels, bias, gate = _gated_inputs(sizes, KH > 1, device=device, C=C)
    args = (_packed(kernels), sizes, bias, gate, KH > 1, causal)
    torch.library.opcheck(triton_conv.gated_kernel, args)
    grads = [torch.randn_like(t) for t in triton_conv.gated_kernel(*args)]
    torch.library.opcheck(triton_conv.gated_kernel_backward, (*grads, *(a.detach() if torch.is_tensor(a) else a for a in args)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "kernel_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "autocast"])
def test_triton_dynamic_ops_pass_torch_library_opcheck(dtype, kernel_dtype, device):
    """As above, for the dynamic convolution and its backward, on a value slice (bf16 tokens, fp32 kernels: an fp32
    output, as autocast gives)."""
    v, kernel, before = _dynamic_inputs("causal", dtype, kernel_dtype, device, strided=True)
    torch.library.opcheck(triton_conv.dynamic_conv, (v, kernel, before))
    grad = torch.randn(v.shape, device=device, dtype=torch.promote_types(dtype, kernel_dtype))
    torch.library.opcheck(triton_conv.dynamic_conv_backward, (grad, v.detach(), kernel.detach(), before))

@pytest.mark.parametrize("device", DEVICES)
def test_triton_conv_compiles_fullgraph_forward_and_backward(device):
    B, H, W, C, KH, KW, ph, pw = LAYOUTS["2d-3x3"]
    v = torch.randn(B, 1 + H * W, C, device=device, requires_grad=True)
    k, b = torch.randn(KH, KW, C, device=device), torch.randn(C, device=device)
    padding = torch.zeros(B, 1 + H * W, dtype=torch.bool, device=device)
    padding[0, -4:] = True
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: triton_conv.depthwise_conv(v, k, b, H, ph, pw, 1, padding), fullgraph=True)
    out = compiled(v)
    (grad,) = torch.autograd.grad(out.square().sum(), v)
    v2 = v.detach().requires_grad_()
    ref = triton_conv.reference_depthwise_conv(v2, k, b, H, ph, pw, 1, padding)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), v2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-3, rtol=1e-4)


def test_triton_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"kernel \(KH, KW, C\)"):  # (C, KH, KW), PyTorch's layout
        triton_conv.depthwise_conv(torch.randn(1, 6, 4), torch.randn(4, 1, 3), torch.randn(4), 1, 0, 1)
    with pytest.raises(ValueError, match="grid_h=4 does not divide the 6 tokens"):
        triton_conv.depthwise_conv(torch.randn(1, 6, 4), torch.randn(3, 3, 4), torch.randn(4), 4, 1, 1)
    with pytest.raises(ValueError, match="prefix=6 must leave tokens to convolve of the 6"):
        triton_conv.depthwise_conv(torch.randn(1, 6, 4), torch.randn(1, 3, 4), torch.randn(4), 1, 0, 1, 6)
    with pytest.raises(ValueError, match=r"padding must be a bool \(B, N\) = \(1, 6\) tensor, got torch.float32"):
        triton_conv.depthwise_conv(torch.randn(1, 6, 4), torch.randn(1, 3, 4), torch.randn(4), 1, 0, 1, 0,
                                   torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"gated_kernel takes the kernels \(C, k\) \(or \(C, k, k\) if two_d\) of odd"):
        triton_conv.gated_kernel(torch.randn(4 * 7), [3, 4], torch.randn(2, 4), torch.randn(2))  # an even size
    with pytest.raises(ValueError, match=r"got \(24,\), \[1, 5\], \(2, 4\) and \(2,\)"):  # 1-D sizes, 2-D taps
        triton_conv.gated_kernel(torch.randn(4 * 6), [1, 5], torch.randn(2, 4), torch.randn(2), True)
    with pytest.raises(ValueError, match="causal is not defined for 2-D kernels"):
        triton_conv.gated_kernel(torch.randn(4 * 9), [3], torch.randn(1, 4), torch.randn(1), True, True)
    with pytest.raises(ValueError, match=r"kernel \(B, N, H, W\) with H dividing C, got \(1, 6, 4\) and \(1, 6, 3, 5\)"):
        triton_conv.dynamic_conv(torch.randn(1, 6, 4), torch.randn(1, 6, 3, 5), 2)
    with pytest.raises(ValueError, match=r"got \(1, 6, 4\) and \(1, 5, 2, 5\)"):  # a kernel per token
        triton_conv.dynamic_conv(torch.randn(1, 6, 4), torch.randn(1, 5, 2, 5), 2)
    with pytest.raises(ValueError, match=r"before=5 must be in \[0, 5\), the kernel's taps"):
        triton_conv.dynamic_conv(torch.randn(1, 6, 4), torch.randn(1, 6, 2, 5), 5)


def _mixer(**options) -> dict:
    """``MUSEAttention``'s ``mixer`` argument: kernel sizes (1, 3, 5) unless ``options`` say otherwise."""
    return {"mixer": MixerOptions(**{"kernel_sizes": (1, 3, 5), **options})}


@pytest.mark.parametrize(("options", "call"), [
    (_mixer(conv_layout="1d"), dict(key_padding_mask=torch.tensor([[False] * 10 + [True] * 3, [False] * 13]))),
    (_mixer(conv_layout="1d"), dict(is_causal=True)),
    (dict(_mixer(conv_layout="2d"), num_prefix_tokens=1), dict(grid_size=(3, 4))),
    (_mixer(conv_layout="1d", conv_proj="per_kernel"), {}),
    (dict(_mixer(conv_layout="1d", conv_proj="per_kernel"), num_prefix_tokens=2),
     dict(key_padding_mask=torch.tensor([[False] * 9 + [True] * 4, [True] + [False] * 12]))),
    # The dynamic convolution at its default sizes (3, 15): more taps than the 13 tokens.
    (_mixer(conv_type="dynamic", kernel_sizes=(3, 15)),
     dict(key_padding_mask=torch.tensor([[False] * 10 + [True] * 3, [False] * 13]))),
    (dict(_mixer(conv_type="dynamic", kernel_sizes=(3, 15)), num_prefix_tokens=1), dict(is_causal=True)),
    (_mixer(conv_type="dynamic", kernel_sizes=(1, 3, 7), conv_proj="per_kernel"), {}),
], ids=["padding", "causal", "2d-prefix", "per-kernel", "per-kernel-prefix-padding", "dynamic-padding",
        "dynamic-causal-prefix", "dynamic-per-kernel"])
@pytest.mark.parametrize("device", DEVICES)
def test_muse_attention_on_the_triton_backend_equals_the_pytorch_one(monkeypatch, options, call, device):
    torch.manual_seed(0)
    mixer = MUSEAttention(32, num_heads=4, **options).to(device)
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.2)  # a trained branch: gate, kernels and projections all matter
    x = torch.randn(2, 13, 32, device=device)
    call = {k: v.to(device) if torch.is_tensor(v) else v for k, v in call.items()}

    def run():
        mixer.zero_grad()
        out = mixer(x, **call)
        out.square().sum().backward()
        return out, {n: p.grad.clone() for n, p in mixer.named_parameters()}

    ref, ref_grads = run()
    monkeypatch.setattr(conv, "CONV_BACKEND", "triton")
    out, grads = run()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and any(".gate" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("conv_type", "op"), [("static", "depthwise_conv"), ("dynamic", "dynamic_conv")])
def test_compiled_muse_attention_on_the_triton_backend_matches_eager_pytorch(monkeypatch, conv_type, op, device):
    """fullgraph: the op (handed the value slice of the fused qkv projection, a prefix token and padding) is one
    node of the graph, forward and backward."""
    torch.manual_seed(0)
    mixer = MUSEAttention(32, num_heads=4, mixer=MixerOptions(conv_type=conv_type), num_prefix_tokens=1).to(device)
    x = torch.randn(2, 13, 32, device=device, requires_grad=True)
    padding = torch.tensor([[False] * 10 + [True] * 3, [False] * 13], device=device)
    expected = mixer(x, key_padding_mask=padding)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    monkeypatch.setattr(conv, "CONV_BACKEND", "triton")
    torch._dynamo.reset()
    ops = []

    def inductor(graph, inputs):  # Inductor, after noting the graph's ops
        ops.extend(str(node.target) for node in graph.graph.nodes)
        return compile_fx(graph, inputs)

    out = torch.compile(mixer, fullgraph=True, backend=inductor)(x, key_padding_mask=padding)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert f"muse_lightning.{op}.default" in ops
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-4)

@pytest.mark.parametrize("device", DEVICES)
def test_ddp_trains_muse_on_the_triton_backend_as_plain_training_on_pytorchs(monkeypatch, tmp_path, device):
    """Every parameter gets its gradient through the op (DDP without find_unused_parameters fails on the second
    step if one does not), and three DDP steps on Triton's convolution end where three plain ones on PyTorch's do."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    x = torch.randn(2, 13, 32, device=device)
    padding = torch.tensor([[False] * 10 + [True] * 3, [False] * 13], device=device)
    calls = []
    op = triton_conv.depthwise_conv
    monkeypatch.setattr(triton_conv, "depthwise_conv", lambda *args: calls.append(1) or op(*args))

    def train(backend, wrap):
        monkeypatch.setattr(conv, "CONV_BACKEND", backend)
        torch.manual_seed(0)
        mixer = MUSEAttention(32, num_heads=4, **_mixer(), num_prefix_tokens=1).to(device)
        model = wrap(mixer)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            model(x, key_padding_mask=padding).square().mean().backward()
            opt.step()
        return mixer.state_dict()

    expected = train("torch", lambda m: m)
    assert not calls
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)  # CUDA too
    try:
        got = train("triton", lambda m: DistributedDataParallel(m, find_unused_parameters=False))
    finally:
        dist.destroy_process_group()
    assert len(calls) == 3
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("patch_drop_rate", [0.0, 0.5], ids=["all-patches", "patch-dropout"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_swapped_timm_vit_on_the_triton_backend_equals_the_pytorch_one(monkeypatch, patch_drop_rate, device):
    """A class token and the 2-D grid handed to the op (all patches), or the scatter path (patch dropout)."""
    import timm

    from muse_lightning import swap_attention

    torch.manual_seed(0)
    model = swap_attention(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                             num_classes=5, patch_drop_rate=patch_drop_rate)).to(device).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".muse." in name:
                p.normal_(0, 0.2)  # a trained branch
    x = torch.randn(2, 3, 32, 32, device=device)

    def run():
        model.zero_grad()
        torch.manual_seed(1)  # the same patches dropped, the same dropout draws
        out = model(x)
        out.square().sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if ".muse." in n}

    ref, ref_grads = run()
    monkeypatch.setattr(conv, "CONV_BACKEND", "triton")
    out, grads = run()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)

# Compiles every kernel variant the op launches (forward, input gradient, kernel gradient; with and without
# padding; bf16 and fp32) down to a Hopper cubin with Triton's real compiler, which needs no GPU: the
# interpreter above runs the kernels' Python, this checks that the GPU compiler accepts them and that, up to
# 31-tap sequence kernels and 9 x 9 grid kernels, none spills more than 32 bytes of registers per thread (a few
# registers' worth) to local memory, by ptxas's count, compiled as a launch with 16-divisible widths and strides
# (a ViT's) specialises them and as one without: with their kernel rows unrolled the 9 x 9 forward and
# input-gradient kernels spilled 2,084 to 2,576 bytes unspecialised and 104 to 372 specialised; now Triton 3.8
# spills at most 8 bytes, 3.6 none. Specialised, every load but the padding mask's bytes must be a vector
# load (with the kernel in PyTorch's (C, KH, KW) layout each tap's weights loaded one channel at a time).
# The dynamic convolution's three kernels too (15 and 31 taps, bf16 and fp32): no spills past 32 bytes, and vector
# loads of tokens and gradients where aligned (its per-token kernel weights load one per token by design).
# Prints each kernel's registers (pytest -s).
_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import re, subprocess, tempfile
    from itertools import product
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from muse_lightning import triton_conv as tc

    def resources(ptx):  # registers per thread and bytes spilled, as ptxas (shipped with Triton) reports them
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            log = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name", "sm_90a", f.name, "-o",
                                  "/dev/null"], capture_output=True, text=True, check=True).stderr
        return int(re.search(r"Used (\\d+) registers", log)[1]), int(re.search(r"(\\d+) bytes spill stores", log)[1])

    ints = {"H": "i32", "W": "i32", "C": "i32", "P": "i32"}
    # What a launch specialises as multiples of 16 where they are (a ViT's widths and strides, aligned pointers):
    # each kernel is compiled both ways, as such a launch and as one with no such specialisation.
    ALIGNED = ("src_ptr", "kernel_ptr", "bias_ptr", "out_ptr", "v_ptr", "grad_ptr", "pad_ptr", "part_ptr", "C",
               "src_sb", "src_st", "v_sb", "v_st")
    # (KH, KW, dtypes): every dtype and padding case at 3 x 3, the largest kernels in bf16.
    sizes = [(3, 3, ("bf16", "fp32")), (1, 31, ("bf16",)), (9, 9, ("bf16",))]
    spills, scalar_loads = [], []
    for kh, kw, dtypes in sizes:
        for dtype in dtypes:
            for flip in (False, True):
                for has_pad in (False, True):
                    ptrs = {n: "*" + dtype for n in ("src_ptr", "kernel_ptr", "bias_ptr", "out_ptr")}
                    consts = dict(PAD_H=kh // 2, PAD_W=kw // 2, KH=kh, KW=kw, HAS_PAD=has_pad)
                    jobs = [("input gradient" if flip else "forward", tc._taps, tc._TAPS_TILE,
                             {**ptrs, "pad_ptr": "*u8", **ints, "src_sb": "i32", "src_st": "i32"},
                             {**consts, "FLIP": flip, "ROW_TAPS": min(kw, tc._ROW_TAPS)})]
                    if not flip:
                        taps, block_w = tc._grad_block(kh, kw)
                        jobs.append(("kernel gradient", tc._kernel_grad, (block_w, *tc._GRAD_TILE[1:]),
                                     {"v_ptr": "*" + dtype, "grad_ptr": "*" + dtype, "pad_ptr": "*u8",
                                      "part_ptr": "*fp32", "R": "i32", **ints, "v_sb": "i32", "v_st": "i32"},
                                     {**consts, "ITEMS": 16, "TAPS": taps}))
                    for (name, fn, (block_w, block_c, warps), signature, consts), aligned in product(jobs, (False, True)):
                        consts = {**consts, "BLOCK_W": block_w, "BLOCK_C": block_c}
                        signature = {**signature, **{k: "constexpr" for k in consts}}
                        constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
                        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED
                                 if a in fn.arg_names} if aligned else None
                        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                                target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                        assert kernel.asm["cubin"], fn
                        registers, spilled = resources(kernel.asm["ptx"])
                        label = f"{name} {kh}x{kw} {dtype}{' padding' * has_pad}{' aligned' * aligned}"
                        print(f"{label}: {registers} registers, {spilled} bytes spilled", flush=True)
                        if spilled > 32:
                            spills.append(f"{label}: {spilled} bytes")
                        # Aligned, every load of tokens, gradients, kernel taps and bias is a vector load; only
                        # the padding mask's bytes load one by one.
                        scalar = re.findall(r"ld\\.global\\.(?!v\\d|b8|u8)[\\w.]+", kernel.asm["ptx"])
                        if aligned and scalar:
                            scalar_loads.append(f"{label}: {len(scalar)} x {scalar[0]}")
    # The dynamic convolution's three kernels at 15 and 31 taps (two chunks of 16), ViT heads of 64 channels. Its
    # per-token kernel weights load one per token (a head's channels share them); aligned, the tokens' and
    # gradients' loads must be vector loads.
    for kw, dtype in product((15, 31), ("bf16", "fp32")):
        p = "*" + dtype
        row_taps = min(kw, tc._ROW_TAPS)
        block_n, block_d, warps = tc._DYNAMIC_TILE
        dyn_ints = {"N": "i32", "NH": "i32", "D": "i32"}
        jobs = [(name, tc._dynamic_taps, {"src_ptr": p, "kernel_ptr": "*fp32", "out_ptr": p, **dyn_ints,
                                          "src_sb": "i32", "src_st": "i32"}, {"FLIP": flip})
                for name, flip in (("dynamic forward", False), ("dynamic input gradient", True))]
        jobs.append(("dynamic kernel gradient", tc._dynamic_kernel_grad, {"v_ptr": p, "grad_ptr": p, "out_ptr": "*fp32",
                     **dyn_ints, "v_sb": "i32", "v_st": "i32"}, {"TAPS": triton.next_power_of_2(kw)}))
        for (name, fn, signature, consts), aligned in product(jobs, (False, True)):
            consts = {**consts, "BEFORE": kw // 2, "KW": kw, "ROW_TAPS": row_taps, "BLOCK_N": block_n, "BLOCK_D": block_d}
            constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
            attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in
                     ("src_ptr", "kernel_ptr", "out_ptr", "v_ptr", "grad_ptr", "D", "src_sb", "src_st", "v_sb", "v_st")
                     if a in fn.arg_names} if aligned else None
            kernel = triton.compile(ASTSource(fn, {**signature, **{k: "constexpr" for k in consts}}, constexprs, attrs),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            registers, spilled = resources(kernel.asm["ptx"])
            label = f"{name} {kw} taps {dtype}{' aligned' * aligned}"
            vector = len(re.findall(r"ld\.global\.(?:\w+\.)*v\d", kernel.asm["ptx"]))
            print(f"{label}: {registers} registers, {spilled} bytes spilled, {vector} vector loads", flush=True)
            if spilled > 32:
                spills.append(f"{label}: {spilled} bytes")
            if aligned and not vector:
                scalar_loads.append(f"{label}: no vector load")
    # The gate collapse and its gradient (tiny: a few KB of weights, their per-channel loads strided by design), up
    # to five 2-D sizes (a 9 x 9 kernel).
    for sizes, two_d in (((1, 3, 5), False), ((3, 5), True), ((1, 3, 5, 7, 9), True)):
        for dtype in ("bf16", "fp32"):
            p = "*" + dtype
            consts = {**tc._collapse_args(list(sizes), two_d), "CAUSAL": False}
            jobs = [("gate collapse", tc._collapse, {"kernels_ptr": p, "bias_ptr": p, "gate_ptr": p, "out_ptr": "*fp32",
                                                     "out_bias_ptr": "*fp32", "C": "i32"}),
                    ("gate collapse gradient", tc._collapse_grad,
                     {"kernels_ptr": p, "bias_ptr": p, "gate_ptr": p, "grad_ptr": "*fp32", "grad_bias_ptr": "*fp32",
                      "kernels_grad_ptr": p, "bias_grad_ptr": p, "gate_grad_ptr": p, "C": "i32"})]
            for name, fn, signature in jobs:
                consts, warps = (({**tc._collapse_grad_args(list(sizes), two_d, 384), "CAUSAL": False}, 4)
                                 if fn is tc._collapse_grad else (consts, tc._COLLAPSE_BLOCK_C // 32))
                constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
                kernel = triton.compile(ASTSource(fn, {**signature, **{k: "constexpr" for k in consts}}, constexprs),
                                        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                registers, spilled = resources(kernel.asm["ptx"])
                label = f"{name} {sizes}{' 2-D' * two_d} {dtype}"
                print(f"{label}: {registers} registers, {spilled} bytes spilled", flush=True)
                if spilled > 32:
                    spills.append(f"{label}: {spilled} bytes")
    assert not spills, spills
    assert not scalar_loads, scalar_loads
    print("compiled")
""")


def test_triton_kernels_compile_for_a_hopper_gpu_fit_in_its_registers_and_load_vectors():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout)
    assert done.returncode == 0 and done.stdout.strip().endswith("compiled"), done.stderr[-3000:]
