"""Tile sizes of the Triton convolution against PyTorch's, at the ViT-S/16 mixer shape.

Forward + backward (input, kernel and bias gradients) of ``muse_lightning.triton_conv.depthwise_conv`` on the
value slice of a fused ``(B, 197, 3 x 384)`` projection in bf16 (a class token, then 196 tokens: the default
1-D kernel of 5 taps and the 2-D layout's 5 x 5), for each (BLOCK_W, BLOCK_C, kernel-gradient programs), and
PyTorch's convolution (``reference_depthwise_conv``: cuDNN on a GPU) on the same values; the median of
``torch.utils.benchmark`` rounds. Prints a row as each is measured and rewrites the JSON after each, so a run
stopped at its time limit keeps what it measured. Part of ``scripts/gpu_check.sh``; on CPU (Triton's
interpreter, a small batch) it checks that the script runs:

    python scripts/triton_tiles.py OUT.json [BATCH]     # BATCH: 128 (default)
"""
import json
import sys

import torch
from torch.utils.benchmark import Timer

from muse_lightning import triton_conv

# (BLOCK_W, BLOCK_C, kernel-gradient programs); the first is the module's default.
TILES = [(16, 64, 1024), (16, 64, 256), (16, 64, 4096), (8, 128, 1024), (32, 32, 1024), (32, 64, 1024),
         (16, 128, 1024)]
# name: (grid rows, kernel (KH, KW), padding (pad_h, pad_w))
LAYOUTS = {"1-D, 5 taps": (1, (1, 5), (0, 2)), "2-D, 5 x 5": (14, (5, 5), (2, 2))}


def median_ms(conv, v: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, grid_h: int, pads: tuple[int, int],
              grad: torch.Tensor) -> float:
    def step() -> None:
        out = conv(v, kernel, bias, grid_h, *pads, 1)
        torch.autograd.grad(out, (v, kernel, bias), grad)

    step()  # compiles the kernels of this tile
    return Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=0.3).median * 1e3


def main(out_path: str, batch: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dim, tokens = 384, 197
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * dim, generator=gen).to(device, torch.bfloat16)
    v = qkv[..., 2 * dim:].requires_grad_()  # a view: read through its strides
    grad = torch.randn(batch, tokens, dim, generator=gen).to(device, torch.bfloat16)
    rows = []

    def record(layout: str, impl: str, tile: tuple[int, int, int] | None, ms: float, base: float) -> None:
        print(f"{layout:<14}{impl:<34}{ms:>11.3f}{ms / base:>9.2f}", flush=True)
        rows.append({"layout": layout, "impl": impl, "tile": tile, "ms": ms, "ratio": ms / base, "batch": batch,
                     "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)

    print(f"device={device} batch={batch} bf16, forward+backward; ratio = ms / PyTorch's convolution", flush=True)
    print(f"{'layout':<14}{'impl':<34}{'ms':>11}{'ratio':>9}", flush=True)
    for name, (grid_h, (kh, kw), pads) in LAYOUTS.items():
        kernel = torch.randn(dim, kh, kw, generator=gen).to(device, torch.bfloat16).requires_grad_()
        bias = torch.zeros(dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        base = median_ms(triton_conv.reference_depthwise_conv, v, kernel, bias, grid_h, pads, grad)
        record(name, "PyTorch convolution", None, base, base)
        for tile in TILES:
            triton_conv._BLOCK_W, triton_conv._BLOCK_C, triton_conv._GRAD_PROGRAMS = tile
            ms = median_ms(triton_conv.depthwise_conv, v, kernel, bias, grid_h, pads, grad)
            record(name, f"Triton {tile[0]} x {tile[1]}, {tile[2]} programs", tile, ms, base)

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "triton_tiles.json", int(sys.argv[2]) if len(sys.argv) > 2 else 128)
