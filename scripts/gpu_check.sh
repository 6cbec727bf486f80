#!/usr/bin/env bash
# Issue 16's GPU check in one lease (at most 9 minutes: each step has its own timeout, the most needed first),
# run from the repository root on the device
# machine: the Triton convolution compiled for the GPU against PyTorch's (forward, every gradient, prefix and
# padding, fp32 and bf16, compiled); the ViT-S/16 mixer ratio (configs/mixer_ratio.yaml, bf16, batch 128,
# eager and compiled) with PyTorch's and with Triton's convolution; muse_vit_{small,base}_patch16_224 training
# steps against timm's ViTs; a short fit with the throughput overlay. Records go to $OUT (or ./gpu_check).
# The image has torch, triton, timm, lightning, torchmetrics, rich and tensorboard; the pure-Python wheels it
# lacks are installed from a carried wheels/ folder (git-ignored), made here with
#   pip download --only-binary :all: --python-version 3.12 --implementation py --no-deps -d wheels \
#       "jsonargparse[signatures,omegaconf]" omegaconf antlr4-python3-runtime docstring-parser typeshed-client
# and run in one call of the device tool: command "bash scripts/gpu_check.sh", carry ["wheels"], timeout_s 560.
set -uo pipefail
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD TRITON_INTERPRET=0
if [ -d wheels ]; then python3 -m pip install -q --no-index --find-links wheels "jsonargparse[signatures,omegaconf]"; fi
python3 -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$out/versions.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_conv.py 2>&1 | tail -15 | tee "$out/triton_tests.txt"
# The ViT-S/16 mixer ratio (bf16, batch 128, forward+backward), eager and compiled, on each convolution backend.
for backend in torch triton; do
    MUSE_CONV_BACKEND=$backend timeout 110 python3 -m muse_lightning.bench --config configs/mixer_ratio.yaml \
        --device cuda --modes "[eager, compiled]" --out "$out/mixer_ratio_$backend.json" 2>&1 | tail -20 \
        | tee "$out/mixer_ratio_$backend.txt"
done
# Whole-model training steps: muse_vit_{small,base}_patch16_224 against timm's vit_* (bf16, batch 128).
timeout 130 python3 -m muse_lightning.bench --mixers false --models true --model_sizes "[small, base]" \
    --device cuda --modes "[eager, compiled]" --passes "[fwd+bwd]" --rounds 10 --out "$out/models.json" 2>&1 \
    | tail -20 | tee "$out/models.txt"
# A short fit through Lightning with the throughput overlay: samples/s, FLOP/s and MFU in its metrics.csv.
timeout 80 python3 -m muse_lightning.cli fit --config configs/quickstart.yaml --config configs/gpu.yaml \
    --config configs/throughput.yaml --trainer.max_epochs 1 --trainer.default_root_dir "$out/fit" 2>&1 | tail -8 \
    | tee "$out/fit.txt"
