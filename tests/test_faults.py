"""Protects training against faults: a non-finite loss or gradient skips the update (LoRA weights
and optimizer state untouched), is counted in metrics.jsonl and stops the run with one line after
`max_nonfinite` in a row; SIGINT / SIGTERM finish the step, write a checkpoint and exit, and the
same command resumes to the end; SIGKILL at random moments never leaves a broken or half-written
checkpoint, and kill + resume (several times) ends at bit-identical adapter weights, metrics and
samples to an uninterrupted run. Plus two crash windows at start-up: the log truncation on resume
and the rewrite of config.yaml are atomic (temporary file, then rename).

Non-finite steps are made in-process, without editing the code: `selfdistill.token_divergence` (what
sd_loss calls) is wrapped to return NaN (a non-finite loss) or a finite value whose gradient is NaN
(finite loss, non-finite gradient) on chosen steps; the steps are counted by wrapping
`sampler.generate` (one call per training step). Signals and kills need a real process: those tests run
`selfdistill.py` as a subprocess on the tiny model from conftest.py (the SIGKILL test starts six,
about 25 s)."""
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from plumbing import runfolder
from plumbing import sampler
import selfdistill
from conftest import run_main, run_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


settings = functools.partial(run_settings, max_new_tokens=8, lr=0.05)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def adapter(run_dir, step):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "adapter_model.safetensors"))


def trainer_state(run_dir, step):
    return torch.load(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "trainer_state.pt"),
                      weights_only=True)


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adam_steps(state):
    """How many optimizer updates Adam has applied (the same count for every LoRA tensor)."""
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


# ---------------------------------------------------------------------------------------------
# Non-finite loss or gradient


def poison(monkeypatch, mode, bad_steps):
    """Make the divergence non-finite on the given 1-based steps (one generate call per step).

    loss: the per-token values are NaN. gradient: the values stay finite, their gradient is NaN
    (0·√u at u = 0 has value 0 and gradient 0·∞)."""
    calls = {"generate": 0}
    real_generate, real_divergence = sampler.generate, selfdistill.token_divergence

    def generate(*args, **kwargs):
        calls["generate"] += 1
        return real_generate(*args, **kwargs)

    def divergence(student_logits, teacher_logits, *args, **kwargs):
        values = real_divergence(student_logits, teacher_logits, *args, **kwargs)
        if calls["generate"] not in bad_steps:
            return values
        if mode == "loss":
            return values * float("nan")
        return values + 0.0 * (student_logits - student_logits.detach()).sqrt().sum(-1)

    monkeypatch.setattr(sampler, "generate", generate)
    monkeypatch.setattr(selfdistill, "token_divergence", divergence)


@pytest.mark.bad_input
@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(mode, tiny_model_dir, data, tmp_path,
                                                             monkeypatch, capsys):
    poison(monkeypatch, mode, bad_steps={2, 3, 4, 5})
    code, out, err = run_main(["--context", "reference", "--run", "nf", *settings(
        tiny_model_dir, data, tmp_path, max_steps=5, checkpoint_every=1, max_nonfinite=2)], capsys)
    run_dir = tmp_path / "nf"
    # stops after two non-finite steps in a row, with one line that says what to do
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: stopping: 2 steps in a row had a non-finite loss "
                                            "or gradient (last at step 3); lower lr or check the data")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["train/nonfinite"] for m in metrics] == [0, 1, 1]
    assert math.isfinite(metrics[0]["train/loss"]) and math.isfinite(metrics[0]["train/grad_norm"])
    if mode == "loss":
        assert all(math.isnan(m["train/loss"]) for m in metrics[1:])
    else:  # the loss is finite, only the gradient is not
        assert all(math.isfinite(m["train/loss"]) and math.isnan(m["train/grad_norm"]) for m in metrics[1:])
    # the skipped steps are logged like any other step (the line shows the loss / grad it saw)
    assert all(f"step {s}/5 |" in out for s in (1, 2, 3))
    # skipped: the LoRA weights and Adam's state stay exactly as after step 1; the stop writes
    # its checkpoint, and nothing after it exists
    assert any(v.abs().sum() > 0 for k, v in adapter(run_dir, 1).items() if "lora_B" in k)  # step 1 trained
    assert same_tensors(adapter(run_dir, 2), adapter(run_dir, 1))
    assert same_tensors(adapter(run_dir, 3), adapter(run_dir, 1))
    assert adam_steps(trainer_state(run_dir, 1)) == adam_steps(trainer_state(run_dir, 3)) == {1}
    assert trainer_state(run_dir, 3)["nonfinite"] == 2
    assert not (run_dir / "checkpoints" / "step_000004").exists()


