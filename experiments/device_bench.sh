#!/usr/bin/env bash
# The prepared GPU check of issue 6, for a session lent an accelerator (one short call):
#   d16 + the released VQVAE shape, random weights, 8 views per image. Part 1 times each
#   precision and attention kernel at the study's step (16 images x 8 views), the tokenizer
#   alone, and what each setting costs against highest on 64 images. Part 2 times twice the
#   step size. With SPLIT=1, part 3 (~3 min more) splits the step's time into its parts.
#   JSON lines go to $OUT/bench.jsonl (or runs/bench/); a table ends the output.
# Needs only jax, flax, numpy, scipy on the machine (no grain, no tfds, no torch).
# About 9 minutes on one H200, compiles (9-60 s each) included; each part has its own time
# limit so a slow compile costs its own rows, not the rest. Results of 2026-11-28:
# experiments/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/bench}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
timeout "${PART1_S:-420}" python3 experiments/bench.py --config d16 --views 8 --steps 10 \
  --precision-cost --images 64 --no-split \
  --variant bf16_full:cudnn:16 --variant bf16:cudnn:16 --variant bf16:einsum:16 \
  --variant bf16:fused:16 --variant tf32:einsum:16 --variant highest:einsum:16 \
  2>"$out/part1.err" | tee "$out/bench.jsonl"
echo "part 1 exit ${PIPESTATUS[0]}"; tail -3 "$out/part1.err"
timeout "${PART2_S:-130}" python3 experiments/bench.py --config d16 --views 8 --steps 10 \
  --variant bf16_full:cudnn:32 --variant bf16:cudnn:32 --skip-tokenizer bf16_full --skip-tokenizer bf16 \
  2>"$out/part2.err" | tee -a "$out/bench.jsonl"
echo "part 2 exit ${PIPESTATUS[0]}"; tail -3 "$out/part2.err"
if [ "${SPLIT:-0}" = 1 ]; then  # optional (~3 min): where the step's time goes, per part
  timeout "${PART3_S:-200}" python3 experiments/bench.py --config d16 --views 8 --steps 3 \
    --variant bf16:cudnn:16 --variant highest:einsum:16 2>"$out/part3.err" | tee -a "$out/bench.jsonl"
  echo "part 3 exit ${PIPESTATUS[0]}"; tail -3 "$out/part3.err"
fi
python3 - "$out/bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    keys = {"throughput": ("precision", "attention", "images_per_step", "images_per_s", "tflop_per_s",
                           "peak_share", "compile_s", "step_mem_gib", "peak_device_mem_gib"),
            "tokenizer": ("precision", "views_per_s", "compile_s"),
            "split": ("precision", "attention", "step_s", "tokenizer_s", "var_input_s", "transformer_s",
                      "reductions_s", "rest_s"),
            "precision_cost": ("precision", "attention", "identical_tokens", "mu_p99_rel_err", "mu_max_rel_err",
                               "unitmem_spearman", "u10_argmax_agreement", "u10_jaccard"),
            "error": ("precision", "attention", "images_per_step", "error")}[r["what"]]
    print(r["what"][:10], *(f"{k}={r.get(k)}" for k in keys))
PY
