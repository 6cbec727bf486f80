#!/usr/bin/env bash
# Issue 16's GPU check in one lease (a few minutes on an H200), run from the repository root on the device
# machine: the Triton convolution compiled for the GPU against PyTorch's (forward, every gradient, fp32 and
# bf16, compiled), then the ViT-S/16 mixer ratio (configs/mixer_ratio.yaml, bf16, batch 128) with PyTorch's
# and with Triton's convolution. Records go to $OUT (or ./gpu_check). The image has torch, triton, timm,
# lightning and torchmetrics; pure-Python wheels it lacks (jsonargparse, omegaconf, ...) are installed from a
# carried wheels/ folder if there is one (pip download --only-binary :all: -d wheels "jsonargparse[signatures,omegaconf]").
set -uo pipefail
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD TRITON_INTERPRET=0
if [ -d wheels ]; then python3 -m pip install -q --no-index --find-links wheels "jsonargparse[signatures,omegaconf]"; fi
python3 -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$out/versions.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_triton_conv.py 2>&1 | tail -15 | tee "$out/triton_tests.txt"
for backend in torch triton; do
    MUSE_CONV_BACKEND=$backend timeout 300 python3 -m muse_lightning.bench --config configs/mixer_ratio.yaml \
        --device cuda --out "$out/mixer_ratio_$backend.json" 2>&1 | tail -20 | tee "$out/mixer_ratio_$backend.txt"
done
