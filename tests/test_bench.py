"""muse-bench runs on a tiny preset and writes valid JSON and a plot (no timing is asserted)."""
import json
import os
import subprocess
import sys

import pytest

REQUIRED = {"impl", "mode", "pass", "batch", "seq_len", "dim", "ms_median", "peak_mem_mb", "tokens_per_s", "ratio",
            "conv_backend", "threads", "cpu", "torch"}


def test_bench_tiny_preset_writes_json_table_and_plot(tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "muse_lightning.bench", "--preset", "tiny", "--device", "cpu", "--rounds", "1",
           "--warmup", "1", "--modes", "[eager, compiled]", "--seed_design", "true", "--out", str(out), "--plot", str(plot)]
    ran = subprocess.run(cmd, check=True, capture_output=True, text=True)
    printed = ran.stdout
    assert "profiler_start" not in ran.stderr and "gpuGetDeviceCount" not in ran.stderr  # no profiler log lines
    records = json.loads(out.read_text())
    assert all(REQUIRED <= set(r) for r in records)
    assert {r["conv_backend"] for r in records} == {os.environ.get("MUSE_CONV_BACKEND", "torch")}
    impls = {r["impl"] for r in records}
    assert {"timm Attention", "plain attention (N x N)", "MUSE static 1-D", "MUSE static 1-D, shared proj",
            "MUSE dynamic 1-D", "MUSE static 2-D", "seed design, as shipped", "seed design, dropout 0"} <= impls
    assert {(r["mode"], r["pass"]) for r in records} == {(m, p) for m in ("eager", "compiled") for p in ("fwd", "fwd+bwd")}
    for r in records:
        assert r["ms_median"] > 0 and r["peak_mem_mb"] >= 0 and r["impl"] in printed
        if r["impl"] == "timm Attention":
            assert r["ratio"] == 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = subprocess.run([sys.executable, "-m", "muse_lightning.bench", "--markdown", f"[{out}]"], check=True,
                            capture_output=True, text=True).stdout
    from muse_lightning.bench import markdown_table

    assert tables.strip() == markdown_table(records)


def test_markdown_table_has_a_row_per_impl_and_the_modes_side_by_side():
    from muse_lightning.bench import markdown_table

    def record(impl, mode, ms, shape="tiny N=16"):
        return {"level": "mixer", "impl": impl, "mode": mode, "pass": "fwd+bwd", "shape": shape, "batch": 2,
                "dtype": "fp32", "device": "cpu", "threads": 2, "cpu": "Xeon", "ms_median": ms, "peak_mem_mb": 1.0,
                "ratio": ms / 2.0, "conv_backend": "torch"}

    records = [record("timm Attention", "eager", 2.0), record("MUSE static 1-D", "eager", 3.0),
               record("timm Attention", "compiled", 2.0), record("MUSE static 1-D", "compiled", 2.5),
               record("timm Attention", "eager", 2.0, shape="tiny N=32")]
    first, second = markdown_table(records).split("\n\n*")
    assert first.splitlines() == [
        "*tiny N=16, fwd+bwd, batch 2, fp32, 2 threads of Xeon*", "",
        "| impl | conv backend | eager ms | eager peak MiB | eager ratio | compiled ms | compiled peak MiB | compiled ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| timm Attention | torch | 2.00 | 1 | 1.00 | 2.00 | 1 | 1.00 |",
        "| MUSE static 1-D | torch | 3.00 | 1 | 1.50 | 2.50 | 1 | 1.25 |",
    ]
    assert second.startswith("tiny N=32") and second.splitlines()[-1].endswith("| 1.00 |  |  |  |")


def test_bench_peak_memory_sees_the_attention_matrix():
    """At N=1024 the materialised N x N attention needs far more memory than fused SDPA."""
    from muse_lightning.bench import Shape, measure_mixers

    records = list(measure_mixers([Shape("N=1024", 1, 1024, 32, 2)], ["eager"], ["fwd+bwd"], "cpu", 1, 1))
    peak = {r["impl"]: r["peak_mem_mb"] for r in records}
    assert peak["plain attention (N x N)"] > 2 * peak["timm Attention"]
    assert peak["MUSE static 1-D"] < peak["plain attention (N x N)"]


def test_model_rows_pair_each_muse_vit_with_timms_vit_of_its_size():
    from muse_lightning.bench import measure_models

    records = list(measure_models(["eager"], "cpu", batch=1, depth=1, rounds=1, warmup=0, sizes=["small", "base"]))
    assert [(r["impl"], r["dim"]) for r in records] == [
        ("timm vit_small_patch16_224", 384), ("muse_vit_small_patch16_224", 384),
        ("timm vit_base_patch16_224", 768), ("muse_vit_base_patch16_224", 768),
    ]
    assert [r["ratio"] for r in records][::2] == [1.0, 1.0] and all(r["images_per_s"] > 0 for r in records)


def test_model_rows_alone_skip_the_mixers():
    from muse_lightning.bench import main

    records = main(preset="vit-s", device="cpu", modes=["eager"], passes=["fwd+bwd"], mixers=False, models=True,
                   model_sizes=["small"], quick=True, rounds=1, warmup=0)
    assert [r["level"] for r in records] == ["model", "model"]


def test_bench_impls_times_only_the_named_mixers_and_the_baseline(tmp_path):
    from muse_lightning.bench import main

    records = main(preset="tiny", device="cpu", modes=["eager"], passes=["fwd"], models=False, rounds=1, warmup=0,
                   impls=["MUSE static 2-D"], out=str(tmp_path / "bench.json"))
    assert {r["impl"] for r in records} == {"timm Attention", "MUSE static 2-D"}
    assert json.loads((tmp_path / "bench.json").read_text()) == records


def test_bench_impls_names_the_choices_for_an_unknown_mixer():
    from muse_lightning.bench import main

    with pytest.raises(ValueError, match=r"impls names no mixer \['MUSE 3-D'\]; choose from .*'MUSE static 1-D'"):
        main(preset="tiny", device="cpu", impls=["MUSE 3-D"])


def test_bench_run_stopped_partway_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """The JSON is rewritten as each row is measured: a run killed at its time limit (here: compiling fails)
    still holds its eager rows."""
    from muse_lightning import bench

    def eager_only(module, mode):
        if mode != "eager":
            raise RuntimeError("stopped")
        return module

    monkeypatch.setattr(bench, "_prepare", eager_only)
    out = tmp_path / "bench.json"
    with pytest.raises(RuntimeError, match="stopped"):
        bench.main(preset="tiny", device="cpu", modes=["eager", "compiled"], passes=["fwd"], models=False, rounds=1,
                   warmup=0, out=str(out))
    records = json.loads(out.read_text())
    assert {r["mode"] for r in records} == {"eager"}
    assert {"timm Attention", "MUSE static 1-D"} <= {r["impl"] for r in records}
