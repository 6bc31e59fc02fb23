#!/usr/bin/env bash
# Every CPU benchmark behind benchmarks/RESULTS.md, one after another on a quiet machine
# (about 2.5 hours on 2 cores), then RESULTS.md regenerated from the records they write.
#   benchmarks/run_cpu.sh              all of them
#   benchmarks/run_cpu.sh decode dedup only those (names below)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
all=(decode decode_extra train_step sft rl serve dedup data_pipeline parallelism memory moe)
steps=("${@:-${all[@]}}")
for s in "${steps[@]}"; do
  echo "=== $s ($(date -u +%H:%M:%S))"
  case "$s" in
    decode)        $PY benchmarks/decode.py --sections=decode ;;
    decode_extra)  $PY benchmarks/decode.py --sections=layout,speculative,quantize ;;
    train_step)    $PY benchmarks/train_step.py --baseline=3451f03 ;;
    sft)           $PY benchmarks/sft.py ;;
    rl)            $PY benchmarks/rl.py ;;
    serve)         $PY benchmarks/serve.py ;;
    dedup)         $PY benchmarks/dedup.py --check_truth ;;
    data_pipeline) $PY benchmarks/data_pipeline.py ;;
    parallelism)   $PY benchmarks/parallelism.py ;;
    memory)        $PY benchmarks/memory.py ;;
    moe)           $PY benchmarks/moe.py ;;
    *) echo "benchmarks/run_cpu.sh: unknown benchmark '$s' (valid: ${all[*]})" >&2; exit 2 ;;
  esac
done
$PY benchmarks/report.py