def test_a_finite_step_resets_the_nonfinite_count(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, "loss", bad_steps={2, 4})
    code, out, err = run_main(["--context", "reference", "--run", "nf", *settings(
        tiny_model_dir, data, tmp_path, max_steps=5, checkpoint_every=1, max_nonfinite=2)], capsys)
    assert code == 0, err[-2000:]
    run_dir = tmp_path / "nf"
    assert [m["train/nonfinite"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 0, 1, 0]
    assert same_tensors(adapter(run_dir, 2), adapter(run_dir, 1))
    assert not same_tensors(adapter(run_dir, 3), adapter(run_dir, 2))
    assert same_tensors(adapter(run_dir, 4), adapter(run_dir, 3))
    assert adam_steps(trainer_state(run_dir, 5)) == {3}


@pytest.mark.bad_input
def test_a_skipped_update_says_so_in_the_log(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, "gradient", bad_steps={2})
    code, out, err = run_main(["--context", "reference", "--run", "nf", *settings(
        tiny_model_dir, data, tmp_path, max_steps=2, checkpoint_every=1)], capsys)
    assert code == 0, err[-2000:]
    line = next(l for l in out.splitlines() if "step 2/2" in l)
    assert "skipped" in line


@pytest.mark.bad_input
def test_a_huge_learning_rate_stops_with_one_line(tiny_model_dir, data, tmp_path, capsys):
    code, out, err = run_main(["--context", "reference", "--run", "lr", *settings(
        tiny_model_dir, data, tmp_path, lr=1e30, max_steps=6, checkpoint_every=1, max_nonfinite=2)],
        capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: stopping: 2 steps in a row had a non-finite")
    assert [m["train/nonfinite"] for m in read_jsonl(tmp_path / "lr" / "metrics.jsonl")] == [0, 1, 1]


# ---------------------------------------------------------------------------------------------
# SIGINT / SIGTERM: finish the step, checkpoint, exit; the same command resumes


def launch(args, log_dir, name):
    """Start selfdistill.py; stdout and stderr go to files (a full pipe would block the run)."""
    out = open(os.path.join(log_dir, f"{name}.out"), "w")
    err = open(os.path.join(log_dir, f"{name}.err"), "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log up to the kill reaches the file
    process = subprocess.Popen([sys.executable, "selfdistill.py", *args], cwd=ROOT, stdout=out, stderr=err,
                               env=env)
    process.logs = (out, err)
    return process


def finish(process, timeout=300):
    process.wait(timeout=timeout)
    for f in process.logs:
        f.close()
    return [open(f.name).read() for f in process.logs]


def metrics_lines(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.endswith("\n"))


@pytest.mark.bad_input
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_a_final_checkpoint_and_the_same_command_resumes(signum, tiny_model_dir, data,
                                                                        tmp_path, capsys):
    # checkpoint_every is larger than the run: any checkpoint before the end is the signal's
    args = ["--context", "critique", "--run", "sig",
            *settings(tiny_model_dir, data, tmp_path, max_steps=4, checkpoint_every=100)]
    run_dir = tmp_path / "sig"
    process = launch(args, tmp_path, "first")
    deadline = time.time() + 240
    while metrics_lines(run_dir) < 1 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before the first step was logged"
    process.send_signal(signum)
    out, err = finish(process)
    assert process.returncode == 128 + int(signum), err[-2000:]
    assert "Traceback" not in err
    stopped = [line for line in out.splitlines() if line.startswith("stopped by signal")]
    assert len(stopped) == 1, out[-2000:]
    step = len(read_jsonl(run_dir / "metrics.jsonl"))  # the last completed step
    assert stopped[0] == (f"stopped by signal {int(signum)} after step {step}; checkpoint saved, "
                          f"rerun the same command to resume")
    assert 1 <= step < 4, "the signal came too late to test stopping early"
    assert [os.path.basename(p) for p in runfolder.checkpoint_dirs(run_dir)] == [f"step_{step:06d}"]
    assert trainer_state(run_dir, step)["step"] == step
    # rerun the same command: resumes after that step and finishes
    code, out, err = run_main(args, capsys)
    assert code == 0, err[-2000:]
    assert f"resuming {run_dir} after step {step}" in out
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "step_000004" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def check_checkpoints(run_dir, base):
    """Every checkpoints/step_* folder is complete and loadable; .tmp_* folders are never listed.
    Returns the newest complete step (0: none) and the names of leftover temporary folders."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    root = os.path.join(run_dir, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    listed = [os.path.basename(p) for p in runfolder.checkpoint_dirs(run_dir)]
    steps = [n for n in names if n.startswith("step_")]
    assert listed == steps and all(n[len("step_"):].isdigit() and len(n) == 11 for n in steps), names
    assert set(names) <= set(steps) | {n for n in names if n.startswith(".tmp_step_")}, names
    for name in steps:
        folder = os.path.join(root, name)
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= set(
            os.listdir(folder)), name
        state = torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=True)
        assert state["step"] == int(name[len("step_"):]) and {"optimizer", "scheduler"} <= state.keys(), name
        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), folder)
        ours = {k.replace(".default", ""): v for k, v in get_peft_model_state_dict(loaded).items()}
        assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in saved), name
    newest = int(steps[-1][len("step_"):]) if steps else 0
    return newest, [n for n in names if n.startswith(".tmp_")]


def newest_step(run_dir):
    done = runfolder.checkpoint_dirs(run_dir)
    return int(os.path.basename(done[-1])[len("step_"):]) if done else 0


def logged_steps(run_dir, launched):
    """Lines in metrics.jsonl, counted only once the file changed after `launched` (a resume first
    trims the lines written after its checkpoint, so older lines say nothing about this process)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path) or os.stat(path).st_mtime <= launched:
        return 0
    return metrics_lines(run_dir)


def wait_until(process, event, deadline_s=300):
    """Poll event() every 2 ms while the process runs; True if it came first."""
    deadline = time.time() + deadline_s
    while process.poll() is None and time.time() < deadline:
        if event():
            return True
        time.sleep(0.002)
    return False


def kill_when(process, event):
    """SIGKILL the process as soon as event() is true; False if it exited first."""
    if not wait_until(process, event) or process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    return True


def moment_reached(moment, delay, run_dir, resumed_from, launched):
    """event() of one kill moment; the run resumed from checkpoint `resumed_from`."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    first_new_step = {}

    def reached():
        lines = logged_steps(run_dir, launched)
        if moment == "start-up":  # a random moment, but before the first new step ends
            return time.time() > launched + delay or lines > resumed_from
        if moment == "mid-checkpoint":  # a checkpoint is being written (or was just renamed)
            return newest_step(run_dir) > resumed_from or (os.path.isdir(checkpoints) and any(
                n.startswith(".tmp_step_") for n in os.listdir(checkpoints)))
        if lines > resumed_from:  # after-log: `delay` after the first new line, at most one more step
            first_new_step.setdefault("at", time.time())
        return lines > resumed_from + 1 or time.time() > first_new_step.get("at", math.inf) + delay
    return reached


# six processes (~4 s of imports each) and 8 + ~10 tiny steps: about 25 s on 2 shared cores
@pytest.mark.bad_input
def test_sigkill_at_random_moments_resumes_to_the_same_result(tiny_model_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    steps = 8

    def command(out_dir):
        return ["--context", "critique", "--config", "configs/smoke.yaml", "--run", "k",
                *settings(tiny_model_dir, data, out_dir, max_steps=steps, checkpoint_every=1)]

    # the uninterrupted reference; its start-up time scales the start-up kill
    reference = tmp_path / "ref" / "k"
    launched = time.time()
    process = launch(command(tmp_path / "ref"), tmp_path, "reference")
    assert wait_until(process, lambda: logged_steps(reference, launched) >= 1)
    startup = time.time() - launched
    out, err = finish(process)
    assert process.returncode == 0, err[-2000:]

    # Kill, check every checkpoint, resume with the same command; four times. The moments are
    # tied to the run's own progress (the machine's speed varies) plus seeded random delays:
    # start-up: a random moment before the first new step (loading, resuming, trimming logs);
    # after-log: a random 0-0.5 s after a new metrics line (mid-step, between log and checkpoint);
    # mid-checkpoint: the moment a .tmp_step_* folder exists (the checkpoint is being written).
    # Each kill lets the run advance at most two steps, so the fourth lands before the end.
    run_dir = tmp_path / "killed" / "k"
    rng = random.Random(20260501)
    kills = []
    for attempt, moment in enumerate(["after-log", "start-up", "mid-checkpoint", "after-log"]):
        resumed_from = newest_step(run_dir)
        delay = (rng.uniform(0.2, 1.0) * startup if moment == "start-up"
                 else rng.uniform(0.0, 0.5) if moment == "after-log" else 0.0)
        launched = time.time()
        process = launch(command(tmp_path / "killed"), tmp_path, f"attempt{attempt}")
        event = moment_reached(moment, delay, run_dir, resumed_from, launched)
        assert kill_when(process, event), f"attempt {attempt} ended on its own"
        out, err = finish(process)
        assert process.returncode == -signal.SIGKILL, err[-2000:]
        if "resuming" in out:  # the log is unbuffered, so a resume that got that far said so
            assert f"resuming {run_dir} after step {resumed_from}\n" in out
        newest, tmp = check_checkpoints(run_dir, base)
        assert newest >= resumed_from
        kills.append({"at": moment, "delay_s": round(delay, 2), "from": resumed_from, "to": newest,
                      "tmp_left": tmp})

    # a half-written checkpoint folder must be ignored (plant one if no kill left one behind)
    newest = newest_step(run_dir)
    assert newest < steps, f"the kills came too late: {kills}"
    planted = run_dir / "checkpoints" / f".tmp_step_{newest + 1:06d}"
    planted.mkdir(parents=True, exist_ok=True)
    (planted / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    process = launch(command(tmp_path / "killed"), tmp_path, "final")
    out, err = finish(process)
    assert process.returncode == 0, err[-2000:]
    assert f"resuming {run_dir} after step {newest}\n" in out
    assert check_checkpoints(run_dir, base) == (steps, [])

    final = os.path.join("checkpoints", f"step_{steps:06d}", "adapter_model.safetensors")
    assert sha256(run_dir / final) == sha256(reference / final), kills
    assert without_times(read_jsonl(run_dir / "metrics.jsonl")) == without_times(
        read_jsonl(reference / "metrics.jsonl"))
    assert read_jsonl(run_dir / "samples.jsonl") == read_jsonl(reference / "samples.jsonl")
    print(f"\nreference start-up {startup:.1f}s; kills: {kills}")


# ---------------------------------------------------------------------------------------------
# Crash windows in the start-up bookkeeping (found by reading the code, simulated in-process)


class Crash(Exception):
    """Stands for SIGKILL arriving inside a write."""


def crash_inside_writes_to(monkeypatch, name):
    """Make the next file opened for writing under this base name die after the truncation."""
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(str(path)) == name:
            def die(*a, **k):
                raise Crash
            f.write = f.writelines = die
        return f

    monkeypatch.setattr(runfolder, "open", fake_open, raising=False)


@pytest.mark.bad_input
def test_a_kill_while_trimming_the_log_on_resume_loses_no_lines(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 0.5} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    crash_inside_writes_to(monkeypatch, "metrics.jsonl")
    with contextlib.suppress(Crash):
        runfolder.keep_lines_up_to(str(path), 2)  # a resume after step 2, killed while trimming
    monkeypatch.undo()
    assert read_jsonl(path) in (rows, rows[:2])


@pytest.mark.bad_input
def test_a_kill_while_a_resume_rewrites_config_yaml_does_not_lock_the_run(tmp_path, monkeypatch):
    cfg = selfdistill.load_config(["--run", "r", f"out_dir={tmp_path}"])
    runfolder.prepare_run_dir(cfg)  # the first start
    crash_inside_writes_to(monkeypatch, "config.yaml")
    with contextlib.suppress(Crash):
        runfolder.prepare_run_dir(cfg)  # a resume, killed while it writes config.yaml
    monkeypatch.undo()
    runfolder.prepare_run_dir(cfg)  # the next resume with the very same settings
