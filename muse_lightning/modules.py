"""LightningModules: image and text classifiers with MUSE token mixers.

The module holds the model and the optimisation: an optimizer and a learning-rate schedule given as Lightning's
callables (``OptimizerCallable`` / ``LRSchedulerCallable``; by default AdamW, with no decay on biases, norms, gates
and position tables, and ``WarmupCosineLR``: linear warm-up then cosine decay, per step), label smoothing, and
torchmetrics accuracy (top-1; top-5 when there are more than 5 classes), macro F1 and mean loss, all synced
across processes under DDP.
"""
from __future__ import annotations

import difflib
import inspect
import math
import random
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import timm
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import resolve_model_data_config
from timm.layers import to_2tuple
from timm.optim import param_groups_weight_decay
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from .options import MixerOptions
from .sharding import FSDP2Strategy
from . import swap
from .text import GlobalPool, MUSESequenceNet, MUSETextNet
from .vit import MUSEVisionTransformer

__all__ = ["ClassifierModule", "ImageClassifier", "SequenceClassifier", "TextClassifier", "WarmupCosineLR"]

# Taken by the modules, kept out of their hyper-parameters: they describe the network, a run's config the training.
_OPTIMISATION = ("optimizer", "scheduler")


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up for ``warmup_fraction`` of ``total_steps``, then cosine decay to ``min_lr_ratio`` of each
    parameter group's learning rate, stepped once per optimizer step. A ``ClassifierModule`` gives
    ``total_steps``, its run's optimizer steps."""

    def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            total_steps: int | None = None,
            warmup_fraction: float = 0.05,
            min_lr_ratio: float = 0.01,
            last_epoch: int = -1,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int (a ClassifierModule gives its run's), got {total_steps!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps, self.warmup_steps = total_steps, int(warmup_fraction * total_steps)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The learning rate at ``step`` over each group's own."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [lr * self.factor(self.last_epoch) for lr in self.base_lrs]


def _takes_run_length(scheduler: LRSchedulerCallable) -> bool:
    """Whether ``scheduler`` builds a schedule of ``total_steps`` it was not given (``WarmupCosineLR``, or
    ``OneCycleLR`` without one): a class taking it, or a partial of one (as the CLI gives) leaving it None."""
    if isinstance(scheduler, partial):
        if scheduler.keywords.get("total_steps") is not None:
            return False
        scheduler = next((a for a in (scheduler.func, *scheduler.args) if isinstance(a, type)), scheduler.func)
    return isinstance(scheduler, type) and "total_steps" in inspect.signature(scheduler).parameters


class ClassifierModule(L.LightningModule):
    """Shared training, evaluation and optimisation of the classifiers; ``self.model`` maps inputs to logits."""

    model: nn.Module

    def __init__(
            self,
            num_classes: int,
            optimizer: OptimizerCallable = torch.optim.AdamW,
            scheduler: LRSchedulerCallable = WarmupCosineLR,
            label_smoothing: float = 0.1,
    ) -> None:
        """
        Args:
            num_classes: Output classes.
            optimizer: Builds the optimizer from parameter groups (Lightning's ``OptimizerCallable``: a class, or a
                partial of one; in a config ``class_path`` and ``init_args``, e.g. ``torch.optim.AdamW`` with ``lr``
                and ``weight_decay``). Its ``weight_decay`` applies to all but biases, norms, gates and positions.
            scheduler: Builds the learning-rate schedule from the optimizer (``LRSchedulerCallable``), stepped once
                per optimizer step; one that takes ``total_steps`` and was not given it (``WarmupCosineLR``,
                ``torch.optim.lr_scheduler.OneCycleLR``) gets the run's optimizer steps.
            label_smoothing: Cross-entropy label smoothing.
        """
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        for name, value in (("optimizer", optimizer), ("scheduler", scheduler)):
            if not callable(value):
                raise TypeError(f"{name} must be a callable that builds one (a class, or a partial of one), got {value!r}")
        self.num_classes = num_classes
        self.optimizer, self.scheduler = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        }
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        collection = MetricCollection(metrics)
        # Attributes, not a ModuleDict: a "train" key would clash with nn.Module.train.
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_metrics", collection.clone(prefix=f"{stage}/"))
            setattr(self, f"{stage}_loss", MeanMetric())
        # The training metrics accumulate over an epoch: checkpoints keep them, so that a run resumed
        # mid-epoch reports the same epoch metrics as one never interrupted.
        self.train_metrics.persistent(True)
        self.train_loss.persistent(True)
        self._rng_states: dict[str, Any] | None = None
        self._flops_per_sample: int | None = None

    @property
    def flops_per_batch(self) -> int:
        """Training FLOPs (forward and backward) of one batch of the data module's ``batch_size``, what Lightning's
        ``ThroughputMonitor`` reads to report FLOP/s and MFU. Counted once, by ``measure_flops`` on a meta-device
        twin of the model (no memory, no compute, the real weights untouched) with ``example_input_array``; for
        sequences that is ``max_length`` steps, an upper bound on a padded batch."""
        if self._flops_per_sample is None:
            hparams = {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # the CLI's own entries out
            if "pretrained" in hparams:
                hparams["pretrained"] = False  # the architecture is all that counts
            # The monitor asks from inside Lightning's no-grad / inference-mode loops: count with autograd on.
            with torch.inference_mode(False), torch.enable_grad():
                with torch.device("meta"):
                    twin = type(self)(**hparams)
                example = move_data_to_device(self.example_input_array, "meta")
                self._flops_per_sample = measure_flops(twin, lambda: twin(*example), loss_fn=torch.Tensor.sum)
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return self._flops_per_sample * getattr(datamodule, "batch_size", 1)

    def forward(self, inputs: Any) -> torch.Tensor:
        """Logits for a batch's inputs: a tensor, or a dict of the model's keyword arguments."""
        return self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)

    @staticmethod
    def _split(batch: Any) -> tuple[Any, torch.Tensor]:
        """``(inputs, labels)``: a dict batch's ``labels`` and the rest, or an ``(inputs, labels)`` pair."""
        if isinstance(batch, dict):
            return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
        return batch[0], batch[1]

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        inputs, labels = self._split(batch)
        logits = self(inputs)
        loss = self.criterion(logits, labels)
        mean_loss, metrics = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_metrics")
        mean_loss.update(loss.detach(), weight=labels.numel())
        metrics.update(logits.detach(), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=not on_step)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=not on_step)
        if on_step:
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities and predicted class of each input."""
        probs = self(self._split(batch)[0]).softmax(-1)
        return {"probs": probs, "preds": probs.argmax(-1)}

    def configure_model(self) -> None:
        """Shard the network when training under ``FSDP2Strategy`` (``configs/fsdp.yaml``); nothing otherwise."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            strategy.shard(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over parameter groups: biases, norms, gates and position tables (timm's rule, and the
        model's ``no_weight_decay``) not decayed, the others at the optimizer's ``weight_decay``, parameters with a
        learning rate of their own apart; the schedule stepped per optimizer step, given the run's length where it
        takes ``total_steps``."""
        skip = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        own = self._own_lr()
        groups = param_groups_weight_decay(self.model, no_weight_decay_list=skip)
        apart = {id(p) for p, _ in own}
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in apart]
            if group["weight_decay"]:
                del group["weight_decay"]  # the decayed group: at the optimizer's own weight_decay
        groups += [{"params": [p], "lr": lr, "weight_decay": 0.0} for p, lr in own]
        optimizer = self.optimizer(groups)
        run = {"total_steps": max(int(self.trainer.estimated_stepping_batches), 1)} \
            if _takes_run_length(self.scheduler) else {}
        scheduler = self.scheduler(optimizer, **run)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _own_lr(self) -> list[tuple[nn.Parameter, float]]:
        """Parameters trained at a learning rate of their own (no weight decay; the same warm-up and decay)."""
        return []

    # Hyper-parameters that must equal the data module's attribute of the same name (the CLI links them).
    _linked_from_data: tuple[str, ...] = ()

    def setup(self, stage: str) -> None:
        """Fail before training when the data does not fit the model: classes, linked sizes, sequence length."""
        data, hp = self.trainer.datamodule, self.hparams
        data_classes = getattr(data, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes but the model was built with num_classes={self.num_classes}"
            )
        for name in self._linked_from_data:
            value = getattr(data, name, None)
            if value is not None and value != hp[name]:
                raise ValueError(f"the data has {name}={value} but the model was built with {name}={hp[name]}")
        data_length = getattr(data, "max_length", None)
        if "max_length" in hp and data_length is not None and data_length > hp.max_length:
            raise ValueError(f"the data's max_length={data_length} exceeds the model's max_length={hp.max_length}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the random generators' states, so that a resumed run draws what the uninterrupted one would; keep
        the mixer options as plain values (the CLI loads a checkpoint's hyper-parameters with ``weights_only``)."""
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = {
                k: v.as_dict() if isinstance(v, MixerOptions) else v for k, v in checkpoint["hyper_parameters"].items()
            }
        _, keys, *numpy_rest = np.random.get_state()  # as tensors and ints: checkpoints load with weights_only
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), *numpy_rest],
            "python": random.getstate(),
        }

    def on_train_start(self) -> None:
        """Restore the checkpoint's random generators when resuming (after Lightning's own start-up draws)."""
        if self._rng_states is not None:
            states, self._rng_states = self._rng_states, None
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
            keys, *numpy_rest = states["numpy"]
            np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *numpy_rest))
            random.setstate(states["python"])

    def on_train_epoch_start(self) -> None:
        """Start the epoch's training metrics afresh (a checkpoint taken at an epoch's end still holds that
        epoch's); a run resumed mid-epoch does not pass here and keeps the metrics of the batches before it."""
        self.train_metrics.reset()
        self.train_loss.reset()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with a clear message, a checkpoint whose tensors do not fit this model (another
        ``num_classes``...) or are not finite; keep its random states for ``on_train_start``."""
        own = self.state_dict()
        weights = checkpoint.get("state_dict", {})
        mismatched = [
            f"{name}: {tuple(value.shape)} in the checkpoint, {tuple(own[name].shape)} here"
            for name, value in sorted(weights.items(), key=lambda item: not item[0].startswith("model."))  # weights first
            if name in own and own[name].shape != value.shape
        ]
        if mismatched:
            raise ValueError(
                f"the checkpoint does not fit this model (num_classes={self.num_classes} here; another class count "
                f"or architecture?): {'; '.join(mismatched[:4])}"
            )
        broken = [
            name for name, value in weights.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
        ]
        if broken:
            raise ValueError(
                f"the checkpoint holds non-finite values (NaN or inf) in {len(broken)} tensors, e.g. {broken[:3]}: "
                "the file is damaged or its training diverged"
            )
        self._rng_states = checkpoint.get("rng_states")


class ImageClassifier(ClassifierModule):
    """A timm image model by name: a registered ``muse_vit_*``, or any timm model with MUSE swapped in."""

    def __init__(
            self,
            model_name: str = "muse_vit_tiny_patch4_28",
            num_classes: int = 10,
            model_kwargs: dict[str, Any] | None = None,
            pretrained: bool = False,
            swap_attention: bool = False,
            mixer: MixerOptions = MixerOptions(),
            img_size: int | None = None,
            optimizer: OptimizerCallable = torch.optim.AdamW,
            scheduler: LRSchedulerCallable = WarmupCosineLR,
            label_smoothing: float = 0.1,
    ) -> None:
        """
        Args:
            model_name: timm model name, e.g. ``muse_vit_small_patch16_224`` or ``deit_small_patch16_224``.
            num_classes: Output classes (the CLI links it from the data).
            model_kwargs: More arguments of ``timm.create_model`` (``depth``, ``img_size``, ...).
            pretrained: Load the model's pretrained weights (from a hub unless ``model_kwargs``
                carries ``pretrained_cfg_overlay=dict(file=...)``).
            swap_attention: Replace the model's timm attention by MUSE (``muse_lightning.swap_attention``).
            mixer: MUSE's options (``MixerOptions``), for a ``muse_vit_*`` model's mixers or the swapped ones.
            img_size: The image size to build the model for; the CLI links it from an image data module, so the
                model follows the data's resolution (timm resamples pretrained position embeddings to it). Given
                to models whose input size is fixed (timm's ``fixed_input_size``: ViTs, Swins); convolutional
                networks take any size. None: the model's own.
            optimizer, scheduler, label_smoothing: Optimisation, see ``ClassifierModule``.
        """
        super().__init__(num_classes, optimizer, scheduler, label_smoothing)
        self.save_hyperparameters(ignore=_OPTIMISATION)
        if not timm.is_model(model_name):
            close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
            raise ValueError(
                f"unknown model_name {model_name!r}; close matches: {close}; MUSE models: {timm.list_models('muse_vit_*')}"
            )
        kwargs = dict(model_kwargs or {})
        if "mixer" in kwargs:
            raise ValueError("give MUSE's options as mixer, not in model_kwargs")
        mixer = MixerOptions.of(mixer)
        muse_model = timm.models.model_entrypoint(model_name).__module__ == MUSEVisionTransformer.__module__
        if not (muse_model or swap_attention) and mixer != MixerOptions():
            raise ValueError(f"mixer is for muse_vit_* models or swap_attention=True; {model_name} has no MUSE mixer")
        if img_size is not None:
            if kwargs.get("img_size", img_size) != img_size:
                raise ValueError(f"img_size={img_size} (the data's) and model_kwargs' img_size={kwargs['img_size']} "
                                 "differ: drop model_kwargs' img_size, or give the data that size")
            cfg = timm.models.get_pretrained_cfg(model_name)
            if cfg is not None and cfg.fixed_input_size:
                kwargs["img_size"] = img_size
        if muse_model:
            kwargs["mixer"] = mixer
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        if swap_attention:
            swap.swap_attention(self.model, mixer)
        # One input of the model's own size (the model summary shows shapes and FLOPs): its pretrained config's,
        # unless it was built for other images (timm keeps the pretrained config's input_size then).
        channels, *size = resolve_model_data_config(self.model)["input_size"]
        kwargs.setdefault("img_size", img_size)
        channels = kwargs.get("in_chans", channels)
        size = list(to_2tuple(kwargs["img_size"])) if kwargs.get("img_size") is not None else size
        self.example_input_array = (torch.zeros(1, channels, *size),)


class TextClassifier(ClassifierModule):
    """Text classifier: MUSE blocks (``MUSETextNet``) trained from scratch, nothing to download; or with
    ``encoder``, a Hugging Face ``transformers`` encoder with MUSE swapped into its attention, fine-tuned
    (``muse_lightning.hf.HFEncoderNet``; the ``text`` extra)."""

    _linked_from_data = ("vocab_size", "pad_id")

    def __init__(
            self,
            num_classes: int = 45,
            max_length: int = 256,
            vocab_size: int = 257,
            pad_id: int = 0,
            dim: int = 128,
            depth: int = 4,
            num_heads: int = 4,
            mlp_ratio: float = 4.0,
            mixer: MixerOptions = MixerOptions(),
            parallel: bool = True,
            drop_rate: float = 0.1,
            drop_path_rate: float = 0.1,
            ngram_buckets: int = 0,
            ngram_lr: float = 0.03,
            encoder: str | None = None,
            pretrained: bool = True,
            swap_attention: bool = True,
            optimizer: OptimizerCallable = torch.optim.AdamW,
            scheduler: LRSchedulerCallable = WarmupCosineLR,
            label_smoothing: float = 0.1,
    ) -> None:
        """
        Args:
            num_classes: Output classes (the CLI links it from the data).
            max_length: Longest token sequence; at least the data module's ``max_length`` (the CLI links it).
            vocab_size, pad_id: The tokenizer's id range and padding id; 257 and 0 fit bytes (the CLI links them
                from the data module's tokenizer).
            dim, depth, num_heads, mlp_ratio, parallel, drop_rate, drop_path_rate, ngram_buckets: The network, see
                ``MUSETextNet`` (not used with ``encoder``).
            mixer: MUSE's options (``MixerOptions``), for the network's mixers or the encoder's swapped ones.
            ngram_lr: The n-gram table's learning rate (a linear model's, above the optimizer's ``lr``; no weight
                decay).
            encoder: A ``transformers`` model name or folder to fine-tune instead (its ``tokenizer.json`` is the
                data module's ``tokenizer``).
            pretrained: Load the encoder's weights; False: its config with random weights.
            swap_attention: Add MUSE's convolution branch to the encoder's attention (else the encoder as it is).
            optimizer, scheduler, label_smoothing: Optimisation, see ``ClassifierModule``.
        """
        super().__init__(num_classes, optimizer, scheduler, label_smoothing)
        self.save_hyperparameters(ignore=_OPTIMISATION)
        self.example_input_array = ({"input_ids": torch.ones(1, max_length, dtype=torch.long)},)
        if encoder is not None:
            from .hf import HFEncoderNet  # transformers: the text extra
            self.model = HFEncoderNet(encoder, num_classes, pretrained, swap_attention, mixer, pad_id)
            positions = getattr(self.model.config, "max_position_embeddings", None)
            if positions is not None and max_length > positions:
                raise ValueError(f"max_length={max_length} exceeds the encoder {encoder!r}'s {positions} positions")
            rows = self.model.model.get_input_embeddings().num_embeddings
            if vocab_size > rows:
                raise ValueError(
                    f"vocab_size={vocab_size} (the tokenizer's) exceeds the encoder {encoder!r}'s {rows} token "
                    "embeddings: use the encoder's own tokenizer.json"
                )
            return
        if swap_attention is not True:
            raise ValueError("swap_attention is an encoder option: give encoder")
        self.model = MUSETextNet(
            num_classes, vocab_size=vocab_size, max_length=max_length, pad_id=pad_id, dim=dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, mixer=mixer, parallel=parallel, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, ngram_buckets=ngram_buckets,
        )

    def _own_lr(self) -> list[tuple[nn.Parameter, float]]:
        ngrams = getattr(self.model, "ngrams", None)
        return [] if ngrams is None else [(ngrams.weight, self.hparams.ngram_lr)]


class SequenceClassifier(ClassifierModule):
    """Classifier of variable-length float sequences ``(B, N, in_features)`` (time series, audio frames, sensor
    data) with MUSE blocks (``MUSESequenceNet``); padded steps never reach the output."""

    _linked_from_data = ("in_features",)

    def __init__(
            self,
            num_classes: int = 2,
            in_features: int = 1,
            max_length: int = 512,
            dim: int = 128,
            depth: int = 4,
            num_heads: int = 4,
            mlp_ratio: float = 4.0,
            mixer: MixerOptions = MixerOptions(),
            parallel: bool = True,
            drop_rate: float = 0.1,
            drop_path_rate: float = 0.1,
            max_tokens: int | None = None,
            stem_kernel: int | None = None,
            normalize: bool = False,
            global_pool: GlobalPool = "avg",
            optimizer: OptimizerCallable = torch.optim.AdamW,
            scheduler: LRSchedulerCallable = WarmupCosineLR,
            label_smoothing: float = 0.1,
    ) -> None:
        """
        Args:
            num_classes, in_features, max_length: Classes, features per step and the longest sequence (the CLI
                links all three from the data).
            dim, depth, num_heads, mlp_ratio, mixer, parallel, drop_rate, drop_path_rate, max_tokens, stem_kernel,
                normalize, global_pool: The network, see ``MUSESequenceNet``.
            optimizer, scheduler, label_smoothing: Optimisation, see ``ClassifierModule``.
        """
        super().__init__(num_classes, optimizer, scheduler, label_smoothing)
        self.save_hyperparameters(ignore=_OPTIMISATION)
        self.model = MUSESequenceNet(
            num_classes, in_features, max_length=max_length, dim=dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, mixer=mixer, parallel=parallel, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            max_tokens=max_tokens, stem_kernel=stem_kernel, normalize=normalize, global_pool=global_pool,
        )
        self.example_input_array = ({"features": torch.zeros(1, max_length, in_features)},)
