"""Callbacks: write the predictions of ``muse-lightning predict`` to a CSV file; count a batch's samples for
Lightning's ``ThroughputMonitor`` (``configs/throughput.yaml``)."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["PredictionWriter", "batch_size"]


def batch_size(batch: Any) -> int:
    """The number of samples in a batch of the package's data modules (a dict with ``labels``, or a pair)."""
    labels = batch["labels"] if isinstance(batch, dict) else batch[1]
    return len(labels)


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
