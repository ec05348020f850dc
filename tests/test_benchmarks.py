"""Protects the benchmark scripts from rotting (they are not run by CI otherwise): bench_step runs
one tiny repeat on the toy model, its bare generate reproduces the step's tokens, and it prints
the ratio line; bench_divergence's --quick run gives the same loss both ways and times the entropy
metric; gpu_check.sh refuses a machine without CUDA in one line, before it builds anything."""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def test_bench_step_reproduces_the_steps_tokens_and_prints_its_ratio(tmp_path):
    result = run([sys.executable, "benchmarks/bench_step.py", "--model", "toy", "--prompts", "2",
                  "--repeats", "1", "--threads", "1", "--keep", str(tmp_path), "max_new_tokens=8"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("the same texts") == 2 and "NOT the same" not in result.stdout
    assert re.search(r"^model=toy overhead_ratio=\d+\.\d{3}$", result.stdout, re.M)
    for phase in ("generate", "critic", "teacher", "student", "optimizer", "glue", "total"):
        assert re.search(rf"^  {phase} +step \d", result.stdout, re.M), phase


def test_bench_divergence_quick_agrees(tmp_path):
    result = run([sys.executable, "benchmarks/bench_divergence.py", "--quick", "--entropy", "--threads", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"memory_ratio=[\d.]+ .*time_ratio=[\d.]+ .*same_value=True same_grad=True$",
                     result.stdout, re.M)
    assert re.search(r"^ours\+entropy_s=[\d.]+ entropy_time_ratio=[\d.]+$", result.stdout, re.M)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal; a GPU machine runs the real thing")
def test_gpu_check_needs_cuda():
    result = run(["bash", "benchmarks/gpu_check.sh"], env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: device=cuda but no CUDA device is available; use device=cpu")
