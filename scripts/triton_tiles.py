"""Tile sizes of the Triton convolution's kernels against PyTorch's convolution, at the ViT-S/16 mixer shape.

The forward and the backward (input, kernel and bias gradients: ``depthwise_conv_backward``) of
``muse_lightning.triton_conv`` timed apart, on the value slice of a fused ``(B, 197, 3 x 384)`` projection in
bf16 (a class token, then 196 tokens: the default 1-D kernel of 5 taps, then the 2-D layout's 5 x 5), against
the same pass of PyTorch's convolution (``reference_depthwise_conv``: cuDNN on a GPU) on the same values (in 1-D
with a ``(1, k)`` kernel along a row, then with a ``(k, 1)`` one down a column, as ``MultiScaleDepthwiseConv`` runs
it, since oneDNN's depthwise kernel takes only that one's gradient; which cuDNN prefers is measured here). First
the module's tiles, then each kernel-gradient tile (tap x token lanes, channels, warps, programs; the backward
with the module's forward tile), then each forward / input-gradient tile (tokens, channels, warps; both passes,
the backward with the module's kernel-gradient tile). The kernel gradient's tile holds all the taps of a few
tokens, the forward's a row of tokens; so the two need not share a best tile. The
median of ``torch.utils.benchmark`` rounds. Prints a row as each is measured and rewrites the JSON
after each, so a run stopped at its time limit keeps what it measured. Part of ``scripts/gpu_check.sh``; on
CPU (Triton's interpreter, a small batch) it checks that the script runs:

    python scripts/triton_tiles.py OUT.json [BATCH]     # BATCH: 128 (default)
"""
import json
import sys
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.benchmark import Timer

from muse_lightning import triton_conv

# (tap x token lanes, BLOCK_C, warps, programs) of the kernel gradient, (BLOCK_W, BLOCK_C, warps) of the forward
# and input gradient (none that spills registers at 5 x 5); the module's own are timed first.
GRAD_TILES = [(64, 64, 4, 256), (64, 64, 4, 4096), (32, 64, 4, 1024), (128, 64, 4, 1024), (64, 128, 4, 1024),
              (64, 64, 2, 1024), (32, 64, 2, 1024), (128, 128, 8, 1024)]
TAPS_TILES = [(8, 64, 2), (16, 64, 2), (8, 128, 4), (32, 64, 4), (16, 128, 4), (32, 32, 4), (16, 64, 8)]
# name: (grid rows, kernel (KH, KW), padding (pad_h, pad_w))
LAYOUTS = {"1-D, 5 taps": (1, (1, 5), (0, 2)), "2-D, 5 x 5": (14, (5, 5), (2, 2))}


def median_ms(fn: Callable[[], object]) -> float:
    fn()  # compiles the kernels of this tile
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def use(tiles: dict) -> None:
    """Make ``tiles`` (``{"taps": forward tile, "grad": kernel-gradient tile and programs}``) the module's."""
    triton_conv._TAPS_TILE = tiles["taps"]
    triton_conv._GRAD_TILE, triton_conv._GRAD_PROGRAMS = tiles["grad"][:3], tiles["grad"][3]


def sweep(layout: str, grid_h: int, kernel_size: tuple[int, int], pads: tuple[int, int], v: torch.Tensor,
          grad: torch.Tensor, gen: torch.Generator, record: Callable[..., None]) -> None:
    """Time PyTorch's passes, then Triton's with the module's tiles and with each tile of the sweep."""
    kernel = torch.randn(*kernel_size, v.shape[-1], generator=gen).to(v.device, v.dtype).requires_grad_()
    bias = torch.zeros(v.shape[-1], device=v.device, dtype=v.dtype, requires_grad=True)
    args = (v, kernel, bias, grid_h, *pads, 1)
    reference = partial(triton_conv.reference_depthwise_conv, *args)
    with torch.no_grad():
        base = {"forward": median_ms(reference)}
    base["backward"] = median_ms(partial(torch.autograd.grad, reference(), (v, kernel, bias), grad, retain_graph=True))
    for pass_, ms in base.items():
        record(layout, pass_, "PyTorch convolution", None, ms, ms)
    if grid_h == 1:  # the sequence as a column, (k, 1) kernel, as MultiScaleDepthwiseConv runs it (oneDNN's choice)
        column = partial(triton_conv.reference_depthwise_conv, v, kernel.transpose(0, 1), bias, v.shape[1] - 1,
                         pads[1], 0, 1)
        with torch.no_grad():
            record(layout, "forward", "PyTorch convolution, (k, 1)", None, median_ms(column), base["forward"])
        record(layout, "backward", "PyTorch convolution, (k, 1)", None, median_ms(partial(
            torch.autograd.grad, column(), (v, kernel, bias), grad, retain_graph=True)), base["backward"])
    passes = {
        "forward": partial(triton_conv.depthwise_conv, *args),
        "backward": partial(triton_conv.depthwise_conv_backward, grad, v.detach(), kernel.detach(), grid_h, *pads, 1),
    }
    default = {"taps": triton_conv._TAPS_TILE, "grad": (*triton_conv._GRAD_TILE, triton_conv._GRAD_PROGRAMS)}
    runs = [(default, ("forward", "backward"))] + [({**default, "grad": t}, ("backward",)) for t in GRAD_TILES] + \
        [({**default, "taps": t}, ("forward", "backward")) for t in TAPS_TILES]
    for tiles, timed in runs:
        use(tiles)
        label = f"Triton {'x'.join(map(str, tiles['taps']))} / {'x'.join(map(str, tiles['grad']))}"
        for pass_ in timed:
            with torch.no_grad():
                record(layout, pass_, label, tiles, median_ms(passes[pass_]), base[pass_])
    use(default)


def main(out_path: str, batch: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dim, tokens = 384, 197
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * dim, generator=gen).to(device, torch.bfloat16)
    v = qkv[..., 2 * dim:].requires_grad_()  # a view: read through its strides
    grad = torch.randn(batch, tokens, dim, generator=gen).to(device, torch.bfloat16)
    rows = []

    def record(layout: str, pass_: str, impl: str, tiles: dict | None, ms: float, base: float) -> None:
        print(f"{layout:<13}{pass_:<10}{impl:<40}{ms:>10.3f} {ms / base:>8.2f}", flush=True)
        rows.append({"layout": layout, "pass": pass_, "impl": impl, "tiles": tiles, "ms": ms, "ratio": ms / base,
                     "batch": batch, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)

    print(f"device={device} batch={batch} bf16; ratio = ms / PyTorch's convolution's same pass", flush=True)
    print("Triton F / G: F = forward and input-gradient tile (tokens x channels x warps), G = kernel-gradient tile "
          "(tap-token lanes x channels x warps x programs)", flush=True)
    print(f"{'layout':<13}{'pass':<10}{'impl':<40}{'ms':>10} {'ratio':>8}", flush=True)
    for layout, (grid_h, kernel_size, pads) in LAYOUTS.items():
        sweep(layout, grid_h, kernel_size, pads, v, grad, gen, record)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "triton_tiles.json", int(sys.argv[2]) if len(sys.argv) > 2 else 128)
