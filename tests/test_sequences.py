"""Numeric sequences: the padding-aware SequenceClassifier, its .npz / .npy data module and its config."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from muse_lightning import SequenceFileDataModule
from muse_lightning.cli import main
from muse_lightning.compare import last_metrics
from muse_lightning.text import MUSESequenceNet

CONFIGS = Path(__file__).parents[1] / "configs"


def write_bumps(path: Path, count: int, seed: int, labels: bool = True) -> None:
    """Noisy sequences of 12-40 steps x 3 features, each holding a short bump up (class "up") or down
    ("down") somewhere in its first feature, padded with garbage past each length."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 41, count)
    features = rng.normal(0, 0.3, (count, 40, 3)).astype(np.float32)
    features[np.arange(40)[None, :] >= lengths[:, None]] = 1e3  # padding values the model must never see
    names = np.where(np.arange(count) % 2 == 0, "up", "down")
    for i in range(count):
        start = rng.integers(0, lengths[i] - 5)
        features[i, start:start + 5, 0] += 1.0 if names[i] == "up" else -1.0
    np.savez(path, features=features, lengths=lengths, **({"labels": names} if labels else {}))


def test_a_sequences_logits_do_not_depend_on_its_padding():
    net = MUSESequenceNet(4, in_features=3, max_length=16, dim=32, depth=2, num_heads=4).eval()
    seq = torch.randn(1, 7, 3)
    padded = torch.cat([seq, torch.full((1, 9, 3), 1e4)], dim=1)  # padding holds huge values
    mask = torch.arange(16)[None, :] >= 7
    batch = torch.cat([padded, torch.randn(1, 16, 3)])
    logits = net(batch, key_padding_mask=torch.cat([mask, torch.zeros(1, 16, dtype=torch.bool)]))
    torch.testing.assert_close(logits[0], net(seq)[0], atol=1e-5, rtol=1e-5)


def test_npz_and_npy_folders_read_alike_and_link_their_sizes(tmp_path):
    write_bumps(tmp_path / "train.npz", 20, seed=0)
    folder = tmp_path / "train_npy"
    folder.mkdir()
    with np.load(tmp_path / "train.npz") as f:
        for name in f.files:
            np.save(folder / f"{name}.npy", f[name])
    a, b = SequenceFileDataModule(str(tmp_path / "train.npz")), SequenceFileDataModule(str(folder))
    assert a.classes == b.classes == ["down", "up"] and a.in_features == 3 and a.max_length <= 40
    a.setup("fit")
    batch = next(iter(a.val_dataloader()))
    assert batch["features"].shape[-1] == 3 and batch["key_padding_mask"].dtype == torch.bool
    assert not (batch["features"][batch["key_padding_mask"]] != 0).any()  # padding is zeros, not the file's 1e3
    assert a.mean.shape == (3,) and abs(float(a.train_set.features[0, :5, 1].mean())) < 3  # standardised


@pytest.mark.parametrize(("arrays", "match"), [
    ({"lengths": np.ones(2, np.int64)}, r"has no 'features' array \(it has \['lengths'\]\)"),
    ({"features": np.zeros((2, 5))}, r"features must be a numeric \(M, N, C\) array"),
    ({"features": np.zeros((0, 5, 1))}, "holds no sequences"),
    ({"features": np.zeros((2, 5, 1)), "lengths": np.array([3, 6]), "labels": np.array([0, 1])}, r"lengths must lie in \[1, 5\]"),
    ({"features": np.zeros((2, 5, 1)), "lengths": np.array([3.0, 2.0]), "labels": np.array([0, 1])}, "lengths must be 2 ints"),
    ({"features": np.full((2, 5, 1), np.nan), "lengths": np.array([3, 2]), "labels": np.array([0, 1])}, "NaN or inf"),
    ({"features": np.zeros((2, 5, 1)), "labels": np.array([0, 1, 1])}, r"labels must be 2 values .*shape \(3,\)"),
    ({"features": np.zeros((2, 5, 1))}, r"has no 'labels' array"),
])
def test_bad_sequence_files_are_named(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        SequenceFileDataModule(str(tmp_path / "bad.npz"))


def test_files_with_other_feature_widths_are_refused(tmp_path):
    np.savez(tmp_path / "a.npz", features=np.zeros((4, 5, 2)), labels=np.array([0, 1, 0, 1]))
    np.savez(tmp_path / "b.npz", features=np.zeros((2, 5, 3)), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"the files disagree on the features per step: \{'train': 2, 'test': 3\}"):
        SequenceFileDataModule(str(tmp_path / "a.npz"), test_file=str(tmp_path / "b.npz"))


def test_integer_labels_keep_their_numeric_order(tmp_path):
    np.savez(tmp_path / "a.npz", features=np.zeros((12, 3, 1)), labels=np.arange(12) % 11)
    assert SequenceFileDataModule(str(tmp_path / "a.npz"), val_fraction=0.5).classes == [str(i) for i in range(11)]


def test_sequence_recipe_learns_then_predicts_unlabelled_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_bumps(tmp_path / "train.npz", 512, seed=0)
    write_bumps(tmp_path / "test.npz", 128, seed=1)
    write_bumps(tmp_path / "new.npz", 10, seed=2, labels=False)
    args = ["--config", str(CONFIGS / "sequence_files.yaml"), "--data.train_file", "train.npz",
            "--data.test_file", "test.npz", "--model.init_args.dim", "32", "--model.init_args.depth", "2",
            "--model.init_args.lr", "0.003", "--trainer.max_epochs", "8"]
    main(["fit", *args])
    best = tmp_path / "runs" / "sequence_files" / "checkpoints" / "best.ckpt"
    hp = torch.load(best, weights_only=True)["hyper_parameters"]
    assert hp["in_features"] == 3 and hp["max_length"] == 40 and hp["num_classes"] == 2  # linked from the data
    main(["test", *args, "--ckpt_path", str(best)])
    assert last_metrics(tmp_path / "runs" / "sequence_files" / "logs")["test/acc"] > 0.85  # chance is 0.5
    main(["predict", *args, "--data.predict_file", "new.npz", "--ckpt_path", str(best)])
    with open(tmp_path / "runs" / "sequence_files" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and list(rows[0]) == ["index", "prediction", "probability"]
    assert {r["prediction"] for r in rows} <= {"up", "down"}
