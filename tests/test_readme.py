"""The README's Python examples run as written."""
import re
import textwrap
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}  # later blocks build on earlier ones, as a reader's session would
    for block in blocks:
        exec(compile(textwrap.dedent(block), str(README), "exec"), namespace)


def test_readme_opens_with_install_and_test_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).splitlines()
    assert first[0].endswith("pip install -e \".[dev]\" && python -m muse_lightning.bench --config configs/mixer_ratio.yaml")
    assert first[1] == "python -m pytest -q"
