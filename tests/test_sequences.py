"""Numeric sequences: the padding-aware SequenceClassifier, its .npz / .npy data module and its config."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from muse_lightning import ResumableSampler, SequenceFileDataModule
from muse_lightning.datamodules import _SequenceDataset
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


def write_shapes(path: Path, count: int, seed: int, labels: bool = True) -> None:
    """Noisy univariate series of 24-40 steps, each holding one short spike somewhere: up then down (class
    "peak") or down then up ("dip"). Both have the same mean and spread, so only the local shape tells them
    apart. Padding past each length holds garbage."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(24, 41, count)
    features = rng.normal(0, 0.2, (count, 40, 1)).astype(np.float32)
    features[np.arange(40)[None, :] >= lengths[:, None]] = 1e3
    names = np.where(np.arange(count) % 2 == 0, "peak", "dip")
    for i in range(count):
        start = rng.integers(0, lengths[i] - 6)
        features[i, start:start + 6, 0] += (1.0 if names[i] == "peak" else -1.0) * np.array([1, 2, 1, -1, -2, -1])
    np.savez(path, features=features, lengths=lengths, **({"labels": names} if labels else {}))


@pytest.mark.parametrize(("max_tokens", "stem_kernel", "normalize", "global_pool"), [
    (None, None, False, "avg"), (None, 7, True, "max"), (4, None, True, "catavgmax"), (3, 9, False, "catavgmax"),
])
def test_a_sequences_logits_do_not_depend_on_its_padding(max_tokens, stem_kernel, normalize, global_pool):
    net = MUSESequenceNet(
        4, in_features=3, max_length=16, dim=32, depth=2, num_heads=4, max_tokens=max_tokens, stem_kernel=stem_kernel,
        normalize=normalize, global_pool=global_pool,
    ).eval()
    for length in (1, 5, 7, 8):
        seq = torch.randn(1, length, 3)
        padded = torch.cat([seq, torch.full((1, 16 - length, 3), 1e4)], dim=1)  # padding holds huge values
        mask = torch.arange(16)[None, :] >= length
        batch = torch.cat([padded, torch.randn(1, 16, 3)])
        logits = net(batch, key_padding_mask=torch.cat([mask, torch.zeros(1, 16, dtype=torch.bool)]))
        torch.testing.assert_close(logits[0], net(seq)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"stem_kernel": 4}, r"stem_kernel must be an odd int of at least the stem's stride \(1 steps\), got 4"),
    ({"max_tokens": 4, "stem_kernel": 3}, r"at least the stem's stride \(8 steps\), got 3"),
    ({"max_tokens": 0}, "max_tokens must be a positive int or None, got 0"),
    ({"global_pool": "mean"}, r"global_pool must be one of \('avg', 'max', 'catavgmax'\), got 'mean'"),
])
def test_bad_stems_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MUSESequenceNet(2, in_features=1, max_length=32, dim=32, num_heads=4, **kwargs)


@pytest.mark.parametrize("global_pool", ["avg", "max", "catavgmax"])
def test_each_global_pool_reads_the_tokens_it_names(global_pool):
    """avg is the real tokens' mean, max their maximum per channel, catavgmax both side by side; a row of
    padding alone pools to zeros (finite logits, as avg always gave)."""
    net = MUSESequenceNet(3, in_features=2, max_length=8, dim=16, depth=1, num_heads=2, global_pool=global_pool).eval()
    tokens = torch.randn(2, 8, 16)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1] = True
    seen = {}
    net.head.register_forward_hook(lambda module, args, out: seen.update(pooled=args[0]))
    with torch.no_grad():
        logits = net._classify(tokens, mask)
        x = tokens + net.pos_embed
        for block in net.blocks:
            x = block(x, key_padding_mask=mask)
        x = net.norm(x)[0, :5]
    parts = {"avg": [x.mean(0)], "max": [x.amax(0)], "catavgmax": [x.mean(0), x.amax(0)]}[global_pool]
    torch.testing.assert_close(seen["pooled"][0], torch.cat(parts))
    assert seen["pooled"].shape == (2, 32 if global_pool == "catavgmax" else 16)
    assert torch.equal(seen["pooled"][1], torch.zeros_like(seen["pooled"][1])) and logits.isfinite().all()


def test_a_strided_stem_makes_max_tokens_tokens_of_the_longest_sequence():
    net = MUSESequenceNet(2, in_features=1, max_length=21, dim=32, depth=1, num_heads=4, max_tokens=6)
    assert net.stride == 4 and net.embed.kernel_size == (7,) and net.pos_embed.shape[1] == 6  # ceil(21 / 4) tokens
    assert MUSESequenceNet(2, in_features=1, max_length=21, dim=32, num_heads=4, max_tokens=64).stride == 1
    with pytest.raises(ValueError, match="the input has 22 steps, more than max_length=21"):
        net(torch.zeros(1, 22, 1))


def test_augmented_draws_are_windows_of_real_steps_only():
    features = np.full((3, 30, 2), 1e3, np.float32)  # 1e3: padding the draws must never reach
    lengths = np.array([30, 10, 1])
    for i, n in enumerate(lengths):
        features[i, :n] = np.random.default_rng(i).normal(size=(n, 2))
    data = _SequenceDataset(features, lengths, [0, 1, 0], np.zeros(2, np.float32), np.ones(2, np.float32), augment=True)
    for _ in range(50):
        for i, n in enumerate(lengths):
            steps, label = data[i]
            assert max(1, int(0.8 * n)) <= len(steps) <= n and label == [0, 1, 0][i]
            assert steps.abs().max() < 100  # scaled and jittered real values, no padding
    plain = _SequenceDataset(features, lengths, [0, 1, 0], np.zeros(2, np.float32), np.ones(2, np.float32))
    assert torch.equal(plain[1][0], torch.from_numpy(features[1, :10]))  # no augmentation: the steps as they are


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


