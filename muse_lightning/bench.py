"""``muse-bench``: token mixers and whole models side by side, eager and compiled, in one run.

Every measurement is a median over rounds after warm-up, and every mixer is reported as a ratio to
timm's ``Attention`` measured in the same run on the same shape, mode and pass. Peak memory is the
largest amount of tensor memory a step allocates beyond its inputs and weights: CUDA's allocator
statistics on GPU, the profiler's allocation events on CPU.

    muse-bench --quick --out bench.json --plot bench.png
    muse-bench --markdown "[bench.json]"     # its records as markdown tables
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import CLI
from timm.layers import Attention
from torch import nn

from . import conv
from .config_files import resolve_config_args
from .attention import MUSEAttention
from .machine import machine_record
from .options import MixerOptions
from .seed import SeedMUSEAttention

__all__ = ["Shape", "main", "markdown_table", "measure_mixers", "measure_models"]

Mode = Literal["eager", "compiled", "max-autotune"]
Pass = Literal["fwd", "fwd+bwd"]
BASELINE = "timm Attention"


@dataclass(frozen=True)
class Shape:
    """One mixer workload: ``batch`` sequences of ``seq_len`` tokens of width ``dim``."""

    name: str
    batch: int
    seq_len: int
    dim: int
    num_heads: int


def _text_shapes(lengths: list[int], tokens: int, dim: int = 384, heads: int = 6) -> list[Shape]:
    return [Shape(f"text N={n}", max(1, tokens // n), n, dim, heads) for n in lengths]


def presets(quick: bool, device: str) -> dict[str, list[Shape]]:
    """The shapes of each preset: ViT-Ti/S/B at 224 px (class token + 14 x 14 patches), text 128..4096."""
    vit_batch = 8 if quick else (32 if device == "cpu" else 128)
    vit = [Shape("ViT-Ti/16 224", vit_batch, 197, 192, 3), Shape("ViT-S/16 224", vit_batch, 197, 384, 6),
           Shape("ViT-B/16 224", vit_batch, 197, 768, 12)]
    lengths = [128, 256, 512, 1024, 2048, 4096]
    return {
        "vit": vit[1:2] if quick else vit,
        "vit-s": vit[1:2],
        "text": _text_shapes(lengths[:4] if quick else lengths, 4096 if quick else 16384),
        "tiny": [Shape("tiny N=16", 2, 17, 32, 2), Shape("tiny N=32", 2, 32, 32, 2)],
    }


def _mixers(shape: Shape, with_seed: bool) -> dict[str, Callable[[], nn.Module]]:
    dim, heads = shape.dim, shape.num_heads
    head_dim = dim // heads

    def plain() -> nn.Module:
        attn = Attention(dim, heads, qkv_bias=True)
        attn.fused_attn = False  # softmax(q k^T) v with the N x N matrix in memory
        return attn

    mixers = {
        BASELINE: lambda: Attention(dim, heads, qkv_bias=True),
        "plain attention (N x N)": plain,
        "MUSE static 1-D": lambda: MUSEAttention(dim, heads, qkv_bias=True),
        "MUSE static 1-D, shared proj": lambda: MUSEAttention(
            dim, heads, qkv_bias=True, mixer=MixerOptions(conv_proj="shared"),
        ),
        "MUSE dynamic 1-D": lambda: MUSEAttention(dim, heads, qkv_bias=True, mixer=MixerOptions(conv_type="dynamic")),
    }
    if shape.seq_len > 1 and math.isqrt(shape.seq_len - 1) ** 2 == shape.seq_len - 1:  # class token + square grid
        mixers["MUSE static 2-D"] = lambda: MUSEAttention(
            dim, heads, qkv_bias=True, mixer=MixerOptions(conv_layout="2d"), num_prefix_tokens=1,
        )
    if with_seed:
        mixers["seed design, as shipped"] = lambda: SeedMUSEAttention(dim, head_dim, head_dim, heads)
        mixers["seed design, dropout 0"] = lambda: SeedMUSEAttention(dim, head_dim, head_dim, heads, dropout=0.0)
    return mixers


def _prepare(module: nn.Module, mode: str) -> Callable[..., Any]:
    if mode == "eager":
        return module
    return torch.compile(module, mode="max-autotune" if mode == "max-autotune" else None)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# A line of the profiler's own C++ log (kineto's "USDT:... profiler_start", "ERROR:... gpuGetDeviceCount"),
# written straight to file descriptor 2 whatever KINETO_LOG_LEVEL says.
_KINETO_LINE = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\]")


@contextlib.contextmanager
def _kineto_quiet() -> Iterator[None]:
    """Keep the profiler's log lines off the terminal: stderr (the file descriptor) goes to a temporary file
    for the block, and every other line written there is passed on afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not _KINETO_LINE.match(line)]
            sys.stderr.write("".join(kept))


