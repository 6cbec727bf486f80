#!/usr/bin/env bash
# Issue 16's GPU check, run from the repository root on the device machine in two calls of the device tool:
#   command "bash scripts/gpu_check.sh", carry ["wheels"], timeout_s 600 (each step has its own time limit,
#   590 s in all, the targets' measurements first): the Triton convolution compiled for the GPU against
#   PyTorch's (tests/test_triton_conv.py: forward, every gradient, prefix and padding, fp32 and bf16,
#   compiled, DDP; after tests/test_conv.py, whose dynamic convolution runs a ViT's batch on CUDA); the ViT-S/16
#   mixer ratio (configs/mixer_ratio.yaml, bf16, batch 128, eager and compiled) with PyTorch's and with Triton's
#   convolution; muse_vit_base_patch16_224 training steps against timm's vit_base_patch16_224; a short fit with
#   the throughput overlay.
#   Then, at once while the machine is warm, command "bash scripts/gpu_check.sh extra", timeout_s with what
#   device time is left (at most 300 s are used, the most wanted first): a profile of the mixers on each backend
#   (scripts/mixer_profile.py), the Triton kernels' tile sizes against cuDNN, forward and backward apart
#   (scripts/triton_tiles.py), the ViT-B steps on Triton's convolution, the ViT-S steps; a run cut short keeps its
#   bundle.
# Logs and records go to one bundle, $OUT/gpu_check.tgz or $OUT/gpu_check_extra.tgz (or under ./gpu_check/):
# the device returns at most 8 files. Back here, the records as the docs' tables (docs/speed.md):
#   tar xzf gpu_check.tgz -C /tmp/gpu && muse-bench --markdown "[/tmp/gpu/mixer_ratio_torch.json, ...]"
# The image has torch, triton, timm, lightning, torchmetrics, rich and tensorboard; the pure-Python wheels it
# lacks are installed from a carried wheels/ folder (git-ignored), made here with
#   pip download --only-binary :all: --python-version 3.12 --implementation py --no-deps -d wheels \
#       "jsonargparse[signatures,omegaconf]" omegaconf antlr4-python3-runtime docstring-parser typeshed-client
set -uo pipefail
stage=${1:-main}
out=${OUT:-gpu_check}
work=$(mktemp -d)
bundle="$out/gpu_check$([ "$stage" = main ] || echo "_$stage").tgz"
mkdir -p "$out"
export PYTHONPATH=$PWD TRITON_INTERPRET=0

# step NAME SECONDS COMMAND...: COMMAND under a time limit, its whole log (and its exit status) in the bundle, its
# tail here; the bundle is rewritten after each step, so a run stopped at its limit keeps what is there.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s)"
    timeout "$limit" "$@" > "$work/$name.log" 2>&1
    echo "rc=$?" >> "$work/$name.log"
    tail -12 "$work/$name.log"
    tar czf "$bundle" -C "$work" .
}

# models NAME SECONDS SIZE BACKEND: training steps of muse_vit_SIZE_patch16_224 (on the BACKEND convolution) and
# timm's vit_SIZE_patch16_224, eager and compiled, bf16, batch 128.
models() {
    step "$1" "$2" env MUSE_CONV_BACKEND="$4" python3 -m muse_lightning.bench --mixers false --models true \
        --model_sizes "[$3]" --device cuda --modes "[eager, compiled]" --passes "[fwd+bwd]" --rounds 10 \
        --out "$work/$1.json"
}

if [ -d wheels ]; then python3 -m pip install -q --no-index --find-links wheels "jsonargparse[signatures,omegaconf]"; fi
if [ "$stage" = main ]; then
    step versions 10 python3 -c "import torch, triton, timm; print(torch.__version__, triton.__version__, \
timm.__version__, torch.cuda.get_device_name())"
    # (Not the compile-for-Hopper test: on a GPU every test compiles its kernels for the device itself; nor float16,
    # whose kernels differ from bfloat16's only in their conversions: 24 more compiles might not fit the limit.)
    # Verbose: a run cut at its limit still names each test it ran and how it ended.
    step triton_tests 130 python3 -m pytest -v -p no:cacheprovider -o faulthandler_timeout=60 -k "not hopper and not fp16" \
        tests/test_conv.py tests/test_triton_conv.py
    # The ViT-S/16 mixer ratio (bf16, batch 128, forward+backward), eager and compiled, on each convolution backend:
    # every mixer on PyTorch's, the MUSE mixers (the ones the backend changes) and the baseline on Triton's.
    for backend in torch triton; do
        impls=$([ $backend = torch ] || echo '["MUSE static 1-D", "MUSE static 1-D, shared proj", "MUSE dynamic 1-D", "MUSE static 2-D"]')
        limit=$([ $backend = torch ] && echo 110 || echo 90)
        step "mixer_ratio_$backend" "$limit" env MUSE_CONV_BACKEND=$backend python3 -m muse_lightning.bench \
            --config configs/mixer_ratio.yaml --seed_design false --device cuda --modes "[eager, compiled]" \
            ${impls:+--impls "$impls"} --out "$work/mixer_ratio_$backend.json"
    done
    # Two 12-block models compiled whole, as configs/compiled.yaml does (the slowest step; it keeps its eager rows
    # if cut).
    models models_base 190 base torch
    # A short fit through Lightning with the throughput overlay: samples/s, FLOP/s and MFU in its metrics.csv.
    step fit 60 python3 -m muse_lightning.cli fit --config configs/quickstart.yaml --config configs/gpu.yaml \
        --config configs/throughput.yaml --trainer.max_epochs 1 --trainer.default_root_dir "$work/fit"
else
    # Where each mixer's GPU time goes (kernels per step, ops by device time), on each convolution backend.
    step mixer_profile 50 bash -c "python3 scripts/mixer_profile.py && MUSE_CONV_BACKEND=triton python3 scripts/mixer_profile.py"
    # The Triton kernels' tiles (tokens x channels x warps; the kernel gradient's with its programs) against cuDNN,
    # forward and backward apart, 1-D then 2-D (what it has measured when cut is in its JSON).
    step triton_tiles 60 python3 scripts/triton_tiles.py "$work/triton_tiles.json"
    models models_base_triton 110 base triton
    models models_small 80 small torch
fi
