"""muse-compare: runs are recorded once, skipped when recorded, and tabulated."""
import json

import pytest

from muse_lightning.compare import VARIANTS, main, table

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1"]


def test_compare_records_runs_skips_recorded_ones_and_tabulates(tmp_path, capsys):
    results = tmp_path / "results"
    main(task="vision", variants=["muse", "attention"], seeds=[0], results=str(results), extra=TINY)
    records = sorted(results.glob("*.json"))
    assert [p.name for p in records] == ["vision__attention__seed0.json", "vision__muse__seed0.json"]
    muse = json.loads((results / "vision__muse__seed0.json").read_text())
    attention = json.loads((results / "vision__attention__seed0.json").read_text())
    assert 0.0 <= muse["test_acc"] <= 1.0 and muse["config"] == "quickstart.yaml"
    assert abs(attention["params"] / muse["params"] - 1) < 0.02
    stamps = [p.stat().st_mtime for p in records]
    main(task="vision", variants=["muse", "attention"], seeds=[0], results=str(results), extra=TINY)
    assert [p.stat().st_mtime for p in records] == stamps  # recorded runs are not run again
    rows = table(results).splitlines()
    assert rows[0].startswith("| task | variant") and len(rows) == 4
    assert "| vision | muse | 1 |" in capsys.readouterr().out


def test_every_variant_is_a_shipped_config_with_overrides():
    assert set(VARIANTS) == {"vision", "text"}
    for task in VARIANTS.values():
        assert {"muse", "attention"} <= set(task)


def test_unknown_variant_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown variant 'muse-k9' for vision"):
        main(task="vision", variants=["muse-k9"], results=str(tmp_path))
