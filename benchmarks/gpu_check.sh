#!/usr/bin/env bash
# The GPU check, for anyone with a CUDA GPU (about 7 minutes on one H200-class card, by estimate:
# it has not run on a GPU yet). No download: a model with Qwen3-1.7B's shapes and random weights is
# built from its config, then benchmarks/bench_step.py times the paper's step and its bare parts:
# 32 prompts and every other setting of configs/qwen3-1.7b.yaml (up to 2,048 new tokens, which a
# random model rarely stops short of; bf16; LoRA r 64 on every linear layer; micro-batches of 4
# with gradient checkpointing), base teacher, full-vocabulary forward KL, the reference arm (a
# random model writes no steps to critique). It prints seconds and peak GPU memory per phase,
# then overhead_ratio=.
#
#   bash benchmarks/gpu_check.sh                      # from the repository root
#   bash benchmarks/gpu_check.sh max_new_tokens=512 --repeats 2   # more settings go last
# It uses .venv/bin/python when that exists, else python (or set PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then PYTHON=python; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
"$PYTHON" benchmarks/bench_step.py --model qwen3-1.7b --config configs/qwen3-1.7b.yaml \
    --prompts 32 --repeats 1 device=cuda "$@"
