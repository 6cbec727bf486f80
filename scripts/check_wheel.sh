#!/usr/bin/env bash
# The release check: build the sdist and, from it, the wheel; twine check both; install the wheel (not
# editable) into a fresh environment; from an empty folder, run the README's commands on shipped configs.
#   bash scripts/check_wheel.sh        (CI runs it after the test suite; needs build and twine, the dev extra)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"  # not the repository root, whose setuptools build/ folder would shadow the build package
python -m build --outdir "$scratch/dist" "$repo"
twine check --strict "$scratch"/dist/*
python -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install --quiet "$scratch"/dist/*.whl
# The wheel holds the configs, the embedded data, the typing marker and the licences.
python - "$scratch"/dist/*.whl <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
needed = {"muse_lightning/configs/quickstart.yaml", "muse_lightning/configs/sequence_files.yaml",
          "muse_lightning/assets/fashion_mnist_subset.npz", "muse_lightning/py.typed"}
missing = needed - names
assert not missing, f"the wheel lacks {sorted(missing)}"
assert any(n.endswith("licenses/LICENSE") for n in names), "the wheel lacks LICENSE"
PY
mkdir "$scratch/empty" && cd "$scratch/empty"
bin="$scratch/venv/bin"
tiny=(--trainer.max_epochs 1 --trainer.limit_train_batches 3 --trainer.limit_val_batches 2 --trainer.limit_test_batches 2)
"$bin/muse-lightning" fit --config configs/quickstart.yaml "${tiny[@]}"
"$bin/muse-lightning" test --config configs/quickstart.yaml "${tiny[@]}" --ckpt_path runs/quickstart/checkpoints/best.ckpt
"$bin/muse-lightning" fit --config text_quickstart "${tiny[@]}" --trainer.default_root_dir runs/text
mkdir -p runs && "$bin/python" -c "import numpy as np; r = np.random.default_rng(0); np.savez('runs/series.npz', \
  features=r.normal(size=(40, 30, 2)).astype('float32'), labels=r.integers(0, 2, 40))"
"$bin/muse-lightning" fit --config sequence_files --data.train_file runs/series.npz "${tiny[@]}" --trainer.default_root_dir runs/series
"$bin/muse-bench" --config configs/mixer_ratio.yaml --print_config > /dev/null
"$bin/muse-compare" --table_only true
"$bin/muse-configs" list | grep "^quickstart " > /dev/null  # grep reads it all: no broken pipe
(cd "$scratch" && "$bin/muse-configs" copy sequence_files && test -f configs/sequence_files.yaml)
test "$(ls | xargs)" = "results runs" || { echo "wrote outside runs/ and results/: $(ls | xargs)"; exit 1; }
echo "wheel check passed"
