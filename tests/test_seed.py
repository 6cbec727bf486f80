"""Seed checkpoints: MUSEAttention.from_seed reproduces the seed's own output."""
from pathlib import Path

import pytest
import torch

from muse_lightning import MUSEAttention
from muse_lightning.seed import SeedMUSEAttention

# Made once by the seed's original MUSEAttention (shared/seed, indentation restored) in eval mode:
# d_model=16, d_k=d_v=4, h=4, random weights, dy_paras=(0.3, -0.2, 0.5); holds its input and output.
REFERENCE = Path(__file__).parent / "data" / "seed_reference.pt"


def test_from_seed_reproduces_the_original_seed_output():
    ref = torch.load(REFERENCE)
    mixer = MUSEAttention.from_seed(ref["state_dict"], num_heads=ref["num_heads"]).eval()
    torch.testing.assert_close(mixer(ref["input"]), ref["output"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("d_model", "d_k", "h", "num_heads"), [(32, 8, 4, 4), (24, 16, 2, 2)])
def test_from_seed_matches_the_seed_layout_reference(d_model, d_k, h, num_heads):
    seed = SeedMUSEAttention(d_model, d_k, d_k, h).eval()
    with torch.no_grad():
        for p in seed.parameters():
            p.normal_(std=0.3)
    mixer = MUSEAttention.from_seed(seed.state_dict(), num_heads=num_heads).eval()
    x = torch.randn(3, 11, d_model)
    torch.testing.assert_close(mixer(x), seed(x), atol=1e-5, rtol=1e-5)


def test_seed_layout_reference_matches_the_original_seed():
    ref = torch.load(REFERENCE)
    seed = SeedMUSEAttention(16, 4, 4, 4).eval()
    seed.load_state_dict(ref["state_dict"])
    torch.testing.assert_close(seed(ref["input"]), ref["output"], atol=1e-5, rtol=1e-5)


def test_converted_seed_trains_its_gate_and_honours_padding():
    ref = torch.load(REFERENCE)
    mixer = MUSEAttention.from_seed(ref["state_dict"], num_heads=4)
    x = torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    mixer(x, key_padding_mask=padding).sum().backward()
    assert mixer.conv.gate.grad.abs().sum() > 0
    torch.testing.assert_close(mixer(x, key_padding_mask=padding)[1, :5], mixer(x[1:, :5])[0], atol=1e-5, rtol=1e-5)


def test_from_seed_rejects_unequal_key_and_value_widths():
    seed = SeedMUSEAttention(16, 4, 8, 2)
    with pytest.raises(ValueError, match="d_k == d_v"):
        MUSEAttention.from_seed(seed.state_dict(), num_heads=2)
