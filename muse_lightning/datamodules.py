"""LightningDataModules: Fashion-MNIST, WordNet glosses, and users' own image folders and text files.

Every module knows ``num_classes`` as soon as it is built (the CLI links it into the model), checks
its paths at construction (a missing file is an error at startup, not after an epoch), and splits
deterministically: a stratified split with a fixed ``seed``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .datasets import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, WORDNET_DIR, WORDNET_LEXNAMES, ByteTokenizer, load_embedded_fashion_mnist,
    load_embedded_wordnet_glosses, read_fashion_mnist, read_text_table, read_wordnet_glosses, split_indices,
)

__all__ = [
    "FashionMNISTDataModule", "ImageFolderDataModule", "ResumableSampler", "TextFileDataModule", "WordNetGlossesDataModule",
]

Source = Literal["auto", "embedded", "system"]


def _resolve_source(source: str, root: str | None, default: Path, name: str, package: str) -> tuple[str, Path]:
    """``("system" | "embedded", directory)`` for a data set that is a Debian package or a shipped subset."""
    if source not in ("auto", "embedded", "system"):
        raise ValueError(f"source must be 'auto', 'embedded' or 'system', got {source!r}")
    directory = Path(root) if root is not None else default
    if (root is not None or source == "system") and not directory.is_dir():
        raise FileNotFoundError(
            f"{name} directory {directory} not found: install Debian's {package} package, or use source='embedded'"
        )
    return ("system" if source == "system" or (source == "auto" and directory.is_dir()) else "embedded"), directory


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _split(what: str, labels: np.ndarray, fractions: dict[str, float], seed: int) -> list[np.ndarray]:
    """``split_indices`` by named fractions, refusing a split that comes out empty."""
    parts = split_indices(labels, list(fractions.values()), seed=seed)
    for name, part in zip([*fractions, "the training split"], parts):
        if len(part) == 0:
            raise ValueError(
                f"{what}: {len(labels)} rows are too few to split by {fractions}: {name} would be empty "
                "(give more data, other fractions, or a separate validation file)"
            )
    return parts


class ResumableSampler(DistributedSampler):
    """Training order that an interrupted run can pick up mid-epoch.

    A ``DistributedSampler`` (each epoch a permutation seeded by ``seed + epoch``, this process's share
    under DDP, so Lightning keeps it as it is) whose ``resume_at = (epoch, samples)`` makes the first
    pass over that epoch skip the samples the interrupted run had already trained on.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        replicas = {} if distributed else {"num_replicas": 1, "rank": 0}
        super().__init__(dataset, shuffle=True, seed=seed, **replicas)
        self.resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            indices = indices[self.resume_at[1]:]
        self.resume_at = None
        return iter(indices)


class _ClassificationData(L.LightningDataModule):
    """Loaders over ``self.train_set`` / ``val_set`` / ``test_set``; predict runs on ``predict_set`` (the test set
    unless a subclass reads its own).

    The training order is seeded by the run's seed (``seed_everything``) and the epoch, and each checkpoint
    records how far into its epoch training was (``state_dict``), so a run resumed from a mid-epoch checkpoint
    trains on the rest of that epoch's batches, in order. The loaders draw nothing from the global random
    generator, which is the model's (dropout, drop-path) and augmentation's.
    """

    classes: Sequence[str]
    collate_fn: Callable[[list[Any]], Any] | None = None  # the default collation unless a subclass sets one

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches trained in it), from a checkpoint

    @property
    def num_classes(self) -> int:
        """Number of classes, known from construction on."""
        return len(self.classes)

    @property
    def predict_set(self) -> Dataset | None:
        """What ``predict`` runs on."""
        return self.test_set

    @staticmethod
    def _shuffle_seed() -> int:
        """The run's seed (``seed_everything`` sets ``PL_GLOBAL_SEED``, on every DDP process alike), else 0."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been run")
        sampler = None
        if shuffle:
            sampler = ResumableSampler(dataset, self._shuffle_seed())
            if self._resume_at is not None:
                epoch, batches = self._resume_at
                sampler.resume_at = (epoch, batches * self.batch_size)
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=self.collate_fn, persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self._shuffle_seed()),  # worker seeds, off the global generator
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, shuffle=False)

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data when a checkpoint is saved: the epoch and the batches trained in it."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        return {"epoch": trainer.current_epoch, "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the training order where the checkpoint left it (see ``ResumableSampler``)."""
        self._resume_at = (state_dict["epoch"], state_dict["batches"]) if state_dict else None

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._resume_at = None


