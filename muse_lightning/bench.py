"""Token-mixer speed ratio: MUSE against timm's ``Attention`` and the seed's design, in one run.

``python -m muse_lightning.bench`` times forward+backward of each mixer on the same input, after
warm-up, interleaving the mixers round by round so that machine noise hits all of them alike.
It prints median milliseconds and the ratio to timm's ``Attention`` and writes the records as JSON.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Literal
import torch
from jsonargparse import CLI
from timm.layers import Attention
from torch import nn

from .attention import MUSEAttention
from .seed import SeedMUSEAttention

__all__ = ["measure_mixers", "main"]


def _mixers(dim: int, num_heads: int, seq_len: int) -> dict[str, Callable[[], nn.Module]]:
    head_dim = dim // num_heads
    mixers = {
        "timm Attention": lambda: Attention(dim, num_heads, qkv_bias=True),
        "MUSE static": lambda: MUSEAttention(dim, num_heads, qkv_bias=True),
        "MUSE static conv_proj=shared": lambda: MUSEAttention(dim, num_heads, qkv_bias=True, conv_proj="shared"),
        "MUSE dynamic": lambda: MUSEAttention(dim, num_heads, qkv_bias=True, conv_type="dynamic"),
        "seed design, dropout 0.1": lambda: SeedMUSEAttention(dim, head_dim, head_dim, num_heads),
        "seed design, dropout 0": lambda: SeedMUSEAttention(dim, head_dim, head_dim, num_heads, dropout=0.0),
    }
    if seq_len > 1 and math.isqrt(seq_len - 1) ** 2 == seq_len - 1:  # a class token and a square patch grid
        mixers["MUSE static 2-D, class token"] = lambda: MUSEAttention(
            dim, num_heads, qkv_bias=True, conv_layout="2d", num_prefix_tokens=1,
        )
    return mixers


def measure_mixers(
        batch: int = 32,
        seq_len: int = 197,
        dim: int = 384,
        num_heads: int = 6,
        rounds: int = 15,
        warmup: int = 3,
        device: Literal["cpu", "cuda"] = "cpu",
) -> list[dict]:
    """Median forward+backward time of each mixer; ``ratio`` is against timm's ``Attention``."""
    torch.manual_seed(0)
    factories = _mixers(dim, num_heads, seq_len)
    modules = {name: make().to(device) for name, make in factories.items()}
    x = torch.randn(batch, seq_len, dim, device=device, requires_grad=True)
    times: dict[str, list[float]] = {name: [] for name in modules}

    def step(module: nn.Module) -> None:
        module(x).sum().backward()

    for i in range(warmup + rounds):
        for name, module in modules.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(module)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    baseline = statistics.median(times["timm Attention"])
    return [
        {
            "impl": name, "pass": "fwd+bwd", "mode": "eager", "device": device, "batch": batch, "seq_len": seq_len,
            "dim": dim, "num_heads": num_heads, "ms_median": statistics.median(t),
            "ratio": statistics.median(t) / baseline, "threads": torch.get_num_threads(),
        }
        for name, t in times.items()
    ]


def main(
        out: str = "mixer_ratio.json",
        batch: int = 32,
        seq_len: int = 197,
        dim: int = 384,
        num_heads: int = 6,
        rounds: int = 15,
        device: Literal["cpu", "cuda"] = "cpu",
) -> list[dict]:
    """Print the ratio table and write it to ``out`` as JSON.

    Args:
        out: JSON file for the records.
        batch: Batch size B.
        seq_len: Tokens N.
        dim: Token width C.
        num_heads: Attention heads.
        rounds: Timed rounds after warm-up; the median is reported.
        device: Where to run.
    """
    records = measure_mixers(batch, seq_len, dim, num_heads, rounds=rounds, device=device)
    print(f"B={batch} N={seq_len} C={dim} heads={num_heads}, forward+backward, {device}, "
          f"{torch.get_num_threads()} threads, median of {rounds}")
    print(f"{'mixer':<32} {'ms':>9} {'x timm Attention':>17}")
    for r in records:
        print(f"{r['impl']:<32} {r['ms_median']:>9.1f} {r['ratio']:>17.2f}")
    with open(out, "w") as f:
        json.dump(records, f, indent=2)
    return records


if __name__ == "__main__":
    CLI(main)
