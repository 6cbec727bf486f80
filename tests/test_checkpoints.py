"""Checkpoints a user can trust: honest last.ckpt, exact resume after kill -9, no silent overrides or
overwrites, named errors for damaged or foreign checkpoints, and CLI errors that end on their own message."""
import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KILLER, run_cli, write_rotten_tomatoes, write_tiny_bert

from muse_lightning.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"
TINY_VIT = json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2, "drop_path_rate": 0.1})
QUICK = ["--config", str(CONFIGS / "quickstart.yaml"), "--model.init_args.model_kwargs", TINY_VIT,
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1"]


def _labelled_csv(path: Path, rows: int, words: list[str]) -> Path:
    """Two classes of texts, each of six words from its own half of ``words``."""
    rng = random.Random(0)
    half = len(words) // 2
    labels = [i % 2 for i in range(rows)]
    texts = [" ".join(rng.choice(words[half * y: half * (y + 1)]) for _ in range(6)) for y in labels]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(texts, [f"c{y}" for y in labels])])
    return path


def _family_args(family: str, root: Path) -> list[str]:
    """A shipped task config at a small size, and the data it reads (written under ``root``)."""
    tiny_text = ["--model.init_args.dim", "32", "--model.init_args.depth", "1", "--model.init_args.num_heads", "2"]
    words = [f"word{i}" for i in range(40)]
    if family == "vision":
        return ["--config", str(CONFIGS / "quickstart.yaml"), "--model.init_args.model_kwargs", TINY_VIT]
    if family == "wordnet-text":
        return ["--config", str(CONFIGS / "text_quickstart.yaml"), *tiny_text, "--data.init_args.batch_size", "16"]
    if family == "text-files":  # a Unigram vocabulary trained on the file, kept in the checkpoint
        return ["--config", str(CONFIGS / "text_files.yaml"), *tiny_text, "--model.init_args.ngram_buckets", "1000",
                "--data.init_args.train_file", str(_labelled_csv(root / "train.csv", 300, words)),
                "--data.init_args.vocab_size", "100", "--data.init_args.batch_size", "8"]
    if family == "reviews":
        return ["--config", str(CONFIGS / "reviews.yaml"), *tiny_text, "--model.init_args.ngram_buckets", "1000",
                "--data.init_args.path", str(write_rotten_tomatoes(root / "rt.csv.bz2", per_class=150)),
                "--data.init_args.vocab_size", "100", "--data.init_args.batch_size", "8"]
    if family == "sequences":  # augmented: random windows, scales and jitter
        rng = np.random.default_rng(0)
        np.savez(root / "train.npz", features=rng.normal(size=(300, 20, 2)).astype(np.float32),
                 labels=np.arange(300) % 3, lengths=rng.integers(12, 21, 300))
        return ["--config", str(CONFIGS / "sequence_files.yaml"), "--model.init_args.dim", "32",
                "--data.init_args.train_file", str(root / "train.npz"), "--data.init_args.batch_size", "8"]
    if family == "hf-encoder":
        folder, words = write_tiny_bert(root)
        return ["--config", str(CONFIGS / "text_encoder.yaml"), "--model.init_args.encoder", str(folder),
                "--model.init_args.pretrained", "false", "--data.init_args.tokenizer", str(folder),
                "--data.init_args.train_file", str(_labelled_csv(root / "train.csv", 300, words)),
                "--data.init_args.max_length", "16", "--data.init_args.batch_size", "8"]
    raise ValueError(family)


