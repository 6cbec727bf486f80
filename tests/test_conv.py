"""The multi-scale convolutions: the collapsed kernel is the gated sum of the per-size kernels."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from muse_lightning import MultiScaleDepthwiseConv, MultiScaleDynamicConv
from muse_lightning.conv import _depthwise_conv2d, _dynamic_conv, _DynamicConv, _WideDepthwiseConv2d


def _randomised(conv):
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_()
    return conv


CONVS = {
    "static": lambda: MultiScaleDepthwiseConv(12, (1, 3, 7)),
    "dynamic": lambda: MultiScaleDynamicConv(12, num_heads=3, kernel_sizes=(1, 3, 7)),
}


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", CONVS)
def test_collapsed_kernel_equals_gated_sum_of_kernel_sizes(kind, is_causal):
    conv = _randomised(CONVS[kind]())
    v = torch.randn(2, 10, 12)
    torch.testing.assert_close(conv(v, is_causal), conv.forward_per_kernel(v, is_causal).sum(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_static_kernel_matches_a_reference_conv1d(is_causal):
    """Each size-k kernel is centred (or, causal, ends on the output token); outside tokens read as 0."""
    conv = _randomised(MultiScaleDepthwiseConv(12, (5,)))
    v = torch.randn(2, 10, 12)
    pad = (4, 0) if is_causal else (2, 2)
    ref = F.conv1d(F.pad(v.transpose(1, 2), pad), conv.weight[0].unsqueeze(1), conv.bias[0], groups=12)
    torch.testing.assert_close(conv(v, is_causal), ref.transpose(1, 2))


def _wide_conv_inputs(grid, width, dtype=torch.float64, channels=5):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(2, *grid, channels, generator=gen).to(dtype).permute(0, 3, 1, 2).requires_grad_()  # channels-last
    kernel = torch.randn(channels, 1, width, width, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(channels, generator=gen).to(dtype).requires_grad_()
    return x, kernel, bias, torch.randn(2, channels, *grid, generator=gen).to(dtype)


@pytest.mark.parametrize(("grid", "width"), [((3, 4), 5), ((6, 9), 7), ((2, 2), 5), ((1, 3), 9)],
                         ids=["5x5", "7x7", "grid-smaller-than-kernel", "9x9-one-row"])
def test_wide_2d_kernel_gradient_in_column_pieces_equals_pytorchs(grid, width):
    """On CPU a ``k x k`` kernel more than 3 wide takes its kernel gradient in column pieces
    (``_WideDepthwiseConv2d``, for oneDNN's depthwise kernel): the output and every gradient as PyTorch's
    convolution gives them, with and without a bias, in float64; double backward too."""
    x, kernel, bias, grad = _wide_conv_inputs(grid, width)
    for b in (bias, None):
        out, ref = _depthwise_conv2d(x, kernel, b), F.conv2d(x, kernel, b, padding=width // 2, groups=5)
        assert type(out.grad_fn).__name__ == "_WideDepthwiseConv2dBackward"
        torch.testing.assert_close(out, ref)
        inputs = (x, kernel) if b is None else (x, kernel, b)
        for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
            torch.testing.assert_close(got, want)
    assert torch.autograd.gradgradcheck(_WideDepthwiseConv2d.apply, (x, kernel, bias))


def test_wide_2d_kernel_under_bf16_autocast_runs_as_pytorchs_convolution():
    """Under CPU autocast the convolution runs in bf16 and each gradient comes back in its input's dtype, as
    autograd's cast of PyTorch's convolution gives them."""
    x, kernel, bias, grad = _wide_conv_inputs((6, 6), 5, torch.float32, channels=16)
    with torch.autocast("cpu", torch.bfloat16):
        out = _depthwise_conv2d(x, kernel, bias)
        ref = F.conv2d(x, kernel, bias, padding=2, groups=16)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    got, want = torch.autograd.grad(out, (x, kernel, bias), grad), torch.autograd.grad(ref, (x, kernel, bias), grad)
    assert [g.dtype for g in got] == [torch.float32] * 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=5e-2, rtol=2e-2)


def test_one_d_convolution_runs_down_a_column():
    """The 1-D layout's sequence runs down the channels-last tensor's height with a ``(k, 1)`` kernel, which
    oneDNN's depthwise kernel takes each way (a ``(1, k)`` row of 5 or more taps fell to its generic grouped path
    for the kernel gradient): the one convolution it runs has its kernel that way round."""
    conv = _randomised(MultiScaleDepthwiseConv(12, (1, 3, 5)))
    with _ConvolutionKernels() as mode:
        conv(torch.randn(2, 10, 12))
    assert mode.shapes == [(12, 1, 5, 1)]


class _ConvolutionKernels(TorchDispatchMode):
    """The kernel shapes of the ATen convolutions run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


