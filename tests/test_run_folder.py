"""A run folder (runfolder.py) under careless input, damage and interrupts.

Protects: run names are plain folder names, and a run path that cannot be used (a file, a dangling
link, a link loop, a log that is a folder, a full or read-only disk) is one `error:` line; a run's
config.yaml is read as data through the strict loader, never code (trust_remote_code only from the
command line); resuming with a changed setting, train file or base model is refused, while a start
that failed before any checkpoint can be rerun fixed; damaged state recovers or explains itself (a
truncated last JSONL line, a damaged or NaN newest checkpoint, stray names under checkpoints/, a
damaged inputs.json, metrics lines without a whole step); no checkpoint is written with non-finite
weights; SIGTERM and Ctrl-C reach an eval child and end in one line (exit 130 in every program, even
while torch imports); a collective failing because another torchrun process died is one line; and
kills in the middle of an append and of the end-of-run evaluation resume to the same results as a
run never interrupted."""
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

import analyze
import compare
import eval as ev
import prepare
import selfdistill
from plumbing import common
from plumbing import ranks
from plumbing import runfolder
from plumbing.common import UserError
from conftest import (Tripwire, error_line, one_line_error, os_lock_held, run_main, run_settings, timed, trip,
                      wait_for)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
settings = functools.partial(run_settings, max_new_tokens=6, max_steps=2, lr=0.05)


# ---------------------------------------------------------------------------------------------
# Run names and paths


@pytest.mark.bad_input
@pytest.mark.parametrize("run, fragment", [("../escape", "plain folder name"), ("/abs/path", "plain folder name"),
                                           (".", "plain folder name"), ("a/b", "plain folder name")])
def test_run_names_that_are_not_plain_folders(run, fragment, tiny_model_dir, data, tmp_path, capsys):
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + ["--run", run], capsys)
    one_line_error(code, err, fragment)


@pytest.mark.bad_input
def test_a_run_folder_that_is_a_file(tiny_model_dir, data, tmp_path, capsys):
    (tmp_path / "r").write_text("not a folder")
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + ["--run", "r"], capsys)
    one_line_error(code, err, "is not a folder")


def path_case(kind, tmp_path):
    """(extra arguments, the strerror expected) for a run path that cannot be used."""
    if kind == "out_dir under a file":
        (tmp_path / "file").write_text("")
        return [f"out_dir={tmp_path / 'file' / 'runs'}"], "Not a directory"
    if kind == "run a dangling link":
        (tmp_path / "runs").mkdir()
        os.symlink(tmp_path / "missing", tmp_path / "runs" / "r")
        return [f"out_dir={tmp_path / 'runs'}"], "File exists"
    if kind == "out_dir a link loop":
        os.symlink(tmp_path / "loop", tmp_path / "loop")
        return [f"out_dir={tmp_path / 'loop'}"], "Too many levels of symbolic links"
    os.symlink(tmp_path / "gone", tmp_path / "link")  # out_dir through a dangling link
    return [f"out_dir={tmp_path / 'link' / 'runs'}"], "No such file or directory"


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["out_dir under a file", "run a dangling link", "out_dir a link loop",
                                  "out_dir through a dangling link"])
def test_run_paths_that_cannot_be_used_are_one_line(kind, tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    extra, strerror = path_case(kind, tmp_path)
    trip(monkeypatch, common, "load_model")
    argv = [word for word in settings(tiny_model_dir, data, tmp_path) if not word.startswith("out_dir=")]
    code, _, err = run_main(argv + extra + ["--run", "r"], capsys)  # its out_dir in place of the default's
    one_line_error(code, err, f"error: cannot use {tmp_path}")
    assert strerror in err


@pytest.mark.bad_input
def test_a_log_that_is_a_folder_is_one_line(tiny_model_dir, data, tmp_path, capsys):
    (tmp_path / "r" / "metrics.jsonl").mkdir(parents=True)
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path, max_steps=1) + ["--run", "r"], capsys)
    one_line_error(code, err, f"cannot use {tmp_path / 'r' / 'metrics.jsonl'}: Is a directory")