def _peak_memory_mb(fn: Callable[[], Any], device: str) -> float:
    """Peak tensor memory (MiB) one call of ``fn`` allocates beyond what is already allocated."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _time_rounds(steps: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: str) -> dict[str, float]:
    """Median ms of each step, the steps interleaved round by round so that noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _mixer_step(fn: Callable[..., Any], x: torch.Tensor, kind: str) -> Callable[[], Any]:
    if kind == "fwd":
        def step() -> Any:
            with torch.no_grad():
                return fn(x)
        return step

    def step() -> Any:
        out = fn(x)
        out.float().sum().backward()
    return step


def _autocast(device: str) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def measure_mixers(
        shapes: list[Shape],
        modes: list[str],
        passes: list[str],
        device: str,
        rounds: int,
        warmup: int,
        with_seed: bool = False,
        impls: list[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of every mixer (or those named in ``impls``, timm's ``Attention`` always) x shape x mode x pass;
    ``ratio`` is against timm's ``Attention``."""
    dtype = "bf16" if device == "cuda" else "fp32"
    for shape in shapes:
        torch.manual_seed(0)
        factories = {
            name: make for name, make in _mixers(shape, with_seed).items()
            if impls is None or name == BASELINE or name in impls
        }
        modules = {name: make().to(device) for name, make in factories.items()}
        x = torch.randn(shape.batch, shape.seq_len, shape.dim, device=device, requires_grad=True)
        for mode in modes:
            for kind in passes:
                torch._dynamo.reset()
                steps = {name: _mixer_step(_prepare(m, mode), x, kind) for name, m in modules.items()}
                with _autocast(device):
                    medians = _time_rounds(steps, rounds, warmup, device)
                    peaks = {name: _peak_memory_mb(step, device) for name, step in steps.items()}
                for name in steps:
                    yield {
                        "level": "mixer", "impl": name, "mode": mode, "pass": kind, "shape": shape.name,
                        "batch": shape.batch, "seq_len": shape.seq_len, "dim": shape.dim,
                        "num_heads": shape.num_heads, "device": device, "dtype": dtype,
                        "ms_median": medians[name], "tokens_per_s": shape.batch * shape.seq_len / medians[name] * 1e3,
                        "peak_mem_mb": peaks[name], "ratio": medians[name] / medians[BASELINE],
                    }


# Model size -> (timm's ViT at 224 px, the MUSE twin, width, heads).
MODEL_SIZES: dict[str, tuple[str, str, int, int]] = {
    "small": ("vit_small_patch16_224", "muse_vit_small_patch16_224", 384, 6),
    "base": ("vit_base_patch16_224", "muse_vit_base_patch16_224", 768, 12),
}


def measure_models(
        modes: list[str], device: str, batch: int, depth: int, rounds: int, warmup: int,
        sizes: list[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Training-step throughput (forward, backward, AdamW step) of MUSE ViTs against timm's ViT of each size.

    Both pool the patch tokens (timm's with ``class_token=False, global_pool="avg"``, as its ``*_gap``
    models and the MUSE ViTs do), so the heads do the same work.
    """
    import timm

    from . import vit  # noqa: F401  (registers muse_vit_*)

    dtype = "bf16" if device == "cuda" else "fp32"
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    for size in sizes or ["small"]:
        timm_name, muse_name, dim, heads = MODEL_SIZES[size]
        baseline = f"timm {timm_name}"
        for mode in modes:
            torch._dynamo.reset()
            steps = {}
            for label, name in ((baseline, timm_name), (muse_name, muse_name)):
                torch.manual_seed(0)
                model = timm.create_model(name, depth=depth, class_token=False, global_pool="avg").to(device)
                fn = _prepare(model, mode)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

                def step(fn: Callable[..., Any] = fn, opt: torch.optim.Optimizer = opt) -> None:
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(fn(images).float(), labels).backward()
                    opt.step()
                steps[label] = step
            with _autocast(device):
                medians = _time_rounds(steps, rounds, warmup, device)
                peaks = {name: _peak_memory_mb(step, device) for name, step in steps.items()}
            for label in steps:
                yield {
                    "level": "model", "impl": label, "mode": mode, "pass": "train step", "shape": f"{size}, depth {depth}",
                    "batch": batch, "seq_len": 196, "dim": dim, "num_heads": heads, "device": device, "dtype": dtype,
                    "ms_median": medians[label], "images_per_s": batch / medians[label] * 1e3,
                    "tokens_per_s": batch * 196 / medians[label] * 1e3, "peak_mem_mb": peaks[label],
                    "ratio": medians[label] / medians[baseline],
                }


_HEADER = (f"{'level':<6} {'shape':<15} {'impl':<29} {'mode':<12} {'pass':<10} {'ms':>9} {'tok/s':>10} {'img/s':>7} "
           f"{'peak MiB':>9} {'ratio':>6}")


def _row(r: dict[str, Any]) -> str:
    img = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"
    return (f"{r['level']:<6} {r['shape']:<15} {r['impl']:<29} {r['mode']:<12} {r['pass']:<10} {r['ms_median']:>9.2f} "
            f"{r['tokens_per_s']:>10.0f} {img:>7} {r['peak_mem_mb']:>9.1f} {r['ratio']:>6.2f}")


def markdown_table(records: list[dict[str, Any]]) -> str:
    """Markdown tables of ``muse-bench`` records (as ``--out`` writes them): one per workload (shape, pass, batch,
    dtype, machine), a row per implementation and ``MUSE_CONV_BACKEND`` of its run, and for each mode the
    median ms, the peak MiB and the ratio to the baseline of the same run."""
    modes = list(dict.fromkeys(r["mode"] for r in records))
    groups: dict[tuple, dict[tuple[str, str], dict[str, dict[str, Any]]]] = {}
    for r in records:
        machine = r.get("gpu") or (f"{r['threads']} threads of {r['cpu']}" if "cpu" in r else r["device"])
        workload = (r["shape"], r["pass"], r["batch"], r["dtype"], machine)
        impl = (r["impl"], r.get("conv_backend", "torch"))  # records from before the Triton backend: PyTorch's
        groups.setdefault(workload, {}).setdefault(impl, {})[r["mode"]] = r
    tables = []
    for (shape, kind, batch, dtype, machine), rows in groups.items():
        lines = [f"*{shape}, {kind}, batch {batch}, {dtype}, {machine}*", "",
                 "| impl | conv backend | " + " | ".join(f"{m} ms | {m} peak MiB | {m} ratio" for m in modes) + " |",
                 "| --- | --- |" + " ---: |" * (3 * len(modes))]
        for (impl, backend), by_mode in rows.items():
            cells = [
                f"{by_mode[m]['ms_median']:.2f} | {by_mode[m]['peak_mem_mb']:.0f} | {by_mode[m]['ratio']:.2f}"
                if m in by_mode else " |  | " for m in modes
            ]
            lines.append(f"| {impl} | {backend} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _plot(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in records if r["level"] == "mixer" and r["shape"].startswith(("text", "tiny"))
             and r["mode"] == "eager" and r["pass"] == "fwd+bwd"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl in dict.fromkeys(r["impl"] for r in sweep):
        rows = sorted((r for r in sweep if r["impl"] == impl), key=lambda r: r["seq_len"])
        lengths = [r["seq_len"] for r in rows]
        axes[0].plot(lengths, [r["ms_median"] for r in rows], marker="o", label=impl)
        axes[1].plot(lengths, [r["peak_mem_mb"] for r in rows], marker="o", label=impl)
    for ax, label in zip(axes, ("forward+backward time (ms, median)", "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N (batch x N fixed)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    device = sweep[0]["device"] if sweep else "?"
    fig.suptitle(f"token mixers, eager, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
        preset: Literal["all", "vit", "vit-s", "text", "tiny"] = "all",
        quick: bool = False,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        modes: list[Mode] | None = None,
        passes: list[Pass] | None = None,
        mixers: bool = True,
        models: bool = True,
        model_sizes: list[Literal["small", "base"]] | None = None,
        seed_design: bool = False,
        impls: list[str] | None = None,
        rounds: int | None = None,
        warmup: int = 2,
        out: str | None = None,
        plot: str | None = None,
        markdown: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark token mixers (and, with ``models``, whole ViT training steps); print a table.

    Args:
        preset: Shapes: ``vit`` (ViT-Ti/S/B at 224 px), ``vit-s`` (ViT-S/16 only), ``text``
            (N = 128 .. 4096, batch x N fixed), ``all`` (vit and text), ``tiny`` (seconds; for tests).
        quick: A short run (about 5 minutes on 2 CPU cores): ViT-S only, N up to 1024, fewer rounds,
            a 2-block model.
        device: ``auto`` takes CUDA when available (in bf16 autocast), else the CPU (fp32).
        modes: ``eager``, ``compiled`` (``torch.compile``), ``max-autotune``; default eager and
            compiled, plus max-autotune on CUDA.
        passes: ``fwd`` (no grad) and/or ``fwd+bwd``; default both.
        mixers: Time the token mixers at the preset's shapes (false: model rows only).
        models: Also time training steps of the MUSE ViTs against timm's ViTs of the same size (``model_sizes``;
            not with the ``tiny`` preset).
        model_sizes: ``small`` (ViT-S/16) and / or ``base`` (ViT-B/16); default ViT-S, and ViT-B too on CUDA.
        seed_design: Also time the seed's design (``muse_lightning.seed``), as shipped (attention
            dropout 0.1, active in the fwd+bwd pass) and with dropout 0.
        impls: Time only these mixers (names as in the table's ``impl`` column; timm's ``Attention``, the
            baseline, always); default all.
        rounds: Timed rounds per measurement (default 10, 5 with ``quick``); the median is reported.
        warmup: Untimed rounds first (compilation happens here).
        out: Write the records to this JSON file.
        plot: Write time and memory against sequence length to this PNG.
        markdown: Measure nothing: print the markdown tables (``markdown_table``) of these JSON files'
            records (as ``out`` writes them), the docs' tables.
    """
    if markdown:
        records = [r for path in markdown for r in json.loads(Path(path).read_text())]
        print(markdown_table(records))
        return records
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    modes = modes or (["eager", "compiled", "max-autotune"] if device == "cuda" else ["eager", "compiled"])
    passes = passes or ["fwd", "fwd+bwd"]
    rounds = rounds or (5 if quick else 10)
    table = presets(quick, device)
    shapes = table["vit"] + table["text"] if preset == "all" else table[preset]
    known = _mixers(Shape("class token + 14 x 14", 1, 197, 8, 2), seed_design)  # a shape that has every mixer
    unknown = sorted(set(impls or ()) - set(known))
    if unknown:
        raise ValueError(f"impls names no mixer {unknown}; choose from {list(known)}")
    groups = []
    if mixers:
        groups.append(measure_mixers(shapes, modes, passes, device, rounds, warmup, seed_design, impls))
    if models and preset != "tiny":
        batch = 4 if quick else (32 if device == "cpu" else 128)
        sizes = model_sizes or (["small", "base"] if device == "cuda" and not quick else ["small"])
        groups.append(measure_models(modes, device, batch, 2 if quick else 12, rounds, warmup, sizes))
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"conv_backend={conv.CONV_BACKEND}; ratio = ms / timm's "
          "(Attention at mixer level, the ViT of the same size at model level), same shape, mode and pass")
    print(_HEADER, flush=True)
    records: list[dict[str, Any]] = []
    # Each row printed and the JSON rewritten as it is measured: a run stopped at a time limit keeps what it has.
    machine = machine_record(device)
    for record in itertools.chain(*groups):
        record.update(machine, conv_backend=conv.CONV_BACKEND)  # MUSE_CONV_BACKEND: torch or triton
        records.append(record)
        print(_row(record), flush=True)
        if out:
            with open(out, "w") as f:
                json.dump(records, f, indent=1)
    if plot:
        _plot(records, plot)
    return records


_FLAGS = ("--quick", "--mixers", "--models", "--seed_design")


def cli(argv: list[str] | None = None) -> None:
    """Entry point of the ``muse-bench`` console script; a boolean option given alone (``--quick``) means true."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = [
        f"{a}=true" if a in _FLAGS and (i + 1 == len(argv) or argv[i + 1].startswith("-")) else a
        for i, a in enumerate(argv)
    ]
    CLI(main, as_positional=False, args=resolve_config_args(args))


if __name__ == "__main__":
    cli()
