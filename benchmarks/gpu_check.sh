#!/usr/bin/env bash
# The paper pipeline's first GPU run, for anyone with a CUDA GPU: prepare.py, the critic, two steps of
# each arm and eval.py at the paper's shapes (Qwen3-1.7B student, Qwen3-4B local critic; random
# weights, no download), with seconds and peak GPU memory per phase (benchmarks/paper_check.py).
# About 10 minutes by estimate on an H100-class card; it has not run on a GPU yet. Its CPU twin
# (tiny shapes, same script) runs in CI: python benchmarks/paper_check.py --twin
#
#   bash benchmarks/gpu_check.sh                          # from the repository root
#   bash benchmarks/gpu_check.sh --batch-size 32          # the paper's batch (about twice the time)
# It uses .venv/bin/python when that exists, else python (or set PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then PYTHON=python; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
"$PYTHON" benchmarks/paper_check.py "$@"
