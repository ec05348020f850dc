"""Protects the torchrun contract: N processes (gloo on CPU here) train exactly like one process on
the same step's questions: the summed LoRA gradient equals the one-process gradient, the adapter
after two steps is the same, the logs and checkpoints are rank 0's alone, a killed run resumes under
torchrun, and evaluation shards its questions into one eval.jsonl.

The same rollouts on both sides: with generation_batch equal to one process's share of a step,
sampler.generate seeds each chunk by its first row's place in the whole step, so one process and
two draw the same samples. Each torchrun start costs ~10 s of imports per process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from selfdistill import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def settings(arm, out_dir, run, **extra):
    """A short toy-world run: 8 questions a step (4 per process), checkpoints every step."""
    G = 8 if arm == "grpo" else 1
    values = dict(run=run, out_dir=str(out_dir), threads=1, batch_size=8, generation_batch=4 * G,
                  micro_batch=4 * G, max_steps=2, checkpoint_every=1, grad_clip=0, eval_at_end="false")
    values.update(extra)
    return ["--context", arm, *[f"{k}={v}" for k, v in values.items()]]


def torchrun(script, args, n=2, **kwargs):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            os.path.join(ROOT, script), *args]


def run(command, **kwargs):
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600, **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def trainer_state(run_dir, step):
    return torch.load(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "trainer_state.pt"),
                      weights_only=True)


def adapter(run_dir, step):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "adapter_model.safetensors"))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("arm", ["critique", "grpo"])
def test_two_processes_train_like_one(arm, tmp_path):
    # GRPO on the v2 world: in v3's (the default) its first 8 questions' groups are all wrong, no signal
    world = {"model": "toy-v2"} if arm == "grpo" else {}
    run([sys.executable, "selfdistill.py", *settings(arm, tmp_path, "one", **world)])
    run(torchrun("selfdistill.py", settings(arm, tmp_path, "two", **world)))
    one, two = tmp_path / "one", tmp_path / "two"
    # the first step's gradient: AdamW's first moment after one step is (1 − β1)·g, on every rank
    g1 = trainer_state(one, 1)["optimizer"]["state"]
    g2 = trainer_state(two, 1)["optimizer"]["state"]
    assert g1.keys() == g2.keys() and len(g1) > 0
    scale = max(s["exp_avg"].abs().max().item() for s in g1.values())
    assert scale > 1e-6  # the step had a signal to compare
    worst = max((g1[i]["exp_avg"] - g2[i]["exp_avg"]).abs().max().item() for i in g1)
    assert worst <= 1e-4 * scale, (worst, scale)
    # the adapter after two steps
    a1, a2 = adapter(one, 2), adapter(two, 2)
    assert a1.keys() == a2.keys()
    for name in a1:
        torch.testing.assert_close(a2[name], a1[name], atol=1e-4, rtol=1e-3)
    # the logs: one metrics line per step, from rank 0 alone, with the whole step's numbers
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2]
    for a, b in zip(m1, m2):
        for key in ("train/reward", "train/response_len", "train/zero_signal", "train/critique_invalid"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
        for key in ("train/loss", "train/grad_norm", "train/entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_killed_torchrun_run_resumes(tmp_path):
    """SIGKILL to the whole torchrun group after the first checkpoint; the same command resumes
    from it and finishes with one metrics line per step."""
    args = settings("critique", tmp_path, "kill", max_steps=4)
    proc = subprocess.Popen(torchrun("selfdistill.py", args), cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "kill" / "checkpoints" / "step_000001"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists()
    out = run(torchrun("selfdistill.py", args))
    assert "resuming" in out.stdout
    assert [m["step"] for m in metrics(tmp_path / "kill")] == [1, 2, 3, 4]
    assert (tmp_path / "kill" / "checkpoints" / "step_000004").is_dir()


def test_sharded_evaluation_writes_one_file(tmp_path):
    run([sys.executable, "selfdistill.py", *settings("critique", tmp_path, "ev", max_steps=1)])
    run(torchrun("eval.py", [str(tmp_path / "ev"), "--samples", "2", "--questions", "6"]))
    rows = [json.loads(line) for line in open(tmp_path / "ev" / "eval.jsonl")]
    rows = [r for r in rows if "split" not in r]  # the test set's rows (not the transfer split's)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["questions"] == 6 and r["n"] == 2 and r["processes"] == 2 for r in rows)
    assert rows[0]["base_key"]["processes"] == 2  # not reused by a one-process evaluation


def test_batch_must_divide_across_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    from plumbing.common import UserError
    with pytest.raises(UserError, match="does not divide across 3 processes"):
        load_config(["batch_size=8"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_config(["batch_size=8"]).batch_size == 8