def test_dynamic_kernels_are_softmax_normalised_per_token_and_head():
    conv = _randomised(MultiScaleDynamicConv(12, num_heads=3, kernel_sizes=(3, 5)))
    kernels = conv._kernels(torch.randn(2, 10, 12))
    assert [k.shape for k in kernels] == [(2, 10, 3, 3), (2, 10, 3, 5)]
    for k in kernels:
        torch.testing.assert_close(k.sum(-1), torch.ones(2, 10, 3))


def test_dynamic_kernel_depends_on_the_input():
    conv = _randomised(MultiScaleDynamicConv(12, num_heads=3, kernel_sizes=(3,)))
    v = torch.randn(1, 6, 12)
    assert not torch.allclose(conv._kernels(v)[0], conv._kernels(v * 2)[0])


def test_single_kernel_size_has_no_gate():
    assert MultiScaleDepthwiseConv(8, (3,)).gate is None
    assert MultiScaleDynamicConv(8, 2, (3,)).gate is None


class _TokenSizedOps(TorchDispatchMode):
    """Names of the ATen ops run under it (not views) that make a tensor of at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and any(isinstance(t, torch.Tensor) and t.numel() >= self.numel for t in tree_leaves(out)):
            self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("prefix", [0, 1], ids=["no-prefix", "class-token"])
@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_static_convolution_copies_the_tokens_only_around_prefix_tokens(layout, prefix):
    """Forward and backward, the ops that make a tensor the size of the tokens: without prefix tokens only the
    convolution's own (the tokens and their gradient reach it and come back as views: indexing the 1-D output's
    unit row used to copy the gradient), with them one copy each way (the output after its zero prefix rows, a
    concatenation whose backward is a view, where a pad's copied the gradient once more; the gradient of the
    tokens after the prefix into the whole sequence's). On a GPU each is a pass over the whole tensor."""
    conv = _randomised(MultiScaleDepthwiseConv(12, (1, 3), layout))
    v = torch.randn(2, prefix + 16, 12, requires_grad=True)
    with _TokenSizedOps(2 * 16 * 12) as mode:
        conv(v, grid_size=(4, 4) if layout == "2d" else None, num_prefix_tokens=prefix).sum().backward()
    expected = ["convolution", "cat", "convolution_backward", "slice_backward"] if prefix else \
        ["convolution", "convolution_backward"]
    assert mode.ops == expected


def _dynamic_sum(v, kernel, before):
    """The dynamic convolution as autograd's graph of its sum: the tokens zero-padded, one product a tap."""
    N, W = v.shape[1], kernel.shape[-1]
    x = F.pad(v, (0, 0, 0, 0, before, W - 1 - before))
    return sum(x[:, j:j + N] * kernel[..., j, None] for j in range(W))


@pytest.mark.parametrize(("width", "before"), [(1, 0), (3, 1), (5, 2), (5, 4), (7, 0)],
                         ids=["1-tap", "centred-3", "centred-5", "causal-5", "anti-causal-7"])
def test_dynamic_convolution_and_its_gradients_equal_autograds_sum(width, before):
    """The hand-written backward (in-place taps, the kernel gradient as one batched product over overlapping
    windows of the sequences laid end to end) against autograd's, in float64; double backward too."""
    gen = torch.Generator().manual_seed(width + before)
    v = torch.randn(3, 9, 2, 4, dtype=torch.float64, generator=gen)[:, 1:].requires_grad_()  # a view: offset
    kernel = torch.randn(3, 8, 2, width, dtype=torch.float64, generator=gen, requires_grad=True)
    out = _DynamicConv.apply(v, kernel, before)
    torch.testing.assert_close(out, _dynamic_sum(v, kernel, before))
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (v, kernel), grad),
                         torch.autograd.grad(_dynamic_sum(v, kernel, before), (v, kernel), grad)):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradgradcheck(lambda v, k: _DynamicConv.apply(v, k, before), (v, kernel))


@pytest.mark.parametrize("device", ["cpu"] + ["cuda"] * torch.cuda.is_available())
def test_dynamic_convolution_of_a_vit_batch_equals_autograds_sum(device):
    """64 sequences of 197 tokens, 6 heads, 15 taps: the kernel gradient's batched product runs 80,940 windows,
    more than CUDA's grid takes along one of its short axes (65,535), as cuBLAS gets it at a ViT's batch
    (``scripts/gpu_check.sh`` runs this file on the GPU)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(64, 197, 6, 8, generator=gen).to(device).requires_grad_()
    kernel = torch.randn(64, 197, 6, 15, generator=gen).softmax(-1).to(device).requires_grad_()
    out = _DynamicConv.apply(v, kernel, 7)
    ref = _dynamic_sum(v, kernel, 7)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=gen).to(device)
    for got, want in zip(torch.autograd.grad(out, (v, kernel), grad), torch.autograd.grad(ref, (v, kernel), grad)):
        torch.testing.assert_close(got, want)


def test_dynamic_convolution_of_bf16_tokens_and_fp32_kernels_keeps_each_dtype():
    """As under autocast (bf16 values, softmax kernels in float32): a float32 output, each gradient in its
    input's dtype, all as the float64 sum gives them."""
    v = torch.randn(2, 12, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    kernel = torch.randn(2, 12, 3, 5).softmax(-1).requires_grad_()
    out = _DynamicConv.apply(v, kernel, 2)
    assert out.dtype == torch.float32
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (v, kernel), grad)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32]
    v64, k64 = v.detach().double().requires_grad_(), kernel.detach().double().requires_grad_()
    ref = _dynamic_sum(v64, k64, 2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, (v64, k64), grad.double())):
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["no-sequences", "no-tokens"])
def test_dynamic_convolution_of_nothing_is_empty_each_way(shape):
    v = torch.randn(*shape, 2, 4, requires_grad=True)
    kernel = torch.randn(*shape, 2, 5, requires_grad=True)
    out = _DynamicConv.apply(v, kernel, 2)
    out.sum().backward()
    assert out.shape == v.shape and v.grad.shape == v.shape and kernel.grad.shape == kernel.shape