@pytest.mark.parametrize(("family", "kill_at", "saved_at"), [
    *[(family, 52, 50) for family in ("vision", "wordnet-text", "text-files", "reviews", "sequences", "hf-encoder")],
    ("vision", 56, 54),
], ids=lambda v: str(v))
def test_fit_killed_then_resumed_ends_with_the_uninterrupted_weights_and_metrics(tmp_path, family, kill_at, saved_at):
    """Every shipped task family, 3 epochs of 27 steps; last.ckpt every 50 steps and at epoch ends: kill -9 at
    step 52 resumes from step 50, mid-epoch (data order, augmentation, dropout and drop-path draws must pick up
    exactly), at 56 from the epoch end (54)."""
    if family == "hf-encoder":
        pytest.importorskip("transformers")  # the text extra; CI installs it with the dev extra
    (tmp_path / "killer.py").write_text(KILLER)
    fit = ["fit", *_family_args(family, tmp_path), "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "27",
           "--trainer.limit_val_batches", "2"]
    whole = run_cli([*fit, "--trainer.default_root_dir", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_cli([*fit, "--trainer.default_root_dir", "cut", "--trainer.callbacks+=killer.KillAt",
                   "--trainer.callbacks.step", str(kill_at)], tmp_path)
    assert killed.returncode == -9
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == saved_at
    resumed = run_cli([*fit, "--trainer.default_root_dir", "cut", "--ckpt_path", str(last)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 81
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)

    def epoch_rows(path: Path) -> dict[str, dict[str, float]]:
        """Each epoch's train and val metrics (CSVLogger writes them in separate rows)."""
        epochs: dict[str, dict[str, float]] = {}
        with open(path) as f:
            for row in csv.DictReader(f):
                epochs.setdefault(row["epoch"], {}).update({k: float(v) for k, v in row.items() if v and "/" in k})
        return {epoch: values for epoch, values in epochs.items() if "train/acc" in values}

    uninterrupted = epoch_rows(tmp_path / "whole" / "logs" / "version_0" / "metrics.csv")
    after_resume = epoch_rows(tmp_path / "cut" / "logs" / "version_1" / "metrics.csv")
    assert set(after_resume) == ({"1", "2"} if kill_at == 52 else {"2"})
    for epoch, row in after_resume.items():  # the resumed epoch's training metrics include the batches before the kill
        for key in ("train/acc", "train/loss", "val/acc", "val/loss"):
            assert row[key] == pytest.approx(uninterrupted[epoch][key], abs=1e-6), (epoch, key)


def test_last_ckpt_is_the_last_epoch_even_when_the_monitored_metric_does_not_improve(tmp_path):
    # lr 0: val/acc never improves after the first epoch, so best.ckpt stays at epoch 0.
    main(["fit", *QUICK, "--trainer.max_epochs", "3", "--model.init_args.optimizer.init_args.lr", "0.0",
          "--trainer.default_root_dir", str(tmp_path)])
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert best["epoch"] == 0
    assert last["epoch"] == 2 and last["global_step"] == 9


def test_fit_refuses_to_overwrite_an_earlier_runs_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *QUICK])  # the shipped default_root_dir, runs/quickstart
    best = tmp_path / "runs" / "quickstart" / "checkpoints" / "best.ckpt"
    before = best.read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds checkpoints of an earlier run \(best.ckpt, last.ckpt\).*"
                                              r"--ckpt_path .*last.ckpt.*--trainer.default_root_dir.*--overwrite true"):
        main(["fit", *QUICK])
    assert best.read_bytes() == before
    main(["fit", *QUICK, "--overwrite", "true", "--seed_everything", "1"])  # another seed: other weights
    assert best.read_bytes() != before


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_untrained_weights_needs_to_be_asked_for(tmp_path, subcommand):
    args = [subcommand, *QUICK, "--trainer.limit_predict_batches", "1", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=f"{subcommand} without --ckpt_path would run the model's untrained weights"):
        main(args)
    assert not (tmp_path / "predictions.csv").exists()
    main([*args, "--allow_untrained", "true"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """best.ckpt of a 3-step quickstart run."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", *QUICK, "--trainer.default_root_dir", str(root)])
    return root / "checkpoints" / "best.ckpt"


@pytest.mark.parametrize(("overrides", "match"), [
    (["--config", str(CONFIGS / "quickstart_attention.yaml"), "--model.init_args.model_kwargs", TINY_VIT],
     r"mixer: .*'conv_type': 'static'.* in the checkpoint, .*'conv_type': 'none'.* in the config"),
    (["--model.init_args.model_name", "muse_vit_tiny_convstem_28"],
     r"model_name: 'muse_vit_tiny_patch4_28' in the checkpoint, 'muse_vit_tiny_convstem_28' in the config"),
    (["--model", "muse_lightning.TextClassifier", "--data", "muse_lightning.WordNetGlossesDataModule"],
     r"class_path: muse_lightning.ImageClassifier in the checkpoint, muse_lightning.TextClassifier in the config"),
], ids=["attention-config", "model-override", "other-class"])
def test_a_config_that_differs_from_the_checkpoint_is_an_error_naming_both(trained, overrides, match):
    with pytest.raises(ValueError, match=f"--ckpt_path {trained} was trained with another model than the config gives: "):
        main(["test", *QUICK, *overrides, "--ckpt_path", str(trained)])
    with pytest.raises(ValueError, match=match):
        main(["test", *QUICK, *overrides, "--ckpt_path", str(trained)])


def test_another_optimizer_in_the_config_still_evaluates_the_checkpoint(trained, tmp_path):
    """The optimizer and schedule are the run's, not the network's: the checkpoint's hyper-parameters leave them
    out, and a test with other ones in the config is no mismatch."""
    assert "optimizer" not in torch.load(trained, weights_only=True)["hyper_parameters"]
    main(["test", *QUICK, "--model.init_args.optimizer", "torch.optim.SGD", "--model.init_args.optimizer.lr", "0.1",
          "--ckpt_path", str(trained), "--trainer.default_root_dir", str(tmp_path)])


def _damaged(trained: Path, tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(trained.read_bytes()[:4096])
    elif kind == "foreign":
        torch.save({"weight": torch.ones(2)}, path)
    else:  # a NaN in a weight, as flipped exponent bits give
        checkpoint = torch.load(trained, weights_only=True)
        name = next(k for k in checkpoint["state_dict"] if k.endswith("qkv.weight"))
        checkpoint["state_dict"][name][0, 0] = float("nan")
        torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(("kind", "match"), [
    ("truncated", r"cannot be read as a checkpoint \(truncated, or not a PyTorch file\)"),
    ("foreign", r"is not a Lightning checkpoint \(it lacks 'pytorch-lightning_version'"),
    ("non-finite", r"non-finite values \(NaN or inf\) in 1 tensors, e.g. \['model.blocks.0.attn.qkv.weight'\]"),
])
def test_a_damaged_or_foreign_checkpoint_is_refused_with_its_reason(trained, tmp_path, kind, match):
    with pytest.raises(ValueError, match=match):
        main(["test", *QUICK, "--ckpt_path", str(_damaged(trained, tmp_path, kind))])


def test_a_data_module_error_is_the_last_line_the_user_sees(tmp_path):
    (tmp_path / "empty.csv").write_text("text,label\n")
    run = run_cli(["fit", "--config", str(CONFIGS / "text_quickstart.yaml"), "--data", "muse_lightning.TextFileDataModule",
                "--data.train_file", "empty.csv"], tmp_path)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == "ValueError: empty.csv holds no rows"
