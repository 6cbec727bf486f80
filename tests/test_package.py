"""What a wheel carries: the shipped configs are found by name from any folder, by every command that takes one."""
import subprocess
import sys
from pathlib import Path

import pytest

from muse_lightning.cli import main
from muse_lightning.config_files import CONFIGS, cli, config_path, resolve_config_args, shipped_configs

REPO_CONFIGS = Path(__file__).parents[1] / "configs"


def test_package_configs_are_the_repository_configs():
    assert shipped_configs() == sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml"))
    assert all((CONFIGS / p.name).read_bytes() == p.read_bytes() for p in REPO_CONFIGS.iterdir())
    assert {p.suffix for p in REPO_CONFIGS.iterdir()} == {".yaml"}  # what the wheel's package-data glob takes


@pytest.mark.parametrize("given", ["quickstart", "quickstart.yaml", "configs/quickstart.yaml"])
def test_shipped_config_resolves_by_name_in_an_empty_folder(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    assert config_path(given) == CONFIGS / "quickstart.yaml"
    assert resolve_config_args(["fit", "--config", given, "-c", given, f"--config={given}"]) == [
        "fit", "--config", str(CONFIGS / "quickstart.yaml"), "-c", str(CONFIGS / "quickstart.yaml"),
        f"--config={CONFIGS / 'quickstart.yaml'}"]


def test_an_existing_file_wins_over_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("trainer: {max_epochs: 1}\n")
    assert config_path("configs/quickstart.yaml") == Path("configs/quickstart.yaml")
    inline = "{trainer: {max_epochs: 1}}"  # jsonargparse's inline YAML passes through
    assert resolve_config_args(["--config", inline]) == ["--config", inline]


@pytest.mark.parametrize("given", ["nonexistent", "elsewhere/quickstart.yaml"])
def test_unknown_config_names_the_argument_and_the_shipped_ones(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"--config {given}: no such file.*shipped: .*quickstart"):
        resolve_config_args(["fit", "--config", given])


@pytest.mark.parametrize(("configs", "overlay"), [
    (["quickstart_attention"], "quickstart_attention"),
    (["quickstart_attention", "quickstart"], "quickstart_attention"),
    (["fashion_mnist_full", "quickstart"], "fashion_mnist_full"),
], ids=["alone", "before-its-base", "data-overlay-first"])
def test_an_overlay_before_the_config_it_changes_is_refused_with_the_fix(configs, overlay, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"--config .*{overlay}.yaml is an overlay: its (model|data) changes init_args of "
                                         rf"a class it does not name; give it after .* --config {overlay}"):
        main(["fit", *(arg for name in configs for arg in ("--config", name)), "--print_config"])
    with pytest.raises(SystemExit):  # after its base: parses (the twins' own tests build them)
        main(["fit", "--config", "quickstart", "--config", "quickstart_attention", "--print_config"])
    with pytest.raises(SystemExit):  # inline YAML, however long, is no file to read
        main(["fit", "--config", "quickstart", "--config", "{trainer: {max_epochs: 1, log_every_n_steps: 3}}" + " " * 300,
              "--print_config"])


def test_bench_reads_its_shipped_preset_config_by_name(tmp_path):
    cmd = [sys.executable, "-m", "muse_lightning.bench", "--config", "configs/mixer_ratio.yaml", "--print_config"]
    printed = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert "preset: vit-s" in printed and "out: mixer_ratio.json" in printed


def test_compare_table_only_in_an_empty_folder_says_there_is_nothing_yet(tmp_path):
    cmd = [sys.executable, "-m", "muse_lightning.compare", "--table_only", "true"]
    printed = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert "no records in results/compare yet" in printed


def test_muse_configs_copies_a_shipped_config_that_then_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli(["list"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == shipped_configs()
    cli(["copy", "sequence_files"])
    copied = tmp_path / "configs" / "sequence_files.yaml"
    assert copied.read_bytes() == (CONFIGS / "sequence_files.yaml").read_bytes()
    copied.write_text(copied.read_text() + "# edited\n")
    assert config_path("configs/sequence_files.yaml") == Path("configs/sequence_files.yaml")
    with pytest.raises(FileExistsError, match="sequence_files.yaml already exists.*--overwrite true"):
        cli(["copy", "sequence_files"])
    assert copied.read_text().endswith("# edited\n")
    with pytest.raises(FileNotFoundError, match="name nope: no such file"):
        cli(["copy", "nope"])
