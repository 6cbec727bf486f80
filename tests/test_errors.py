"""Bad arguments raise a ValueError/TypeError that names the argument, before torch sees them."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from muse_lightning import MixerOptions, MultiScaleDynamicConv, MUSEAttention, MUSEBlock
from muse_lightning.callbacks import ThroughputMonitor, batch_size


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 30, "num_heads": 4}, ValueError, r"dim \(30\) must be divisible by num_heads \(4\)"),
        ({"dim": 0}, ValueError, "dim must be a positive int"),
        ({"num_heads": 2.5}, ValueError, "num_heads must be a positive int"),
        ({"mixer": {"kernel_size": 3}}, TypeError, r"unknown mixer options \['kernel_size'\]; the options are"),
        ({"mixer": "static"}, TypeError, "mixer must be a MixerOptions or a mapping of its fields"),
        ({"qk_norm": True}, ValueError, "norm_layer must be given"),
        ({"attn_drop": 1.0}, ValueError, r"attn_drop must be in \[0, 1\)"),
        ({"proj_drop": -0.1}, ValueError, "proj_drop"),
    ],
)
def test_bad_constructor_argument_is_named(kwargs, error, match):
    args = {"dim": 32, "num_heads": 4, **kwargs}
    with pytest.raises(error, match=match):
        MUSEAttention(**args)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"kernel_sizes": (3, 4)}, ValueError, "kernel_sizes must be a non-empty sequence of positive odd ints"),
        ({"kernel_sizes": ()}, ValueError, "kernel_sizes must be a non-empty"),
        ({"kernel_sizes": (0,)}, ValueError, "kernel_sizes"),
        ({"kernel_sizes": (3, 3)}, ValueError, "kernel_sizes must be distinct"),
        ({"kernel_sizes": 3}, TypeError, "kernel_sizes must be a sequence of ints"),
        ({"kernel_sizes": (1, 2.0)}, ValueError, "kernel_sizes"),
        ({"conv_type": "fancy"}, ValueError, r"conv_type must be one of \('static', 'dynamic', 'none'\)"),
        ({"conv_proj": "both"}, ValueError, "conv_proj must be one of"),
        ({"conv_layout": "3d"}, ValueError, "conv_layout must be one of"),
        ({"conv_layout": "2d", "conv_type": "dynamic"}, ValueError, "needs conv_type='static'"),
    ],
)
def test_bad_mixer_option_is_named(options, error, match):
    with pytest.raises(error, match=match):
        MixerOptions(**options)
    with pytest.raises(error, match=match):  # as a config or a checkpoint's hyper-parameters give them
        MixerOptions.of(options)


@pytest.mark.parametrize("flops", [0, -1e12, float("nan")])
def test_a_peak_flops_that_is_not_positive_is_named(flops):
    with pytest.raises(ValueError, match="available_flops must be a positive number of FLOP/s"):
        ThroughputMonitor(batch_size, available_flops=flops)


def test_dynamic_conv_heads_must_divide_channels():
    with pytest.raises(ValueError, match="must be divisible by num_heads"):
        MultiScaleDynamicConv(10, num_heads=3)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m(torch.randn(4, 32)), ValueError, r"x must have shape \(B, N, C\), got \(4, 32\)"),
        (lambda m: m(torch.randn(1, 2, 4, 32)), ValueError, r"x must have shape \(B, N, C\)"),
        (lambda m: m(torch.randn(2, 5, 16)), ValueError, "x has 16 channels but the module was built with dim=32"),
        (lambda m: m([[0.0] * 32]), TypeError, "x must be a torch.Tensor"),
        (lambda m: m(torch.ones(2, 5, 32, dtype=torch.long)), TypeError, "x must be a floating point tensor"),
        (lambda m: m(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool tensor"),
        (lambda m: m(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \(B, N\) = \(2, 5\), got \(2, 4\)"),
        (lambda m: m(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(5, 2, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (lambda m: m(torch.randn(2, 5, 32), attn_mask=torch.zeros(5, 4, dtype=torch.bool)), ValueError,
         r"attn_mask must broadcast to \(B, num_heads, N, N\) = \(2, 4, 5, 5\), got \(5, 4\)"),
        (lambda m: m(torch.randn(2, 5, 32), attn_mask=torch.zeros(3, 1, 5, 5, dtype=torch.bool)), ValueError, "attn_mask must broadcast"),
        (lambda m: m(torch.randn(2, 5, 32), attn_mask=torch.zeros(5, 5, dtype=torch.long)), TypeError, "attn_mask must be a bool"),
    ],
)
def test_bad_forward_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call(MUSEAttention(32, 4))


def test_block_forwards_masks_and_rejects_bad_padding_mask():
    block = MUSEBlock(32, 4)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        block(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))


def test_from_seed_rejects_a_state_dict_that_is_not_the_seeds():
    with pytest.raises(ValueError, match="not a seed MUSEAttention state_dict: missing"):
        MUSEAttention.from_seed(nn.Linear(4, 4).state_dict(), num_heads=2)


def test_a_bf16_tensor_into_a_float32_mixer_outside_autocast_is_named():
    mixer = MUSEAttention(32, 4)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"x is torch.bfloat16 but the mixer's weights are torch.float32.*torch.autocast"):
        mixer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mixer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("conv_type", ["static", "dynamic"])
def test_an_empty_batch_gives_an_empty_output(conv_type):
    assert MUSEAttention(32, 4, mixer=MixerOptions(conv_type=conv_type))(torch.randn(0, 5, 32)).shape == (0, 5, 32)


@pytest.mark.parametrize("grid_size", [(-3, -4), (0, 12), (3, 5)])
def test_a_grid_size_that_is_not_positive_or_does_not_fit_is_named(grid_size):
    mixer = MUSEAttention(32, 4, mixer=MixerOptions(conv_layout="2d"))
    with pytest.raises(ValueError, match=r"grid_size must be \(H, W\) of positive ints with H \* W = 12"):
        mixer(torch.randn(1, 12, 32), grid_size=grid_size)


@pytest.mark.parametrize("bad_id", [-1, 257, 1000])
def test_token_ids_outside_the_vocabulary_are_named(bad_id):
    from muse_lightning.text import MUSETextNet

    ids = torch.tensor([[5, 6, bad_id, 7]])
    with pytest.raises(ValueError, match=rf"token ids outside the vocabulary \[0, 257\): e.g. \[{bad_id}\]"):
        MUSETextNet(3, max_length=8, dim=16, depth=1, num_heads=2)(ids)


@pytest.mark.parametrize(("backend", "setup", "error"), [
    ("cudnn", "pass", "ValueError: MUSE_CONV_BACKEND must be 'torch' or 'triton', got 'cudnn'"),
    ("triton", "sys.modules['triton'] = None", "ImportError: MUSE_CONV_BACKEND=triton needs triton"),
], ids=["unknown-backend", "triton-not-installed"])
def test_a_convolution_backend_that_cannot_run_is_named_at_import(backend, setup, error):
    env = {**os.environ, "MUSE_CONV_BACKEND": backend}
    done = subprocess.run([sys.executable, "-c", f"import sys; {setup}; import muse_lightning"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0 and error in done.stderr, done.stderr[-2000:]
