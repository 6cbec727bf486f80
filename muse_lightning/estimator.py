"""A scikit-learn classifier of time series (aeon / sktime's data layout) over the sequence recipe.

``MUSETimeSeriesClassifier`` takes ``X`` as aeon's and sktime's classifiers do: a numpy array
``(n_cases, n_channels, n_timepoints)`` (or ``(n_cases, n_timepoints)``, one channel), or a list of
``(n_channels, n_timepoints)`` arrays of unequal lengths. ``fit`` trains the package's
``SequenceClassifier`` on ``SequenceFileDataModule`` with Lightning, the same modules and recipe as
``configs/sequence_files.yaml`` (its defaults are that config's values); ``predict_proba`` runs the
best checkpoint. It is a scikit-learn estimator (``get_params`` / ``set_params``, ``clone``), so it drops
into pipelines, ``cross_val_score`` and aeon's or sktime's benchmarking.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d
from torch.utils.data import DataLoader

from .datamodules import SequenceFileDataModule, _SequenceDataset, _collate_sequences, with_differences
from .datasets import to_sequence_arrays
from .modules import SequenceClassifier
from .options import MixerOptions
from .text import GlobalPool

__all__ = ["MUSETimeSeriesClassifier"]


class MUSETimeSeriesClassifier(ClassifierMixin, BaseEstimator):
    """MUSE time-series classifier with scikit-learn's interface, trained by Lightning.

    The network is ``SequenceClassifier``'s, the data handling ``SequenceFileDataModule``'s; the defaults are
    ``configs/sequence_files.yaml``'s values.

    Args:
        dim: Token width.
        depth: Number of MUSE blocks.
        num_heads: Attention heads.
        mlp_ratio: Feed-forward width over ``dim``.
        kernel_sizes: The convolution's kernel sizes, in tokens (``MixerOptions.kernel_sizes``, a parameter of its
            own as scikit-learn's searches tune parameters).
        max_tokens: Series longer than this become overlapping patches (a strided stem); None: a token a step.
        max_length: The longest series the classifier takes, in time points; None: the longest training series.
            Give it when ``predict`` will see longer series than ``fit`` (unequal-length sets, e.g. JapaneseVowels):
            the position table and the stem's stride are sized for it.
        stem_kernel: The stem's kernel width in steps (default ``2 * stride - 1``).
        normalize: Z-normalise each series over its real steps.
        global_pool: How the tokens become one vector: ``"avg"``, ``"max"`` or ``"catavgmax"`` (both; timm's
            names, ``MUSESequenceNet``).
        drop_rate: Dropout.
        drop_path_rate: Stochastic depth.
        lr: AdamW's peak learning rate.
        weight_decay: AdamW's weight decay.
        label_smoothing: Of the cross-entropy.
        augment: Window slicing, scaling and jitter of the training series.
        differences: Append each channel's step-to-step differences as further channels (the series' slopes).
        standardize: Standardise features by the training steps' mean and spread.
        batch_size: Series a batch.
        max_epochs: Epochs, each at least ``min_train_batches`` optimizer steps.
        min_train_batches: The fewest optimizer steps an epoch makes (small sets repeat).
        val_fraction: Share of the training series held out for validation.
        min_val_size: Below this many held-out series, train and validate on all of them.
        random_state: Seed of the run (``seed_everything``).
        accelerator: Lightning's ``Trainer(accelerator=...)``.
        devices: Lightning's ``Trainer(devices=...)``.
        precision: Lightning's ``Trainer(precision=...)``.
        verbose: Show Lightning's progress bar and messages.
    """

    def __init__(
            self,
            dim: int = 64,
            depth: int = 2,
            num_heads: int = 4,
            mlp_ratio: float = 2.0,
            kernel_sizes: Sequence[int] = (1, 3, 5, 9),
            max_tokens: int | None = 64,
            max_length: int | None = None,
            stem_kernel: int | None = None,
            normalize: bool = False,
            global_pool: GlobalPool = "catavgmax",
            drop_rate: float = 0.1,
            drop_path_rate: float = 0.05,
            lr: float = 1e-3,
            weight_decay: float = 0.05,
            label_smoothing: float = 0.1,
            augment: bool = True,
            differences: bool = False,
            standardize: bool = True,
            batch_size: int = 64,
            max_epochs: int = 15,
            min_train_batches: int = 100,
            val_fraction: float = 0.1,
            min_val_size: int = 50,
            random_state: int = 0,
            accelerator: str = "cpu",
            devices: int | str = 1,
            precision: str = "32-true",
            verbose: bool = False,
    ) -> None:
        self.dim, self.depth, self.num_heads, self.mlp_ratio = dim, depth, num_heads, mlp_ratio
        self.kernel_sizes, self.max_tokens, self.stem_kernel = kernel_sizes, max_tokens, stem_kernel
        self.max_length = max_length
        self.normalize, self.global_pool = normalize, global_pool
        self.drop_rate, self.drop_path_rate = drop_rate, drop_path_rate
        self.lr, self.weight_decay, self.label_smoothing = lr, weight_decay, label_smoothing
        self.augment, self.differences = augment, differences
        self.standardize, self.batch_size = standardize, batch_size
        self.max_epochs, self.min_train_batches = max_epochs, min_train_batches
        self.val_fraction, self.min_val_size, self.random_state = val_fraction, min_val_size, random_state
        self.accelerator, self.devices, self.precision, self.verbose = accelerator, devices, precision, verbose

    def fit(self, X: Any, y: Any) -> MUSETimeSeriesClassifier:
        """Train on ``X`` (aeon's layout) and labels ``y``; keep the best checkpoint's weights (lowest val/loss)."""
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        features, lengths = to_sequence_arrays(X)
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)  # a column vector, as scikit-learn's classifiers take it
        if y.shape != (len(lengths),):
            raise ValueError(f"y must hold one label per case ({len(lengths)}), got shape {y.shape}")
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y must hold at least 2 classes, got 1 class: {self.classes_.tolist()}")
        self.n_channels_ = features.shape[2]
        L.seed_everything(self.random_state, verbose=self.verbose)
        with tempfile.TemporaryDirectory() as tmp, self._lightning_messages():
            train_file = Path(tmp) / "train.npz"
            np.savez(train_file, features=features, lengths=lengths, labels=codes)  # labels 0..K-1, in classes_' order
            data = SequenceFileDataModule(
                str(train_file), standardize=self.standardize, augment=self.augment, differences=self.differences,
                batch_size=self.batch_size,
                val_fraction=self.val_fraction, min_val_size=self.min_val_size, seed=self.random_state,
                min_train_batches=self.min_train_batches,
            )
            module = SequenceClassifier(
                num_classes=len(self.classes_), in_features=data.in_features,
                max_length=data.max_length if self.max_length is None else self.max_length,
                dim=self.dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                mixer=MixerOptions(tuple(self.kernel_sizes)), max_tokens=self.max_tokens, stem_kernel=self.stem_kernel,
                normalize=self.normalize, global_pool=self.global_pool,
                drop_rate=self.drop_rate, drop_path_rate=self.drop_path_rate,
                optimizer=partial(torch.optim.AdamW, lr=self.lr, weight_decay=self.weight_decay),
                label_smoothing=self.label_smoothing,
            )
            best = ModelCheckpoint(dirpath=Path(tmp) / "checkpoints", filename="best", monitor="val/loss", mode="min")
            trainer = L.Trainer(
                max_epochs=self.max_epochs, accelerator=self.accelerator, devices=self.devices,
                precision=self.precision, callbacks=[best], logger=False, default_root_dir=tmp,
                enable_progress_bar=self.verbose, enable_model_summary=False,
            )
            trainer.fit(module, datamodule=data)
            state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        self.module_ = module.cpu().eval()
        self.mean_, self.std_ = data.mean, data.std
        return self

    @contextlib.contextmanager
    def _lightning_messages(self) -> Iterator[None]:
        """Lightning's and the data module's information messages, only when ``verbose``."""
        logger = logging.getLogger("lightning.pytorch")
        level = logger.level
        if not self.verbose:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            logger.setLevel(level)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n_cases, n_classes)``, columns in ``classes_``' order."""
        check_is_fitted(self, "module_")
        features, lengths = to_sequence_arrays(X)
        if features.shape[2] != self.n_channels_:
            raise ValueError(f"X has {features.shape[2]} channels, the classifier was fitted on {self.n_channels_}")
        max_length = self.module_.hparams.max_length
        if features.shape[1] > max_length:
            raise ValueError(f"X has series of {features.shape[1]} time points, longer than the {max_length} the "
                             "classifier takes: fit it with max_length set to the longest series it will see")
        if not np.isfinite(features).all():
            raise ValueError("X holds NaN or inf")
        # The data module's own features, dataset (standardised by the training statistics) and collation, and
        # the module's own predict_step.
        if self.differences:
            features = with_differences(features, lengths)
        dataset = _SequenceDataset(features, lengths, None, self.mean_, self.std_)
        loader = DataLoader(dataset, batch_size=self.batch_size, collate_fn=_collate_sequences)
        with torch.inference_mode():
            probs = [self.module_.predict_step(batch, i)["probs"].double().numpy() for i, batch in enumerate(loader)]
        return np.concatenate(probs)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each case, as given in ``y``."""
        probs = self.predict_proba(X)
        return self.classes_[probs.argmax(1)]
