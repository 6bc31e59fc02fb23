#!/usr/bin/env bash
# The device checks of one short GPU session, in order of value, each under its own time limit:
#   1. Loom's Mosaic GPU flash-attention kernels compiled for the GPU, against the references;
#   2. their throughput against cuDNN (benchmarks/attention.py);
#   3. the `1b` train step on one GPU against PyTorch + transformers (benchmarks/train_step.py).
# Logs go to $OUT (default /tmp/loom_gpu). Wheels the GPU image lacks (ml_collections; flax of the
# version the project is tested with) are installed from .whl/ when that folder exists:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl flax==0.12.12 ml_collections
# Usage: bash benchmarks/gpu_session.sh   (from the repository root)
set -u
OUT=${OUT:-/tmp/loom_gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX share the GPU in one run
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

timeout "${T_CHECK:-170}" $PY benchmarks/gpu_kernel_check.py 2>&1 | tee "$OUT/kernel_check.log"
timeout "${T_ATTN:-130}" $PY benchmarks/attention.py --impls loom,cudnn --seq 2048,8192 --iters 10 \
  --json "$OUT/attention.jsonl" 2>&1 | tee "$OUT/attention.log"
timeout "${T_TRAIN:-170}" $PY benchmarks/train_step.py --presets 1b --dtypes bfloat16 --batch 8 --steps 6 \
  --remat full --attention pallas,xla 2>&1 | tee "$OUT/train_step.log"
