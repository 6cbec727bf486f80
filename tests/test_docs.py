"""The README and the documentation site: their Python examples run as written, their tables are the recorded
runs' and the registry's, and the site builds with no broken link or reference."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from muse_lightning import adapters
from muse_lightning.adapters import adapter_table
from muse_lightning.bench import markdown_table
from muse_lightning.compare import headline_table, sequence_table, table, tuning_table

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = ROOT / "results" / "compare"
SWEEP = ROOT / "results" / "tune"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)], ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the examples write stays out of the checkout
    namespace: dict = {}  # a page's later blocks build on its earlier ones, as a reader's session would
    try:
        for block in _python_blocks(page):
            exec(compile(textwrap.dedent(block), str(page), "exec"), namespace)
    finally:  # an example registers its own attention class: leave the registry as the package makes it
        for defined in [v for v in namespace.values() if isinstance(v, type)]:
            adapters.ATTENTION_ADAPTERS.pop(defined, None)


def test_readme_opens_with_install_and_test_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).splitlines()
    assert first[0].endswith("muse-lightning test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt")
    assert 'pip install -e ".[dev]"' in first[0]
    assert first[1] == "python -m pytest -q"
    assert first[0] in (DOCS / "index.md").read_text()  # Getting started repeats them


def test_readme_is_the_newcomers_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300
    for page in ("index", "mixer", "timm", "lightning", "huggingface", "time-series", "speed", "results", "changelog"):
        assert f"(docs/{page}.md" in README.read_text(), f"the README does not link docs/{page}.md"


@pytest.mark.parametrize(("page", "render", "records", "stale"), [
    (README, headline_table, RESULTS, "muse-compare --table_only true (its first table)"),
    (README, sequence_table, RESULTS, "muse-compare --table_only true (its last table)"),
    (DOCS / "time-series.md", sequence_table, RESULTS, "muse-compare --table_only true (its last table)"),
    (DOCS / "results.md", table, RESULTS, "muse-compare --table_only true"),
    (DOCS / "results.md", tuning_table, SWEEP, "muse-compare --results results/tune --table_only true"),
], ids=["readme-headline", "readme-sequences", "time-series", "results", "tuning"])
def test_results_tables_are_the_recorded_runs_tables(page, render, records, stale):
    assert render(records) in page.read_text(), f"{page.name}'s {render.__name__} is stale: paste `{stale}`"


def test_mixer_ratio_tables_are_the_recorded_benchmarks_tables():
    records = sorted(DOCS.glob("mixer_ratio_*.json"))
    assert len(records) >= 2
    for path in records:
        stale = f"docs/speed.md's table of {path.name} is stale: paste `muse-bench --markdown \"[docs/{path.name}]\"`"
        assert markdown_table(json.loads(path.read_text())) in (DOCS / "speed.md").read_text(), stale
    cpu = markdown_table(json.loads((DOCS / "mixer_ratio_cpu.json").read_text()))
    assert cpu in README.read_text(), "the README's speed table is stale: paste docs/speed.md's CPU table"


def test_sharded_memory_table_is_the_recorded_measurements():
    """docs/lightning.md's FSDP2 memory rows are results/sharded_memory.json's (scripts/sharded_memory.py)."""
    record = json.loads((ROOT / "results" / "sharded_memory.json").read_text())
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    page = (DOCS / "lightning.md").read_text()
    assert record["model"] in page
    base = record["rows"][0]["total"]
    for row in record["rows"]:
        line = (f"| {row['processes']} | {mib(row['parameters'])} | {mib(row['gradients'])} | {mib(row['adamw_states'])} "
                f"| {mib(row['total'])} | {row['total'] / base:.2f} |")
        assert line in page, f"stale: paste `python scripts/sharded_memory.py`'s table ({line})"


def test_timm_page_holds_the_adapter_registrys_table():
    stale = "docs/timm.md's registry table is stale: paste `python -c \"from muse_lightning.adapters import adapter_table; print(adapter_table())\"`"
    assert adapter_table() in (DOCS / "timm.md").read_text(), stale


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(re.findall(r":\s+([\w-]+\.md)$", nav, flags=re.M))


def test_documentation_site_builds_strict(tmp_path):
    # mkdocs and its plugins come with the docs extra, which the dev extra pulls in
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert built.returncode == 0, built.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("MUSEAttention", "swap_attention", "ImageClassifier", "MUSETimeSeriesClassifier", "config_path"):
        assert f'id="muse_lightning.' in api and name in api, f"the API reference lacks {name}"
