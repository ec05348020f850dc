"""Protects the benchmark scripts from rotting (they are not run by CI otherwise): bench_step runs
one tiny repeat on the toy model, its bare generate reproduces the step's tokens, and it prints
the ratio line; bench_divergence's --quick run gives the same loss both ways and times the entropy
metric; gpu_check.sh refuses a machine without CUDA in one line, before it builds anything, and its
CPU twin (paper_check.py --twin) runs every phase of the paper's pipeline.
bench_peer's pieces that need no TRL: its qwen3-shape world (Qwen3's 151,936-entry vocabulary, a
tied head, a chat template, prompts of the asked length, generation forced to full length), our
side of both arms running on it, its argument checks, its memory cap and its summary."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


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


def test_the_gpu_checks_cpu_twin_runs_every_phase(tmp_path):
    """benchmarks/paper_check.py --twin: the GPU check's script at tiny shapes (Qwen3's vocabulary),
    every phase of the paper's pipeline, a report with seconds and memory for each."""
    result = run([sys.executable, "benchmarks/paper_check.py", "--twin", "--out", str(tmp_path / "check")],
                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    phases = {row["phase"]: row for row in report["phases"]}
    assert list(phases) == ["build", "prepare", "critic", "grpo", "reference", "critique", "eval"]
    assert all(row["seconds"] > 0 and row["peak_gib"] > 0 for row in phases.values())
    assert phases["prepare"]["problems"] == 1 and phases["critic"]["critiques"] == 4
    for arm in ("grpo", "reference", "critique"):  # each arm's loss ran on both steps
        metrics = [json.loads(line) for line in open(tmp_path / "check" / "runs" / f"{arm}-s0" / "metrics.jsonl")]
        assert [m["step"] for m in metrics] == [1, 2] and all("train/kl" in m for m in metrics), arm


# ---------------------------------------------------------------------------------------------
# bench_peer: everything but the TRL side (TRL lives in its own venv, never in the project's).

TINY_BODY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)  # the real vocabulary, a body that loads in a blink


@pytest.fixture(scope="module")
def qwen3_world(tmp_path_factory):
    import bench_peer
    folder = tmp_path_factory.mktemp("qwen3_world")
    bench_peer.build_qwen3_world(str(folder), n_questions=8, prompt_tokens=48, max_new_tokens=6, body=TINY_BODY)
    return str(folder)


def test_qwen3_world_has_qwen3s_vocabulary_a_tied_head_and_a_chat_template(qwen3_world):
    import bench_peer
    import contexts
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = os.path.join(qwen3_world, "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert len(tokenizer) == model.config.vocab_size == bench_peer.QWEN3_VOCAB == 151_936
    assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.generation_config.min_new_tokens == model.generation_config.max_new_tokens == 6
    with open(os.path.join(qwen3_world, "train.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 8 and all(r["question"] and r["answer"] and r["solution"] for r in records)
    for r in records:  # exactly the asked prompt length, and no word the tokenizer does not know
        ids = contexts.student_prompt_ids(tokenizer, r["question"], "instruct")
        teacher = contexts.teacher_prompt_ids(tokenizer, r["question"], r["solution"], "reference", "instruct")
        assert len(ids) == 48 and tokenizer.unk_token_id not in ids + teacher
    text = tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nw5 w6<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[-2:] == tokenizer.convert_tokens_to_ids(["<|im_start|>", "assistant"])
    assert tokenizer.decode(tokenizer("w5 w6 w7", add_special_tokens=False)["input_ids"]) == "w5 w6 w7"


@pytest.mark.parametrize("arm", ["reference", "grpo"])
def test_bench_peer_our_side_runs_on_the_qwen3_world(qwen3_world, arm):
    result = run([sys.executable, "benchmarks/bench_peer.py", "--side", "ours", "--shape", "qwen3",
                  "--world", qwen3_world, "--arm", arm, "--steps", "2", "--batch-size", "2",
                  "--max-new-tokens", "6", "--threads", "1"],
                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert len(out["seconds"]) == 2 and out["lengths"] == [6.0, 6.0]  # every response forced to full length
    assert 0 < out["peak_rss_gib"] < 4 and {"generate", "student"} <= set(out["phases"])
    assert ("teacher" in out["phases"]) == (arm == "reference")


def test_bench_peer_parity_reward_varies_with_the_text():
    import bench_peer
    assert [bench_peer.parity_reward(t, "w1", False) for t in ("w1", "w12", "", "w1 w2")] == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "1"], "--steps must be at least 2"),
    (["--arm", "grpo", "--batch-size", "3", "--micro-batch", "5"], "--micro-batch must divide the step's 24"),
    (["--micro-batch", "5"], "--micro-batch must divide the step's 32"),
    (["--shape", "qwen3", "--arm", "grpo", "--reward", "answer"], "use --reward parity"),
    (["--prompt-tokens", "64"], "--prompt-tokens applies to --shape qwen3"),
])
def test_bench_peer_refuses_settings_that_cannot_work(flags, message):
    result = run([sys.executable, "benchmarks/bench_peer.py", *flags])
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_bench_peer_kills_a_side_over_the_memory_cap():
    import argparse
    import bench_peer
    args = argparse.Namespace(arm="reference", shape="toy", world="", steps=2, batch_size=1, micro_batch=1,
                              max_new_tokens=8, threads=1, reward="answer", memory_cap_gib=0.02)
    result = bench_peer.run_side("ours", sys.executable, args, seed=0)  # the interpreter alone is > 20 MiB
    assert set(result) == {"over_cap"} and result["over_cap"] > 0.02


def test_bench_peer_summary_drops_the_warm_up_step(capsys):
    import bench_peer
    runs = [{"seconds": [9.0, 1.0, 3.0], "lengths": [5, 4, 4], "zero_signal": [1.0, 0.0, 0.5],
             "peak_rss_gib": peak, "phases": {"generate": [8.0, 0.5, 1.5]}} for peak in (1.0, 2.0, 6.0)]
    median, rate, peak, lengths = bench_peer.summarise("ours", runs, rows_per_step=2)
    assert (median, rate, peak, lengths) == (2.0, 4.0, 2.0, [4, 4, 4])
    out = capsys.readouterr().out
    assert "zero_signal 0.25" in out and "generate 1.00" in out
