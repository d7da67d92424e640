#!/usr/bin/env bash
# The prepared GPU check of the sampler (issue 12), for a session lent an accelerator:
#   d16 + the released VQVAE shape, random weights, cfg 1.5, top_k 900, top_p 0.96, decode
#   included, 5 timed calls after a warm-up, compile time apart. The target: >= 200 images/s
#   in bf16 at batch 64 on an H200.
#     bash experiments/device_generate.sh          # parts 1-4 (about 15 minutes: split it
#     bash experiments/device_generate.sh 1 2      #   over calls where one call may run 10)
#   1: bf16, batch 64   2: bf16 with cuDNN's attention, batch 64   3: bf16, batch 8 and 1
#   4: highest, batch 64
# JSON lines go to $OUT/generate.jsonl (or runs/bench/); a table ends the output. Needs only
# jax, flax, numpy, scipy on the machine. Each part has its own time limit (PART_S, default
# 300 s; one d16 compile takes about a minute), so a slow part costs only its own rows.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/bench}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/gpu.txt"
part() {
  case $1 in
    1) echo --precision bf16 --gen-batch 64 ;;
    2) echo --precision bf16 --attention cudnn --gen-batch 64 ;;
    3) echo --precision bf16 --gen-batch 8 --gen-batch 1 ;;
    4) echo --precision highest --gen-batch 64 ;;
  esac
}
for p in ${@:-1 2 3 4}; do
  timeout "${PART_S:-300}" python3 experiments/bench.py --generate --config d16 --reps 5 $(part "$p") \
    2>>"$out/generate.err" | tee -a "$out/generate.jsonl"
  echo "part $p exit ${PIPESTATUS[0]}"
done
tail -3 "$out/generate.err"
python3 - "$out/generate.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(*(f"{k}={r.get(k)}" for k in ("precision", "attention", "batch", "images_per_s", "images_per_s_best",
                                             "tflop_per_s", "compile_s")))
PY
