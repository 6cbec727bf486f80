"""Callbacks: write the predictions of ``muse-lightning predict`` to a CSV file."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Writes one row per input: its index in the predict set, the predicted class (index and name),
    and its probability. Under DDP each process writes ``<stem>.rank<N>.csv``."""

    def __init__(self, output_file: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_file = Path(output_file)

    def write_on_epoch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any],
    ) -> None:
        path = self.output_file
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        classes = getattr(trainer.datamodule, "classes", None)
        indices = [i for batch in batch_indices[0] for i in batch] if batch_indices and batch_indices[0] else None
        probs = torch.cat([p["probs"] for p in predictions])
        preds = probs.argmax(-1)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "pred", "label", "prob"])
            for row, (pred, p) in enumerate(zip(preds.tolist(), probs.max(-1).values.tolist())):
                index = indices[row] if indices is not None else row
                writer.writerow([index, pred, classes[pred] if classes is not None else pred, f"{p:.6f}"])