@pytest.mark.bad_input
@pytest.mark.parametrize("code_, text", [(errno.ENOSPC, "No space left on device"),
                                         (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")])
def test_a_full_or_read_only_disk_is_one_line(code_, text, tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(code_, text, str(tmp_path / "r" / "config.yaml.tmp"))
    monkeypatch.setattr(runfolder, "write_atomic", refuse)
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + ["--run", "r"], capsys)
    one_line_error(code, err, text)


# ---------------------------------------------------------------------------------------------
# A run folder is data, not code


def write_config(run_dir, **values):
    run_dir.mkdir(exist_ok=True)
    config = {**vars(selfdistill.resolve(selfdistill.Config(run=run_dir.name))), **values}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return str(run_dir)


@pytest.mark.bad_input
def test_trust_remote_code_is_never_read_from_a_run_folder(tmp_path):
    run_dir = write_config(tmp_path / "theirs", trust_remote_code=True, model="their/model")
    assert ev.load_run_config(run_dir).trust_remote_code is False
    assert ev.load_run_config(run_dir, trust_remote_code=True).trust_remote_code is True  # our CLI


@pytest.mark.bad_input
@pytest.mark.parametrize("values, fragment", [
    ({"lr": float("nan")}, "'lr' must be a finite number"),
    ({"epochs": "many"}, "'epochs' wants a number"),
    ({"run": "../elsewhere"}, "plain folder name"),
])
def test_a_run_folders_config_goes_through_the_strict_loader(values, fragment, tmp_path):
    run_dir = write_config(tmp_path / "r", **values)
    with pytest.raises(UserError, match=fragment):
        ev.load_run_config(run_dir)
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump({"lr": 0.1, "lrr": 2}))
    with pytest.raises(UserError, match="unknown config key 'lrr'"):
        ev.load_run_config(run_dir)


# ---------------------------------------------------------------------------------------------
# Resuming


@pytest.mark.bad_input
def test_resuming_with_a_changed_setting_is_refused(data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    argv = ["--context", "reference", "--run", "r", f"train_file={data}", f"test_file={data}",
            f"out_dir={tmp_path}", "model=some/model"]
    with pytest.raises(Tripwire):  # the first start gets as far as loading the model
        selfdistill.main(argv + ["lr=0.001"])
    os.makedirs(tmp_path / "r" / "checkpoints" / "step_000010")  # ... and trained to a checkpoint
    line = error_line(argv + ["lr=0.01"], capsys)
    assert line == ("error: run 'r' exists with lr=0.001 (now 0.01); resume with the same settings or "
                    "choose another --run")
    with pytest.raises(Tripwire):  # eval_at_end may change between a run and its resume
        selfdistill.main(argv + ["lr=0.001", "eval_at_end=false"])


@pytest.mark.bad_input
def test_a_failed_start_can_be_rerun_with_corrected_settings(tiny_model_dir, data, tmp_path, capsys,
                                                             monkeypatch):
    argv = ["--context", "critique", "--run", "r", *settings(tiny_model_dir, data, tmp_path)]
    error_line(argv + ["critic=hf", f"critic_model={tmp_path / 'typo'}"], capsys)
    trip(monkeypatch, common, "load_model")
    with pytest.raises(Tripwire):  # no checkpoint exists: nothing to resume, so nothing to refuse
        selfdistill.main(argv + ["critic=rule"])


def started_run(tmp_path, train, model):
    cfg = selfdistill.Config(run="r", out_dir=str(tmp_path))
    runfolder.prepare_run_dir(cfg, train, model)  # the first start
    os.makedirs(tmp_path / "r" / "checkpoints" / "step_000001")  # something to resume
    return cfg


@pytest.mark.bad_input
def test_a_changed_train_file_is_noticed_on_resume(tiny_model_dir, data, tmp_path, capsys):
    train = shutil.copy(data, tmp_path / "train.jsonl")
    cfg = started_run(tmp_path, train, tiny_model_dir)
    runfolder.prepare_run_dir(cfg, train, tiny_model_dir)  # unchanged: resumes
    with open(train, "a") as f:
        f.write('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(UserError, match="other contents of its train file .* use another --run"):
        runfolder.prepare_run_dir(cfg, train, tiny_model_dir)


@pytest.mark.bad_input
def test_a_changed_base_is_noticed_on_resume(tiny_model_dir, data, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    cfg = started_run(tmp_path, data, str(model))
    (model / "config.json").write_text((model / "config.json").read_text().replace("1024", "1023"))
    with pytest.raises(UserError, match="other contents of its model folder"):
        runfolder.prepare_run_dir(cfg, data, str(model))


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["[1, 2]", "{not json"])
def test_a_damaged_inputs_json_is_one_line(damage, data, tiny_model_dir, tmp_path):
    cfg = started_run(tmp_path, data, tiny_model_dir)
    (tmp_path / "r" / "inputs.json").write_text(damage)
    with pytest.raises(UserError, match="inputs.json is damaged"):
        runfolder.prepare_run_dir(cfg, data, tiny_model_dir)


# ---------------------------------------------------------------------------------------------
# Damaged state recovers or explains itself


@pytest.mark.bad_input
def test_no_checkpoint_with_non_finite_weights(tiny_model_dir, data, tmp_path):
    cfg = selfdistill.load_config(settings(tiny_model_dir, data, tmp_path))
    model, _ = common.load_model(cfg, tiny_model_dir, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with torch.no_grad():
        params[0][0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite weights"):
        runfolder.save_checkpoint(str(tmp_path), 1, model, optimizer, scheduler, {"step": 1})
    assert not os.path.exists(tmp_path / "checkpoints" / "step_000001")


@pytest.mark.bad_input
def test_a_truncated_last_jsonl_line_is_dropped_and_appends_stay_whole(tmp_path, capsys):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 1}\n{"step": 2}\n{"st')  # killed in the middle of the third write
    assert runfolder.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    runfolder.append_jsonl(path, {"step": 3})
    assert open(path).read() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert "truncated last line" in capsys.readouterr().err
    with open(path, "w") as f:
        f.write('{"step": 1}\nnot json\n{"step": 3}\n')  # damaged in the middle: say where
    with pytest.raises(UserError, match="metrics.jsonl:2 is damaged"):
        runfolder.read_jsonl(path)


@pytest.mark.bad_input
def test_a_resume_keeps_metrics_lines_without_a_whole_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = ['{"step": 1}', "[1]", '{"step": "2"}', '{"step": 3}', '{"step": 2.5}']
    open(path, "w").write("\n".join(lines) + "\n")
    runfolder.keep_lines_up_to(path, 2)  # crashed on a list or a text step before
    assert [json.dumps(r) for r in runfolder.read_jsonl(path)] == ['{"step": 1}', "[1]", '{"step": "2"}', '{"step": 2.5}']


@pytest.mark.bad_input
def test_stray_names_under_checkpoints_are_ignored(tmp_path):
    for name in ("step_000002", "step_000001.bak", ".tmp_step_000003", "step_7", "step_000005.damaged"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000004").write_text("a file, not a folder")
    (tmp_path / "checkpoints" / "notes.txt").write_text("")
    assert [os.path.basename(p) for p in runfolder.checkpoint_dirs(str(tmp_path))] == ["step_000002"]


@pytest.mark.bad_input
def test_a_damaged_newest_checkpoint_is_skipped_on_resume(tiny_model_dir, data, tmp_path, capsys):
    argv = settings(tiny_model_dir, data, tmp_path, checkpoint_every=1) + ["--run", "r"]
    assert run_main(argv, capsys)[0] == 0
    newest = tmp_path / "r" / "checkpoints" / "step_000002"
    (newest / "adapter_model.safetensors").write_bytes(b"garbage")
    argv[argv.index("max_steps=2")] = "max_steps=3"
    with pytest.raises(UserError):  # max_steps changed: refused, so rerun with the same settings
        selfdistill.train(selfdistill.load_config(argv))
    argv[argv.index("max_steps=3")] = "max_steps=2"
    capsys.readouterr()
    code, out, err = run_main(argv, capsys)
    assert code == 0 and "step_000002" in err and "does not load" in err
    assert "resuming" in out and "after step 1" in out
    assert [os.path.basename(p) for p in runfolder.checkpoint_dirs(str(tmp_path / "r"))] == ["step_000001", "step_000002"]
    assert (tmp_path / "r" / "checkpoints" / "step_000002.damaged").is_dir()
    steps = [r["step"] for r in runfolder.read_jsonl(str(tmp_path / "r" / "metrics.jsonl"))]
    assert steps == [1, 2]


def poison_adapter(checkpoint):
    from safetensors.torch import load_file, save_file
    path = os.path.join(checkpoint, "adapter_model.safetensors")
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})


@pytest.mark.bad_input
def test_a_nan_adapter_is_skipped_by_eval_and_moved_aside_on_resume(tiny_model_dir, data, tmp_path, capsys):
    argv = settings(tiny_model_dir, data, tmp_path, checkpoint_every=1) + ["--run", "r"]
    assert run_main(argv, capsys)[0] == 0
    run_dir = tmp_path / "r"
    newest = str(run_dir / "checkpoints" / "step_000002")
    poison_adapter(newest)
    # evaluation skips it with a warning; the other steps are evaluated
    code, _, err = run_main([str(run_dir), "--samples", "1", "--questions", "2"], capsys, script=ev)
    assert code == 0 and "Traceback" not in err, err[-2000:]
    assert f"warning: skipping the damaged checkpoint {newest} (NonFiniteAdapter)" in err
    assert [r["step"] for r in runfolder.read_jsonl(str(run_dir / "eval.jsonl"))] == [0, 1]
    # analyze.py and other callers that cannot skip: a one-line user error
    with pytest.raises(UserError, match="holds non-finite adapter weights"):
        runfolder.load_adapter_file(newest)
    # resume moves it aside and trains step 2 again
    code, out, err = run_main(argv, capsys)
    assert code == 0, err[-2000:]
    assert "does not load (NonFiniteAdapter); moved it to step_000002.damaged" in err
    assert f"resuming {run_dir} after step 1" in out
    assert all(torch.isfinite(w).all() for w in runfolder.load_adapter_file(newest).values())


# ---------------------------------------------------------------------------------------------
# Interrupts: signals, Ctrl-C, a dead peer


@pytest.mark.bad_input
def test_run_child_passes_sigterm_on_and_waits(tmp_path):
    """SIGTERM to the parent reaches the child (which would sleep a minute); the parent waits for it."""
    started = tmp_path / "started"
    child = [sys.executable, "-c", "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(60)", str(started)]

    def terminate():
        wait_for([str(started)])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()
    code, seconds = timed(lambda: common.run_child(child))
    assert code == 128 + signal.SIGTERM and seconds < 10


@pytest.mark.bad_input
def test_ctrl_c_during_evaluation_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "evaluate_run", interrupted)
    code, _, err = run_main([str(tmp_path)], capsys, script=ev)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == ["stopped by Ctrl-C; finished work is kept (checkpoints, eval.jsonl rows): "
                                        "rerun the same command to continue"]


@pytest.mark.bad_input
def test_sigint_to_the_trainer_reaches_its_eval_child(tiny_model_dir, data, tmp_path):
    """The trainer's end-of-run eval.py gets the trainer's SIGINT; both end with one line, the
    trainer only after its child, and the lock is released."""
    args = ["--run", "r", *settings(tiny_model_dir, data, tmp_path, max_steps=1, eval_at_end=True,
                                    eval_samples=32)]
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        trainer = subprocess.Popen([sys.executable, "selfdistill.py", *args], cwd=ROOT, stdout=out, stderr=err,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lock, child = tmp_path / "r" / ".lock", None
    deadline = time.time() + 120
    while child is None and trainer.poll() is None and time.time() < deadline:
        try:
            holder = lock.read_text().strip()
        except FileNotFoundError:  # between the trainer's release and eval.py's lock
            holder = ""
        child = int(holder) if holder and int(holder) != trainer.pid else None  # eval.py holds it now
        time.sleep(0.005)
    assert child, "eval.py never took the run's lock"
    trainer.send_signal(signal.SIGINT)
    assert trainer.wait(timeout=60) == 130
    assert not runfolder.alive(child)
    err = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in err and err.count("stopped by Ctrl-C") == 1, err[-2000:]
    assert not os_lock_held(lock)


@pytest.mark.bad_input
@pytest.mark.parametrize("program, argv, where", [
    (compare, ["runs/x"], (compare, "compare_runs")),
    (analyze, ["toy"], (analyze, "analyze")),
    (prepare, ["omr.jsonl"], (prepare, "prepare")),
], ids=["compare", "analyze", "prepare"])
def test_ctrl_c_in_the_secondary_programs_is_one_line(program, argv, where, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(*where, interrupted)
    code, _, err = run_main(argv, capsys, program)
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.bad_input
@pytest.mark.parametrize("script", [["selfdistill.py"], ["-m", "toyworld.toy_build"]])
def test_early_ctrl_c_exits_130_without_a_traceback(script):
    """Ctrl-C while torch is half imported (-X importtime names each module as it finishes)."""
    child = subprocess.Popen([sys.executable, "-X", "importtime", *script, "--help"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in child.stderr:
        if re.search(rb"\|\s+torch\.", line):  # a part of torch is imported, torch itself not yet
            break
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130 and b"Traceback" not in err, err[-2000:]


@pytest.mark.bad_input
def test_a_dead_peer_under_torchrun_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:
        with common.user_errors():
            raise RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                               "peer [127.0.0.1]:50317. This is typically caused by a remote worker crashing.")
    err = capsys.readouterr().err
    one_line_error(stop.value.code, err, "another process of this torchrun group stopped (Connection closed by peer")


def test_other_runtime_errors_still_raise(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="a bug"):
        with common.user_errors():
            raise RuntimeError("a bug")
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, no peer can have died
    assert not ranks.peer_failure(RuntimeError("Connection closed by peer"))


# ---------------------------------------------------------------------------------------------
# Kills during an append and during the end-of-run evaluation


def run_script(args, cwd):
    """selfdistill.py in its own process group; its stderr goes to cwd/stderr.txt."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "selfdistill.py"), *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(cwd, "stderr.txt"), "w"),
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_when(proc, ready, timeout=300):
    """SIGKILL the process group (the trainer and its eval.py) as soon as ready() holds."""
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def without_times(rows):
    return sorted(({k: v for k, v in r.items() if not k.startswith("time/") and k not in ("base_key", "reused_from")}
                   for r in rows), key=lambda r: r["step"])


@pytest.mark.bad_input
def test_kills_during_an_append_and_during_evaluation_resume_to_the_same_results(tiny_model_dir, data, tmp_path):
    extra = dict(max_steps=3, checkpoint_every=1, eval_at_end=True, eval_samples=2, eval_questions=3)
    reference = settings(tiny_model_dir, data, tmp_path / "a", **extra) + ["--run", "r"]
    assert run_script(reference, tmp_path).wait(timeout=300) == 0
    args = settings(tiny_model_dir, data, tmp_path / "b", **extra) + ["--run", "r"]
    run_dir = tmp_path / "b" / "r"
    checkpoints = run_dir / "checkpoints"
    # 1. killed while appending step 3's metrics line: checkpoint 3 does not exist yet, half a line does
    kill_when(run_script(args, tmp_path), lambda: (checkpoints / "step_000002").is_dir())
    for late in checkpoints.glob("step_00000[3-9]"):
        import shutil
        shutil.rmtree(late)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')
    # 2. the same command resumes; killed during its end-of-run evaluation, half an eval row left
    kill_when(run_script(args, tmp_path), lambda: (run_dir / "eval.jsonl").exists()
              and len((run_dir / "eval.jsonl").read_text().splitlines()) >= 2)
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write('{"step": 2, "n": 2, "k"')
    # 3. and once more: it finishes, with exactly the results of the run that was never killed
    assert run_script(args, tmp_path).wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        ours = runfolder.read_jsonl(str(run_dir / name))
        theirs = runfolder.read_jsonl(str(tmp_path / "a" / "r" / name))
        assert without_times(ours) == without_times(theirs), name
    assert not os_lock_held(run_dir / ".lock")  # released (the file stays: waiters share its inode)