def test_dynamic_convolution_is_one_batched_product_each_way():
    """Forward and backward, the ops that make a tensor the size of the tokens: the padded tokens and one batched
    product over their windows; back, the padded gradient, one batched product for the input gradient, and the
    padded tokens that the kernel gradient's batched product reads (its output is the kernels' size): no op a
    tap. Autograd's graph of the same sum makes a zero-filled buffer and a copy of every tap's gradient slice
    (``slice_backward``), and an add to sum each into the rest."""
    v = torch.randn(2, 16, 1, 12, requires_grad=True)
    kernel = torch.randn(2, 16, 1, 7, requires_grad=True)  # smaller than the tokens: not counted
    with _TokenSizedOps(v.numel()) as mode:
        torch.autograd.grad(_dynamic_conv(v, kernel, 3).sum(), (v, kernel))
    padded = ["new_empty", "copy_"]
    assert mode.ops == padded + ["bmm"] + padded + ["bmm"] + padded
    with _TokenSizedOps(v.numel()) as mode:
        _dynamic_sum(v, kernel, 3).sum().backward()
    assert mode.ops.count("slice_backward") == 7


def test_dynamic_convolution_under_autocast_reads_its_windows_in_place():
    """Under bf16 autocast (bf16 tokens, fp32 softmax kernels) the products stay in the promoted dtype, as the
    Triton backend's: autocast's own cast of the overlapping windows would copy every token once a tap."""
    v = torch.randn(2, 16, 2, 8, dtype=torch.bfloat16, requires_grad=True)
    kernel = torch.randn(2, 16, 2, 7).softmax(-1).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16), _TokenSizedOps(2 * v.numel()) as mode:
        out = _dynamic_conv(v, kernel, 3)
        out.square().sum().backward()
    assert out.dtype == torch.float32 and mode.ops == []


def test_dynamic_convolution_is_one_fx_node():
    """``torch.fx`` cannot run an autograd Function on proxies: the convolution is a leaf of the graph (timm's
    and torchvision's feature extractors trace through ``torch.fx``), and the traced module computes the same."""
    conv = _randomised(MultiScaleDynamicConv(12, num_heads=3, kernel_sizes=(3, 5)))
    graph = torch.fx.symbolic_trace(conv, concrete_args={"is_causal": True, "key_padding_mask": None,
                                                         "num_prefix_tokens": 1})
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"].count(_dynamic_conv) == 1
    v = torch.randn(2, 10, 12)
    torch.testing.assert_close(graph(v, True, None, 1), conv(v, is_causal=True, num_prefix_tokens=1))


@pytest.mark.parametrize("kind", ["dynamic", "static-2d-5x5"])
def test_hand_written_backwards_give_per_sample_gradients_under_torch_func(kind):
    """``torch.func.vmap`` over ``grad`` (per-sample gradients, as differential-privacy training takes them) runs
    the hand-written forwards and backwards (the dynamic convolution's, the wide 2-D kernel's on CPU) under
    ``vmap``, and each sample's gradient is the one its own backward gives."""
    from torch.func import functional_call, grad, vmap
    if kind == "dynamic":
        conv, kwargs = MultiScaleDynamicConv(12, num_heads=3, kernel_sizes=(1, 3, 5)), {}
    else:
        conv, kwargs = MultiScaleDepthwiseConv(12, (1, 3, 5), "2d"), {"grid_size": (3, 3), "num_prefix_tokens": 1}
    conv = _randomised(conv)
    v = torch.randn(4, 10, 12)
    params = dict(conv.named_parameters())
    per_sample = vmap(grad(lambda p, x: functional_call(conv, p, (x[None],), kwargs).square().sum()),
                      (None, 0))(params, v)
    for i in range(len(v)):
        conv.zero_grad()
        conv(v[i:i + 1], **kwargs).square().sum().backward()
        for name, p in conv.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad)
