import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from muse_lightning import MUSEAttention  # noqa: E402

VARIANTS = [(t, p) for t in ("static", "dynamic") for p in ("separate", "shared", "per_kernel")]
VARIANT_IDS = [f"{t}-{p}" for t, p in VARIANTS]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=VARIANTS, ids=VARIANT_IDS)
def variant(request) -> dict:
    conv_type, conv_proj = request.param
    return {"conv_type": conv_type, "conv_proj": conv_proj}


def make_mixer(dim: int = 32, num_heads: int = 4, **kwargs) -> MUSEAttention:
    """A small mixer with non-zero biases so that every term of the output is exercised."""
    module = MUSEAttention(dim, num_heads, qkv_bias=True, **kwargs)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name or "gate" in name:
                p.normal_(std=0.1)
    return module
