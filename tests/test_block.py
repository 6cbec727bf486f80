"""MUSEBlock: the parallel mixer + MLP block."""
import pytest
import torch

from muse_lightning import MUSEBlock


def test_block_is_residual_plus_parallel_mixer_and_mlp_on_one_norm(variant):
    block = MUSEBlock(32, 4, init_values=0.5, **variant).eval()
    x = torch.randn(2, 7, 32)
    y = block.norm(x)
    expected = x + 0.5 * block.attn(y) + 0.5 * block.mlp(y)
    torch.testing.assert_close(block(x), expected)


def test_block_sequence_alone_equals_padded_in_batch(variant):
    block = MUSEBlock(32, 4, qkv_bias=True, **variant).eval()
    x = torch.randn(2, 9, 32)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 5:] = True
    out = block(x, key_padding_mask=padding, is_causal=True)
    torch.testing.assert_close(out[1, :5], block(x[1:, :5], is_causal=True)[0], atol=1e-5, rtol=1e-5)


def test_block_every_parameter_gets_gradient(variant):
    block = MUSEBlock(32, 4, qkv_bias=True, init_values=1e-2, **variant)
    block(torch.randn(2, 7, 32)).pow(2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("init_values", [None, 1e-5])
def test_block_layer_scale_option(init_values):
    block = MUSEBlock(32, 4, init_values=init_values)
    gammas = [n for n, _ in block.named_parameters() if n.endswith("gamma")]
    assert gammas == ([] if init_values is None else ["ls1.gamma", "ls2.gamma"])


def test_block_drop_path_is_random_in_training_and_off_in_eval():
    block = MUSEBlock(32, 4, drop_path=0.5)
    x = torch.randn(16, 5, 32)
    assert not torch.equal(block(x), block(x))
    block.eval()
    torch.testing.assert_close(block(x), block(x))


def test_block_mlp_ratio_sets_hidden_width():
    assert MUSEBlock(32, 4, mlp_ratio=2.0).mlp.fc1.out_features == 64


def test_sequential_block_option_is_two_residual_steps():
    block = MUSEBlock(32, 4, parallel=False, init_values=0.5).eval()
    x = torch.randn(2, 7, 32)
    h = x + 0.5 * block.attn(block.norm(x))
    torch.testing.assert_close(block(x), h + 0.5 * block.mlp(block.norm2(h)))
    assert MUSEBlock(32, 4).norm2 is None
