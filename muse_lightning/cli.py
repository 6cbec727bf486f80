"""The ``muse-lightning`` command: LightningCLI over the package's modules and data, driven by YAML.

    muse-lightning fit --config configs/quickstart.yaml
    muse-lightning test --config configs/quickstart.yaml --ckpt_path checkpoints/quickstart/best.ckpt
"""
from __future__ import annotations

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from . import datamodules  # noqa: F401  (the data modules the configs name by class path)
from .modules import ClassifierModule

__all__ = ["MUSELightningCLI", "main"]


class MUSELightningCLI(LightningCLI):
    """LightningCLI with ``num_classes`` linked from the data and an optional ``compile: true``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_argument("--compile", type=bool, default=False, help="torch.compile the LightningModule")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._get(self.config, "compile"):
            # As Lightning documents it: compile the LightningModule before the Trainer runs it.
            self.model = torch.compile(self.model)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``muse-lightning`` console script."""
    MUSELightningCLI(
        ClassifierModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
