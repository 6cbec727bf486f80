"""The 2-D convolution layout: k x k kernels over the patch grid, prefix tokens attention-only."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_mixer
from timm.layers import Attention

from muse_lightning import MixerOptions, MUSEAttention, MUSEBlock, MultiScaleDepthwiseConv

TWO_D = MixerOptions(conv_layout="2d")


def _randomised(conv):
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_()
    return conv


def test_2d_kernel_matches_a_reference_conv2d_over_the_grid():
    conv = _randomised(MultiScaleDepthwiseConv(6, (3,), layout="2d"))
    v = torch.randn(2, 4 * 5, 6)
    ref = F.conv2d(v.view(2, 4, 5, 6).permute(0, 3, 1, 2), conv.weight[0].unsqueeze(1), conv.bias[0], padding=1, groups=6)
    torch.testing.assert_close(conv(v, grid_size=(4, 5)), ref.permute(0, 2, 3, 1).reshape(2, 20, 6))


def test_2d_collapsed_kernel_equals_gated_sum_of_kernel_sizes():
    conv = _randomised(MultiScaleDepthwiseConv(6, (1, 3, 5), layout="2d"))
    v = torch.randn(2, 6 * 7, 6)
    torch.testing.assert_close(conv(v, grid_size=(6, 7)), conv.forward_per_kernel(v, grid_size=(6, 7)).sum(2),
                               atol=1e-5, rtol=1e-5)


def test_2d_convolution_reaches_grid_neighbours_not_sequence_neighbours():
    conv = _randomised(MultiScaleDepthwiseConv(4, (3,), layout="2d"))
    v = torch.randn(1, 6 * 7, 4)
    changed = v.clone()
    changed[0, 2 * 7 + 3] += 1.0  # token at row 2, column 3
    moved = (conv(changed, grid_size=(6, 7)) - conv(v, grid_size=(6, 7))).abs().sum(-1).view(6, 7) > 0
    expected = torch.zeros(6, 7, dtype=torch.bool)
    expected[1:4, 2:5] = True
    assert torch.equal(moved, expected)


@pytest.mark.parametrize("conv_proj", ["separate", "shared", "per_kernel"])
def test_prefix_tokens_go_through_attention_only(conv_proj):
    mixer = make_mixer(32, 4, mixer=MixerOptions(conv_proj=conv_proj, conv_layout="2d"), num_prefix_tokens=2)
    timm_attn = Attention(32, 4, qkv_bias=True)
    timm_attn.load_state_dict({k: v for k, v in mixer.state_dict().items() if k.startswith(("qkv", "proj"))})
    x = torch.randn(2, 2 + 3 * 4, 32)
    out = mixer(x, grid_size=(3, 4))
    torch.testing.assert_close(out[:, :2], timm_attn(x)[:, :2], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out[:, 2:], timm_attn(x)[:, 2:], atol=1e-3)


def test_grid_follows_the_input_size():
    mixer = make_mixer(32, 4, mixer=TWO_D, num_prefix_tokens=1, grid_size=(4, 4))
    x = torch.randn(2, 1 + 15, 32)
    wide, tall = mixer(x, grid_size=(3, 5)), mixer(x, grid_size=(5, 3))  # non-square grids, given per call
    values = mixer.qkv(x)[..., 64:][:, 1:]
    conv_delta = mixer.conv(values, grid_size=(3, 5)) - mixer.conv(values, grid_size=(5, 3))
    assert not torch.allclose(wide, tall)
    torch.testing.assert_close(wide - tall, F.pad(mixer.conv_proj(conv_delta), (0, 0, 1, 0)), atol=1e-5, rtol=1e-4)
    assert mixer(torch.randn(2, 1 + 16, 32)).shape == (2, 17, 32)  # the default grid
    with pytest.raises(ValueError, match="36 tokens .* do not fill the 4 x 4 token grid"):
        mixer(torch.randn(2, 1 + 36, 32))  # never a guessed grid
    mixer.grid_size = None
    assert mixer(torch.randn(2, 1 + 36, 32)).shape == (2, 37, 32)  # no grid of its own: a square is inferred


def test_2d_layout_gets_gradients_everywhere_and_passes_gradcheck():
    mixer = make_mixer(8, 2, mixer=TWO_D, num_prefix_tokens=1).double()
    x = torch.randn(2, 1 + 2 * 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mixer(x, grid_size=(2, 3)), (x,), eps=1e-6, atol=1e-5)
    mixer(x, grid_size=(2, 3)).pow(2).sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_block_passes_the_grid_to_its_mixer():
    block = MUSEBlock(32, 4, mixer=TWO_D, num_prefix_tokens=1)
    assert block(torch.randn(2, 1 + 2 * 8, 32), grid_size=(2, 8)).shape == (2, 17, 32)


@pytest.mark.parametrize(
    ("kwargs", "call", "match"),
    [
        ({}, lambda m: m(torch.randn(2, 1 + 12, 32)), r"cannot infer the token grid of 12 tokens .* pass grid_size"),
        ({}, lambda m: m(torch.randn(2, 1 + 12, 32), grid_size=(3, 5)), r"grid_size must be \(H, W\) of positive ints with H \* W = 12"),
        ({}, lambda m: m(torch.randn(2, 1 + 16, 32), is_causal=True), "is_causal=True is not defined for conv_layout='2d'"),
        ({}, lambda m: m(torch.randn(2, 1, 32)), "not more than num_prefix_tokens=1"),
    ],
)
def test_2d_layout_errors_are_named(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        call(MUSEAttention(32, 4, mixer=TWO_D, num_prefix_tokens=1, **kwargs))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mixer": MixerOptions(conv_layout="2d"), "num_prefix_tokens": -1}, "num_prefix_tokens must be a non-negative int"),
        ({"mixer": MixerOptions(conv_layout="2d"), "grid_size": (0, 4)}, r"grid_size must be \(H, W\) of positive ints"),
    ],
)
def test_2d_constructor_errors_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MUSEAttention(32, 4, **kwargs)
