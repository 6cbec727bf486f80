"""The ``muse-lightning`` command: LightningCLI over the package's modules and data, driven by YAML.

    muse-lightning fit --config configs/quickstart.yaml
    muse-lightning test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt

``--config`` takes a file or the name of a shipped config (``config_files``), from any folder.

Every output of a run lies under ``trainer.default_root_dir`` (the shipped configs interpolate it):
``checkpoints/`` (``best.ckpt``, ``last.ckpt``), ``logs/version_N/`` (one version per run, shared by
its loggers, with the run's ``config.yaml``) and ``predictions.csv``.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from . import datamodules  # noqa: F401  (the data modules the configs name by class path)
from .config_files import check_overlay_order, resolve_config_args
from .modules import ClassifierModule

__all__ = ["MUSELightningCLI", "main", "read_checkpoint"]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's contents, or an error naming the file when it is truncated or foreign. Of a
    sharded checkpoint (a folder, ``FSDP2Strategy``), the contents but its tensors: Lightning's ``meta.pt``."""
    path = Path(path)
    sharded = path.is_dir() and (path / "meta.pt").is_file()
    if not path.is_file() and not sharded:
        raise FileNotFoundError(f"--ckpt_path {path}: no such file (nor a sharded checkpoint folder with a meta.pt)")
    try:
        checkpoint = torch.load(path / "meta.pt" if sharded else path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds (pickle, zip, EOF) for a damaged file
        raise ValueError(
            f"--ckpt_path {path} cannot be read as a checkpoint (truncated, or not a PyTorch file): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    required = ["pytorch-lightning_version"] if sharded else ["pytorch-lightning_version", "state_dict"]
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise ValueError(
            f"--ckpt_path {path} is not a Lightning checkpoint (it lacks 'pytorch-lightning_version' and 'state_dict'; "
            "a bare state_dict or another tool's file?)"
        )
    return checkpoint


def _plain(value: Any) -> Any:
    """Config values as plain data (Namespaces as dicts, tuples as lists), to compare a config with a checkpoint."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Model arguments linked from the built data module's attributes (the config holds no value for them to compare).
_DATA_LINKS = ("num_classes", "max_length", "vocab_size", "pad_id", "in_features", "img_size")


def _next_version(root: Path) -> int:
    """The next free ``version_N`` under ``root``, as Lightning's loggers number them."""
    versions = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(versions, default=-1) + 1


class MUSELightningCLI(LightningCLI):
    """LightningCLI with the data's ``num_classes`` (and a sequence module's ``max_length``, ``vocab_size``,
    ``pad_id``, ``in_features``, an image folder module's ``img_size``) linked into the model, an optional
    ``compile: true``, and guards: a checkpoint must match the config, fit does not overwrite an earlier
    run's checkpoints, and test / predict do not run untrained weights unless told to."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A link applies where both sides have the name: sequence models size their position, token and input
        # tables by the data; image models take num_classes, and img_size from an image folder module.
        for name in _DATA_LINKS:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_argument("--compile", type=bool, default=False, help="torch.compile the LightningModule")
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="fit: replace the checkpoints an earlier run left in the checkpoint folder",
        )
        parser.add_argument(
            "--allow_untrained", type=bool, default=False,
            help="validate / test / predict without --ckpt_path (untrained or pretrained weights)",
        )

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path``: a readable Lightning checkpoint of the model the config describes.

        LightningCLI would replace the config's model by the checkpoint's hyper-parameters, dropping a
        different config or ``--model.init_args`` overrides without a word; here a difference is an error
        that names both sides.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        checkpoint = read_checkpoint(ckpt_path)
        saved = dict(checkpoint.get("hyper_parameters", {}))
        saved.pop("_instantiator", None)
        saved_class = saved.pop("_class_path", None)
        model = self.config[subcommand].model
        differences = []
        if saved_class is not None and saved_class != model.class_path:
            differences.append(f"class_path: {saved_class} in the checkpoint, {model.class_path} in the config")
        given = _plain(model.get("init_args") or {})
        for key, value in saved.items():
            if key not in _DATA_LINKS and key in given and _plain(value) != given[key]:
                differences.append(f"{key}: {_plain(value)!r} in the checkpoint, {given[key]!r} in the config")
        if differences:
            raise ValueError(
                f"--ckpt_path {ckpt_path} was trained with another model than the config gives: "
                + "; ".join(differences)
                + ". Use the config it was trained with (its run saved it as logs/version_N/config.yaml) "
                "and drop the differing --model overrides."
            )

    def before_instantiate_classes(self) -> None:
        """Give every logger of the run one version: the loggers of a config share a folder."""
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).trainer
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        specs = [lg for lg in loggers if isinstance(lg, Namespace) and "init_args" in lg]
        roots = {}
        for spec in specs:
            args = spec.init_args
            if args.get("save_dir") is not None and args.get("version") is None:
                root = Path(args.save_dir) / (args.get("name") or "")
                args.version = roots.setdefault(root, _next_version(root))

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._get(self.config, "compile"):
            # As Lightning documents it: compile the LightningModule before the Trainer runs it.
            self.model = torch.compile(self.model)

    def _checkpoint_dirs(self) -> list[Path]:
        return [Path(cb.dirpath) for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]

    def before_fit(self) -> None:
        """Refuse to overwrite an earlier run's checkpoints, unless resuming it or told to."""
        if self._get(self.config, "ckpt_path") is not None or self._get(self.config, "overwrite"):
            return
        for directory in self._checkpoint_dirs():
            earlier = sorted(p.name for p in directory.glob("*.ckpt"))
            if earlier:
                raise FileExistsError(
                    f"{directory} already holds checkpoints of an earlier run ({', '.join(earlier)}): resume it with "
                    f"--ckpt_path {directory / 'last.ckpt'}, start a new run elsewhere with --trainer.default_root_dir "
                    "DIR, or replace them with --overwrite true"
                )

    def _require_weights(self) -> None:
        """Refuse to evaluate or predict with untrained weights, unless told to."""
        if self._get(self.config, "ckpt_path") is not None or self._get(self.config, "allow_untrained"):
            return
        found = [d / "best.ckpt" for d in self._checkpoint_dirs() if (d / "best.ckpt").is_file()]
        hint = f" (this config's run saved {found[0]})" if found else ""
        raise ValueError(
            f"{self.subcommand} without --ckpt_path would run the model's untrained weights: pass --ckpt_path "
            f"PATH{hint}, or --allow_untrained true"
        )

    before_validate = before_test = before_predict = _require_weights


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``muse-lightning`` console script."""
    # Interpolations such as ${trainer.default_root_dir} resolve after the command line is parsed,
    # and are written as absolute keys in the configs.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    if args is None:  # the console script: LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    else:
        args = resolve_config_args(args)
    check_overlay_order(sys.argv[1:] if args is None else args)
    try:
        MUSELightningCLI(
            ClassifierModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf+"},
            args=args,
        )
    except ValueError as error:
        # jsonargparse reports an error raised while building a class under "Does not validate against any
        # of the Union subtypes"; the class's own message is what a user needs to read last.
        if str(error).startswith("Does not validate against any of the Union subtypes") and _root_cause(error) is not error:
            raise _root_cause(error) from None
        raise


if __name__ == "__main__":
    main()
