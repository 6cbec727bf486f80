"""Callbacks: write the predictions of ``muse-lightning predict`` to a CSV file; Lightning's ``ThroughputMonitor``
with a peak FLOP/s for MFU where Lightning's table has none, and the batch-size function it needs
(``configs/throughput.yaml``)."""
from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["PredictionWriter", "ThroughputMonitor", "batch_size", "peak_flops"]

# The H200 SXM's dense peak FLOP/s by compute dtype (NVIDIA's datasheet; its tensor-core figures are quoted with 2:4
# sparsity, twice the dense ones, and halved here). PyTorch names it 'NVIDIA H200', which Lightning 2.6 does not
# find in its table (whose H200 keys want 'sxm1' or 'nvl1' in the name, and hold the sparse figures).
_H200_FLOPS: dict[torch.dtype | str, float] = {
    torch.float64: 34e12, torch.float32: 67e12, "tfloat32": 494.5e12, torch.bfloat16: 989.5e12, torch.float16: 989.5e12,
}
_PRECISION_DTYPES = {
    "64-true": torch.float64, "32-true": torch.float32, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16, "16-true": torch.float16,
}


def batch_size(batch: Any) -> int:
    """The number of samples in a batch of the package's data modules (a dict with ``labels``, or a pair)."""
    labels = batch["labels"] if isinstance(batch, dict) else batch[1]
    return len(labels)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one ``device`` at a Trainer ``precision`` for the GPUs that Lightning's table misses (the
    H200 SXM; float32 counts as TF32 unless ``torch.set_float32_matmul_precision("highest")``), else None."""
    if device.type != "cuda" or torch.cuda.get_device_name(device) != "NVIDIA H200":
        return None
    dtype = _PRECISION_DTYPES.get(precision)
    if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
        dtype = "tfloat32"
    return _H200_FLOPS.get(dtype)


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` (samples/s, FLOP/s and MFU as ``<stage>/device/*`` metrics), whose MFU
    divides by ``available_flops``: given, or Lightning's figure for the device, or ``peak_flops``'s where Lightning
    has none (the H200). Without any, as on CPUs, MFU is not logged.
    """

    def __init__(
            self,
            batch_size_fn: Callable[[Any], int],
            length_fn: Callable[[Any], int] | None = None,
            available_flops: float | None = None,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            batch_size_fn: The number of samples in a batch.
            length_fn: The number of items (tokens) in a batch, if they are to be counted.
            available_flops: Peak FLOP/s of one device at the run's precision (dense, without sparsity), for MFU.
            kwargs: Lightning's ``Throughput`` options (``window_size``, ``separator``).
        """
        if available_flops is not None and not available_flops > 0:
            raise ValueError(f"available_flops must be a positive number of FLOP/s, got {available_flops!r}")
        super().__init__(batch_size_fn, length_fn, **kwargs)
        self._given_flops = available_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        flops = self._given_flops or peak_flops(trainer.strategy.root_device, str(trainer.precision))
        with warnings.catch_warnings():
            if flops is not None:  # Lightning warns of a device it has no figure for
                warnings.filterwarnings("ignore", message="FLOPs not found")
            super().setup(trainer, pl_module, stage)
        if flops is not None:
            self.available_flops = flops
            for throughput in self._throughputs.values():
                throughput.available_flops = flops


class PredictionWriter(BasePredictionWriter):
    """Writes one CSV row per input: its index in the predict set, its text (for text data), its true
    label where the data has one, the predicted class and its probability.

    ``output_file`` defaults to ``predictions.csv`` under ``trainer.default_root_dir``. Under DDP each
    process writes ``<stem>.rank<N>.csv``.
    """

    def __init__(self, output_file: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_file = None if output_file is None else Path(output_file)

    def write_on_epoch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any],
    ) -> None:
        path = self.output_file or Path(trainer.default_root_dir) / "predictions.csv"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        classes = getattr(trainer.datamodule, "classes", None)
        name = (lambda c: classes[c]) if classes is not None else (lambda c: c)
        dataset = getattr(trainer.predict_dataloaders, "dataset", None)
        texts, labels = getattr(dataset, "texts", None), getattr(dataset, "labels", None)
        indices = [i for batch in batch_indices[0] for i in batch] if batch_indices and batch_indices[0] else None
        probs = torch.cat([p["probs"] for p in predictions])
        best, preds = probs.max(-1)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["index", *(["text"] if texts is not None else []), *(["label"] if labels is not None else []),
                             "prediction", "probability"])
            for row, (pred, p) in enumerate(zip(preds.tolist(), best.tolist())):
                index = indices[row] if indices is not None else row
                writer.writerow([
                    index, *([texts[index]] if texts is not None else []),
                    *([name(int(labels[index]))] if labels is not None else []), name(pred), f"{p:.6f}",
                ])
        rank_zero_info(f"Predictions of {len(preds)} inputs written to {path}")
