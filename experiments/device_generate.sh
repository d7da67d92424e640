#!/usr/bin/env bash
# The prepared GPU check of the sampler (issue 12), for a session lent an accelerator (one call):
#   d16 + the released VQVAE shape, random weights, cfg 1.5, top_k 900, top_p 0.96, decode
#   included. Times bf16 (XLA's attention, then cuDNN's) at batch 64, 8 and 1 and highest at 64;
#   the target is >= 200 images/s in bf16 at batch 64 on an H200. JSON lines go to
#   $OUT/generate.jsonl (or runs/bench/); a table ends the output.
# Needs only jax, flax, numpy, scipy on the machine. Each part has its own time limit, so a
# slow compile (about a minute each for d16) costs its own rows, not the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/bench}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
run() {  # seconds, then bench.py arguments
  local limit=$1; shift
  timeout "$limit" python3 experiments/bench.py --generate --config d16 --reps 5 "$@" \
    2>>"$out/generate.err" | tee -a "$out/generate.jsonl"
  echo "exit ${PIPESTATUS[0]}: $*"
}
run "${PART1_S:-200}" --precision bf16 --gen-batch 64
run "${PART2_S:-150}" --precision bf16 --attention cudnn --gen-batch 64
run "${PART3_S:-150}" --precision bf16 --gen-batch 8 --gen-batch 1
run "${PART4_S:-150}" --precision highest --gen-batch 64
tail -3 "$out/generate.err"
python3 - "$out/generate.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(*(f"{k}={r.get(k)}" for k in ("precision", "attention", "batch", "images_per_s", "images_per_s_best",
                                             "tflop_per_s", "compile_s")))
PY