class _ImageArrayDataset(Dataset):
    """uint8 ``(N, H, W)`` images as normalised ``(1, H, W)`` float tensors; optional flip + shift."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float, augment: bool) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels)
        self.mean, self.std, self.augment = mean, std, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[i].float().div(255.0) - self.mean).div(self.std).unsqueeze(0)
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            dy, dx = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(torch.nn.functional.pad(x, (2, 2, 2, 2), value=-self.mean / self.std), (dy, dx), (1, 2))
            x = x[:, 2:-2, 2:-2]
        return x, self.labels[i]


class FashionMNISTDataModule(_ClassificationData):
    """Fashion-MNIST (10 classes of 28 x 28 grey clothing images).

    ``source``: ``"system"`` reads the full set from Debian's ``dataset-fashion-mnist`` (``root``,
    default ``/usr/share/datasets/fashion-mnist``); ``"embedded"`` the 10k/2k subset shipped in the
    package; ``"auto"`` the full set when installed, else the subset. The validation set is a
    stratified ``val_fraction`` of the training images; the test set is the official test split.
    (With internet, torchvision's ``FashionMNIST(root, download=True)`` writes the same IDX files:
    point ``root`` at its ``raw`` folder.)
    """

    classes = FASHION_MNIST_CLASSES
    default_root = FASHION_MNIST_DIR  # where Debian's package puts the IDX files
    in_chans = 1
    img_size = 28
    mean, std = 0.2860, 0.3530

    def __init__(
            self,
            source: Source = "auto",
            root: str | None = None,
            batch_size: int = 128,
            num_workers: int = 0,
            val_fraction: float = 0.1,
            augment: bool = True,
            seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.source, self.root = _resolve_source(source, root, self.default_root, "Fashion-MNIST", "dataset-fashion-mnist")
        _check_fraction("val_fraction", val_fraction)
        self.val_fraction, self.augment, self.seed = val_fraction, augment, seed

    def setup(self, stage: str | None = None) -> None:
        data = read_fashion_mnist(self.root) if self.source == "system" else load_embedded_fashion_mnist()
        images, labels = data["train"]
        val_idx, train_idx = _split("Fashion-MNIST", labels, {"val_fraction": self.val_fraction}, self.seed)
        make = lambda x, y, augment: _ImageArrayDataset(x, y, self.mean, self.std, augment)  # noqa: E731
        self.train_set = make(images[train_idx], labels[train_idx], self.augment)
        self.val_set = make(images[val_idx], labels[val_idx], False)
        self.test_set = make(*data["test"], False)


class ImageFolderDataModule(_ClassificationData):
    """Images in class folders (``train_dir/<class>/*.png``), read by torchvision's ``ImageFolder``.

    Validation comes from ``val_dir`` or, without one, a stratified ``val_fraction`` of the training
    folder; ``test_dir`` is optional (without it, test and predict use the validation set). Images
    are transformed by timm's ``create_transform`` at ``img_size``.
    """

    def __init__(
            self,
            train_dir: str,
            val_dir: str | None = None,
            test_dir: str | None = None,
            img_size: int = 224,
            batch_size: int = 64,
            num_workers: int = 0,
            val_fraction: float = 0.1,
            seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        from torchvision.datasets.folder import find_classes

        for name, path in (("train_dir", train_dir), ("val_dir", val_dir), ("test_dir", test_dir)):
            if path is not None and not Path(path).is_dir():
                raise FileNotFoundError(f"{name}: no such directory {path}")
        self.classes = find_classes(train_dir)[0]
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir
        self.img_size, self.val_fraction, self.seed = img_size, val_fraction, seed
        _check_fraction("val_fraction", val_fraction)

    def setup(self, stage: str | None = None) -> None:
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        train_tf = create_transform(self.img_size, is_training=True)
        eval_tf = create_transform(self.img_size, is_training=False)
        if self.val_dir is None:
            train_full, eval_full = ImageFolder(self.train_dir, train_tf), ImageFolder(self.train_dir, eval_tf)
            val_idx, train_idx = _split(
                self.train_dir, np.asarray(train_full.targets), {"val_fraction": self.val_fraction}, self.seed
            )
            self.train_set, self.val_set = Subset(train_full, train_idx.tolist()), Subset(eval_full, val_idx.tolist())
        else:
            self.train_set, self.val_set = ImageFolder(self.train_dir, train_tf), ImageFolder(self.val_dir, eval_tf)
        self.test_set = ImageFolder(self.test_dir, eval_tf) if self.test_dir is not None else self.val_set
        for name, dataset in (("val_dir", self.val_set), ("test_dir", self.test_set)):
            folder = dataset.dataset if isinstance(dataset, Subset) else dataset
            if list(folder.classes) != list(self.classes):
                raise ValueError(f"{name} has classes {folder.classes}, train_dir has {list(self.classes)}")


class _TextDataset(Dataset):
    """Tokenised texts with their class indices; ``labels=None`` for unlabelled text (label -1 in batches)."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int] | None, tokenizer: ByteTokenizer) -> None:
        self.texts = list(texts)
        self.ids = [tokenizer.encode(t) for t in texts]
        self.labels = None if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.ids[i], -1 if self.labels is None else self.labels[i]


class _TextData(_ClassificationData):
    def __init__(self, max_length: int, batch_size: int, num_workers: int) -> None:
        super().__init__(batch_size, num_workers)
        self.tokenizer = ByteTokenizer(max_length)
        self.collate_fn = self.tokenizer.collate
        self.max_length = max_length


class WordNetGlossesDataModule(_TextData):
    """WordNet 3.0 glosses, each labelled by its lexicographer file (45 supersense classes).

    ``source``: ``"system"`` reads all 117,659 glosses from Debian's ``wordnet-base`` (``root``,
    default ``/usr/share/wordnet``); ``"embedded"`` the 24k subset shipped in the package;
    ``"auto"`` the full set when installed. Train / val / test is a stratified split by ``seed``.
    Byte-level tokens (``ByteTokenizer``), cut at ``max_length``.
    """

    classes = WORDNET_LEXNAMES
    default_root = WORDNET_DIR  # where Debian's wordnet-base puts data.noun, data.verb, ...

    def __init__(
            self,
            source: Source = "auto",
            root: str | None = None,
            max_length: int = 128,
            batch_size: int = 64,
            num_workers: int = 0,
            val_fraction: float = 0.1,
            test_fraction: float = 0.1,
            seed: int = 0,
    ) -> None:
        super().__init__(max_length, batch_size, num_workers)
        self.source, self.root = _resolve_source(source, root, self.default_root, "WordNet", "wordnet-base")
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed

    def setup(self, stage: str | None = None) -> None:
        texts, labels = read_wordnet_glosses(self.root) if self.source == "system" else load_embedded_wordnet_glosses()
        parts = _split("WordNet glosses", labels, {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction}, self.seed)
        val_set, test_set, train_set = (
            _TextDataset([texts[i] for i in idx], labels[idx].tolist(), self.tokenizer) for idx in parts
        )
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set


class TextFileDataModule(_TextData):
    """Users' own labelled text: ``.csv`` (header row, UTF-8) or ``.jsonl`` files with a text and a label field.

    Classes are the sorted distinct labels of ``train_file``; validation comes from ``val_file`` or
    a stratified ``val_fraction`` of the training rows; test uses ``test_file`` (or the validation
    set); predict uses ``predict_file``, whose label field is optional (else the test set). Every file
    is read and checked when the module is built: a missing field, an empty or null label, a ragged
    CSV row or a broken JSONL line is an error naming the file and the row.
    """

    def __init__(
            self,
            train_file: str,
            val_file: str | None = None,
            test_file: str | None = None,
            predict_file: str | None = None,
            text_field: str = "text",
            label_field: str = "label",
            max_length: int = 256,
            batch_size: int = 64,
            num_workers: int = 0,
            val_fraction: float = 0.1,
            seed: int = 0,
    ) -> None:
        super().__init__(max_length, batch_size, num_workers)
        _check_fraction("val_fraction", val_fraction)
        self.files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
        tables = {
            split: read_text_table(path, text_field, label_field, require_labels=split != "predict")
            for split, path in self.files.items() if path
        }
        self.classes = sorted(set(tables["train"][1]))
        index = {c: i for i, c in enumerate(self.classes)}
        self.encoded: dict[str, tuple[list[str], np.ndarray | None]] = {}
        for split, (texts, labels) in tables.items():
            unknown = sorted(set(labels or ()) - set(index))
            if unknown:
                raise ValueError(f"{self.files[split]}: labels {unknown[:5]} do not occur in train_file")
            self.encoded[split] = (texts, None if labels is None else np.asarray([index[x] for x in labels], dtype=np.int64))
        self.val_fraction, self.seed = val_fraction, seed
        self._predict_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        texts, labels = self.encoded["train"]
        make = lambda t, y: _TextDataset(t, None if y is None else y.tolist(), self.tokenizer)  # noqa: E731
        if "val" in self.encoded:
            self.train_set, self.val_set = make(texts, labels), make(*self.encoded["val"])
        else:
            val_idx, train_idx = _split(self.files["train"], labels, {"val_fraction": self.val_fraction}, self.seed)
            self.train_set = make([texts[i] for i in train_idx], labels[train_idx])
            self.val_set = make([texts[i] for i in val_idx], labels[val_idx])
        self.test_set = make(*self.encoded["test"]) if "test" in self.encoded else self.val_set
        self._predict_set = make(*self.encoded["predict"]) if "predict" in self.encoded else self.test_set

    @property
    def predict_set(self) -> Dataset | None:
        """``predict_file`` when given, else the test set."""
        return self._predict_set
