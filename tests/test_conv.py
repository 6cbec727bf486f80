"""The multi-scale convolutions: the collapsed kernel is the gated sum of the per-size kernels."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from muse_lightning import MultiScaleDepthwiseConv, MultiScaleDynamicConv


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
