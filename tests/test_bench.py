"""The speed-ratio script runs and writes its records (no timing is asserted)."""
import json
import subprocess
import sys


def test_ratio_script_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "ratio.json"
    cmd = [sys.executable, "-m", "muse_lightning.bench", "--out", str(out), "--batch", "2", "--seq_len", "9",
           "--dim", "16", "--num_heads", "2", "--rounds", "2"]
    printed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    records = json.loads(out.read_text())
    impls = [r["impl"] for r in records]
    assert impls[0] == "timm Attention" and "MUSE static" in impls and any(i.startswith("seed") for i in impls)
    for r in records:
        assert r["ms_median"] > 0 and r["pass"] == "fwd+bwd" and (r["batch"], r["seq_len"], r["dim"]) == (2, 9, 16)
        assert r["impl"] in printed
    assert records[0]["ratio"] == 1.0
