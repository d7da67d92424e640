#!/usr/bin/env bash
# The prepared GPU check of issue 6, for a session lent an accelerator (one short call):
#   d16 + the released VQVAE shape, random weights: throughput per precision, then what tf32
#   and bf16 cost against highest. JSON lines go to $OUT/bench.jsonl (or runs/bench/).
# Needs only jax, flax, numpy, scipy on the machine (no grain, no tfds, no torch).
# About 6 minutes on one H100/H200 (compiles included); pass a smaller --images-per-step
# through IMAGES_PER_STEP if memory runs out.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/bench}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
ips="${IMAGES_PER_STEP:-16}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 experiments/bench.py --config d16 --images-per-step "$ips" --views 8 --steps 5 \
  --attention einsum --attention fused | tee "$out/bench.jsonl"
python3 experiments/bench.py --config d16 --precision-cost --images 64 --images-per-step "$ips" \
  | tee -a "$out/bench.jsonl"
