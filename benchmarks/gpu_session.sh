#!/usr/bin/env bash
# The device checks of one short GPU session, in order of value, each under its own time limit:
#   check      Loom's Mosaic GPU flash-attention kernels compiled for the GPU, against the references
#              (benchmarks/gpu_kernel_check.py; not timed)
#   attention  their throughput against cuDNN, in interleaved rounds (benchmarks/attention.py)
#   train      the `1b` train step on one GPU against PyTorch + transformers, bf16 eager and
#              torch.compile, MFU against the H200's spec peak and the measured one
#              (benchmarks/train_step.py)
# Each writes a JSON record under $OUT/records (default /tmp/loom_gpu/records) and its log beside
# it. Copy the records into benchmarks/records/ and run `python benchmarks/report.py`: RESULTS.md
# shows only figures that have a record.
#
# A device command may run 10 minutes at most: run the steps in two commands, e.g.
#   STEPS=check,attention bash benchmarks/gpu_session.sh     (~5 min)
#   STEPS=train bash benchmarks/gpu_session.sh                (~5 min)
# Wheels the GPU image lacks (ml_collections, which train_step.py needs for the presets; flax of the
# version the project is tested with) are installed from .whl/ when that folder exists:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl flax==0.12.12 ml_collections
# Usage: bash benchmarks/gpu_session.sh   (from the repository root)
set -u
OUT=${OUT:-/tmp/loom_gpu}
PY=${PY:-python3}
STEPS=${STEPS:-check,attention,train}
REC="$OUT/records"
mkdir -p "$REC"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L || { echo "gpu_session.sh: no NVIDIA GPU (nvidia-smi failed)" >&2; exit 2; }
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 2
$PY -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" \
  || { echo "gpu_session.sh: JAX sees no GPU (the CUDA plugin is missing?)" >&2; exit 2; }

missing() {  # the modules of "$@" that do not import
  for m in "$@"; do $PY -c "import $m" 2>/dev/null || printf '%s ' "$m"; done
}
status=0
run() {  # run NAME LIMIT_S MODULES... -- COMMAND...: skip with a clear line when a module is missing
  local name=$1 limit=$2; shift 2
  local mods=()
  while [ "$1" != "--" ]; do mods+=("$1"); shift; done
  shift
  case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
  local lack
  lack=$(missing "${mods[@]}")
  if [ -n "$lack" ]; then
    echo "gpu_session.sh: SKIPPED $name: missing Python modules: $lack(see the .whl note at the top)" >&2
    status=1
    return 0
  fi
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "gpu_session.sh: $name exited with status $rc (124: over its ${limit} s limit)" >&2; status=1; }
}

run check "${T_CHECK:-170}" jax numpy -- \
  $PY benchmarks/gpu_kernel_check.py --records-dir "$REC"
run attention "${T_ATTN:-150}" jax -- \
  $PY benchmarks/attention.py --impls loom,cudnn --seq 2048,8192 --rounds 5 --iters 10 --records-dir "$REC"
run train "${T_TRAIN:-330}" jax flax optax ml_collections sentencepiece torch transformers safetensors -- \
  $PY benchmarks/train_step.py --presets 1b --dtypes bfloat16 --batch 8 --remat full --attention pallas,xla \
  --rounds 5 --records-dir "$REC"
ls -l "$REC"
exit $status
