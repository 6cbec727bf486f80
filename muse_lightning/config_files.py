"""The YAML configs that ship inside the package, found by name from any folder.

The repository's ``configs/`` folder travels in the wheel as ``muse_lightning/configs``. Wherever a
command takes ``--config``, a path that does not exist but names a shipped config (``quickstart``,
``quickstart.yaml`` or ``configs/quickstart.yaml``) means that config; an existing file always wins,
so a copy edited in the current folder is read as it is.

    muse-lightning fit --config quickstart                   # from any folder, after pip install
    muse-configs list                                        # the shipped configs
    muse-configs copy quickstart                             # ./configs/quickstart.yaml, to edit
    muse-lightning fit --config configs/quickstart.yaml      # now reads the edited copy
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

__all__ = [
    "CONFIGS", "check_overlay_order", "cli", "config_path", "copy", "list_configs", "resolve_config_args", "shipped_configs",
]

CONFIGS = Path(__file__).parent / "configs"


def shipped_configs() -> list[str]:
    """The names of the shipped configs (file names without ``.yaml``)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def config_path(name: str | Path, argument: str = "--config") -> Path:
    """The file ``name`` when it exists, else the shipped config it names (``argument`` names it in errors).

    Raises:
        FileNotFoundError: neither a file nor a shipped config; the message lists the shipped ones.
    """
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    shipped = CONFIGS / f"{stem}.yaml"
    # Only a bare name or a path into a ``configs`` folder may fall back to the package's copy.
    if shipped.is_file() and path.parent in (Path("."), Path("configs")):
        return shipped
    raise FileNotFoundError(
        f"{argument} {name}: no such file, and not a shipped config (shipped: {', '.join(shipped_configs())}; "
        "name one as e.g. quickstart or configs/quickstart.yaml)"
    )


def _is_path_like(value: str) -> bool:
    """A ``--config`` value meant as a file or a name (jsonargparse also takes inline YAML, ``{trainer: ...}``)."""
    return value.endswith((".yaml", ".yml")) or re.fullmatch(r"[\w.-]+", value) is not None


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config`` / ``-c`` value that names a shipped config replaced by its path."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg in ("--config", "-c") and i + 1 < len(resolved) and _is_path_like(resolved[i + 1]):
            resolved[i + 1] = str(config_path(resolved[i + 1]))
        elif arg.startswith("--config=") and _is_path_like(arg.removeprefix("--config=")):
            resolved[i] = "--config=" + str(config_path(arg.removeprefix("--config=")))
    return resolved


def check_overlay_order(args: list[str]) -> None:
    """Refuse an overlay (a config whose ``model`` or ``data`` gives ``init_args`` but no ``class_path``, as the
    attention twins do) given before any config or argument names that class, with the fix, instead of the
    parser's "Does not validate against any of the Union subtypes"."""
    named: set[str] = set()
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key in ("--model", "--data", "--model.class_path", "--data.class_path"):
            named.add(key[2:].removesuffix(".class_path"))
        if key not in ("--config", "-c"):
            continue
        value = value or (args[i + 1] if i + 1 < len(args) else "")
        config = yaml.safe_load(Path(value).read_text()) if _is_path_like(value) and Path(value).is_file() else None
        for section in ("model", "data"):
            part = config.get(section) if isinstance(config, dict) else None
            if isinstance(part, dict) and "class_path" in part:
                named.add(section)
            elif isinstance(part, dict) and section not in named:
                raise ValueError(
                    f"--config {value} is an overlay: its {section} changes init_args of a class it does not name; "
                    f"give it after the config it changes (its first lines name it): --config BASE --config "
                    f"{Path(value).stem}"
                )


def list_configs() -> None:
    """Print each shipped config's name and its first comment line."""
    for name in shipped_configs():
        first = (CONFIGS / f"{name}.yaml").read_text().splitlines()[0]
        print(f"{name:28} {first.lstrip('# ') if first.startswith('#') else ''}")


def copy(name: str, folder: str = "configs", overwrite: bool = False) -> None:
    """Copy a shipped config into ``folder`` (``./configs`` by default) to edit; ``--config configs/NAME.yaml``
    then reads the copy.

    Args:
        name: A shipped config's name (``muse-configs list``).
        folder: Where the copy goes.
        overwrite: Replace a file already there.
    """
    source = config_path(Path(name).name, argument="name")
    target = Path(folder) / source.name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists: edit it, or pass --overwrite true")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    print(target)


def cli(args: list[str] | None = None) -> None:
    """Entry point of the ``muse-configs`` console script: ``list`` and ``copy``."""
    from jsonargparse import CLI

    CLI({"list": list_configs, "copy": copy}, as_positional=True, args=args)
