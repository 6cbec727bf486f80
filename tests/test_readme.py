"""The README: its Python examples run as written; its Results and Speed tables are the recorded runs' tables."""
import json
import re
import textwrap
from pathlib import Path

from muse_lightning.bench import markdown_table
from muse_lightning.compare import sequence_table, table, tuning_table

README = Path(__file__).parents[1] / "README.md"
RESULTS = Path(__file__).parents[1] / "results" / "compare"
SWEEP = Path(__file__).parents[1] / "results" / "tune"
DOCS = Path(__file__).parents[1] / "docs"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the examples write stays out of the checkout
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}  # later blocks build on earlier ones, as a reader's session would
    for block in blocks:
        exec(compile(textwrap.dedent(block), str(README), "exec"), namespace)


def test_readme_opens_with_install_and_test_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).splitlines()
    assert first[0].endswith("muse-lightning test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt")
    assert 'pip install -e ".[dev]"' in first[0]
    assert first[1] == "python -m pytest -q"


def test_readme_results_table_is_the_recorded_runs_table():
    assert table(RESULTS) in README.read_text(), "README's Results table is stale: paste `muse-compare --table_only true`"


def test_readme_time_series_table_is_the_recorded_sequence_benchmark():
    stale = "README's time-series table is stale: paste the last table of `muse-compare --table_only true`"
    assert sequence_table(RESULTS) in README.read_text(), stale


def test_readme_tuning_table_is_the_recorded_sweep_table():
    stale = "README's tuning table is stale: paste `muse-compare --results results/tune --table_only true`"
    assert tuning_table(SWEEP) in README.read_text(), stale


def test_readme_mixer_ratio_tables_are_the_recorded_benchmarks_tables():
    records = sorted(DOCS.glob("mixer_ratio_*.json"))
    assert len(records) >= 2
    for path in records:
        stale = f"README's table of {path.name} is stale: paste `muse-bench --markdown \"[docs/{path.name}]\"`"
        assert markdown_table(json.loads(path.read_text())) in README.read_text(), stale