def test_differences_append_each_features_steps_differences_from_the_real_steps_alone(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 9, 2)).astype(np.float32)
    lengths, labels = np.array([9, 6, 4, 7]), np.array([0, 1, 0, 1])
    padded = features.copy()
    for row, n in enumerate(lengths):
        padded[row, n:] = 1e3  # other padding: the differences must not read it
    np.savez(tmp_path / "a.npz", features=features, lengths=lengths, labels=labels)
    np.savez(tmp_path / "b.npz", features=padded, lengths=lengths, labels=labels)
    a, b = (SequenceFileDataModule(str(tmp_path / name), standardize=False, differences=True, min_val_size=50)
            for name in ("a.npz", "b.npz"))
    assert a.in_features == b.in_features == 4
    a.setup("fit")
    b.setup("fit")
    for i in range(len(a.train_set)):
        steps = a.train_set[i][0]
        torch.testing.assert_close(steps, b.train_set[i][0])
        row = next(r for r, n in enumerate(lengths) if n == len(steps))
        series = torch.from_numpy(features[row, : lengths[row]])
        torch.testing.assert_close(steps[:, :2], series)
        torch.testing.assert_close(steps[0, 2:], torch.zeros(2))  # the first step's difference
        torch.testing.assert_close(steps[1:, 2:], series[1:] - series[:-1])


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


def test_the_shipped_sequence_recipe_learns_a_small_set_then_predicts_unlabelled_files(tmp_path, monkeypatch):
    """40 training series told apart by a local shape alone: the shipped config as it is (its schedule sized by
    the data: 15 epochs of 100 steps; no held-out split of so few) learns what 10 epochs of one step could not."""
    monkeypatch.chdir(tmp_path)
    write_shapes(tmp_path / "train.npz", 40, seed=0)
    write_shapes(tmp_path / "test.npz", 200, seed=1)
    write_shapes(tmp_path / "new.npz", 10, seed=2, labels=False)
    args = ["--config", str(CONFIGS / "sequence_files.yaml"), "--data.train_file", "train.npz", "--data.test_file", "test.npz"]
    main(["fit", *args])
    best = tmp_path / "runs" / "sequence_files" / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    hp = checkpoint["hyper_parameters"]
    assert hp["in_features"] == 1 and hp["max_length"] == 40 and hp["num_classes"] == 2  # linked from the data
    logged = last_metrics(tmp_path / "runs" / "sequence_files" / "logs")
    assert logged["step"] >= 1400  # 15 epochs of at least 100 steps, not 15 steps
    main(["test", *args, "--ckpt_path", str(best)])
    assert last_metrics(tmp_path / "runs" / "sequence_files" / "logs")["test/acc"] > 0.9  # chance is 0.5
    main(["predict", *args, "--data.predict_file", "new.npz", "--ckpt_path", str(best)])
    with open(tmp_path / "runs" / "sequence_files" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and list(rows[0]) == ["index", "prediction", "probability"]
    assert {r["prediction"] for r in rows} <= {"peak", "dip"}


def test_small_sets_take_at_least_min_train_batches_and_large_ones_keep_their_epochs(tmp_path):
    write_bumps(tmp_path / "small.npz", 50, seed=0)
    write_bumps(tmp_path / "large.npz", 2000, seed=1)
    small = SequenceFileDataModule(str(tmp_path / "small.npz"), batch_size=64, min_train_batches=100, min_val_size=50)
    large = SequenceFileDataModule(str(tmp_path / "large.npz"), batch_size=64, min_train_batches=20, min_val_size=50)
    for data in (small, large):
        data.setup("fit")
    assert len(small.train_set) == 50 and len(small.train_dataloader()) == 100  # 128 passes over the 50
    assert len(large.train_set) == 1800 and len(large.train_dataloader()) == 29  # one pass: ceil(1800 / 64)


def test_a_repeated_epoch_draws_every_sample_equally_often_and_resumes_mid_epoch():
    sampler = ResumableSampler(range(10), seed=3, min_samples=35)
    sampler.set_epoch(2)
    order = list(sampler)
    assert len(order) == len(sampler) == 40 and np.bincount(order).tolist() == [4] * 10
    assert order != list(ResumableSampler(range(10), seed=4, min_samples=35))  # the seed shuffles
    sampler.resume_at = (2, 13)
    assert list(sampler) == order[13:]
    assert list(ResumableSampler(range(10), seed=3)) == list(torch.utils.data.DistributedSampler(
        range(10), num_replicas=1, rank=0, seed=3))  # one pass: DistributedSampler's own order


def test_a_file_too_small_to_split_trains_and_validates_on_every_row(tmp_path):
    """50 sequences of 10 classes: a 10% split would leave classes out; the module trains on all of them."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", features=rng.normal(size=(50, 12, 1)).astype(np.float32), labels=np.arange(50) % 10)
    data = SequenceFileDataModule(str(tmp_path / "small.npz"), min_val_size=50)
    data.setup("fit")
    assert len(data.train_set) == len(data.val_set) == 50 and not data.val_set.augment
    held_out = SequenceFileDataModule(str(tmp_path / "small.npz"), val_fraction=0.2, min_val_size=10)
    held_out.setup("fit")
    assert (len(held_out.train_set), len(held_out.val_set)) == (40, 10)
