"""Protects against careless or hostile input (issue "Reliability II"): every number finite and in
range; one writer per run folder (an OS lock; the file holds the writer's pid for the error others get); a run
folder read as data, never code (trust_remote_code only from the command line); damaged state that
recovers or explains itself (a truncated JSONL line, a damaged newest checkpoint, stray names under
checkpoints/); and one-line errors, never a traceback, for the user mistakes listed in the issue.
The last tests kill a real run in the middle of an append and of its end-of-run evaluation and
check that resuming ends with the same results as a run that was never interrupted."""
import errno
import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from plumbing import common
import compare
import eval as ev
from plumbing import runfolder
import selfdistill
from toyworld import toy_build
from plumbing.common import UserError
from conftest import one_line_error, run_main, run_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
settings = functools.partial(run_settings, max_new_tokens=6, max_steps=2, lr=0.05)


# ---------------------------------------------------------------------------------------------
# 1. Every number finite and in range


@pytest.mark.parametrize("override, fragment", [
    ("grad_clip=nan", "'grad_clip' must be a finite number"),
    ("lr=inf", "'lr' must be a finite number"),
    ("temperature=-inf", "'temperature' must be a finite number"),
    ("ema_rate=nan", "'ema_rate' must be a finite number"),
    ("seed=-1", "'seed' must lie in 0.."),
    ("max_steps=99999999999", "'max_steps' must lie in 0.."),
    ("token_clip=-1", "'token_clip' must be at least 0"),
    ("critic_timeout=0", "'critic_timeout' must be positive"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(override, fragment, tiny_model_dir, data, tmp_path, capsys):
    key, value = override.split("=", 1)  # in place of the setting's default (a key twice is an error)
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path, **{key: value}), capsys)
    one_line_error(code, err, fragment)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_yaml_infinity_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lr: .inf\n")
    code, _, err = run_main(["--config", str(path)], capsys)
    one_line_error(code, err, "'lr' must be a finite number")


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


# ---------------------------------------------------------------------------------------------
# 2. One writer per run folder


HOLDER = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)  # the OS lock RunLock takes (filelock: flock)
os.write(fd, f"{os.getpid()}\\n".encode())
open(sys.argv[2], "w").close()
time.sleep(60)"""


def test_a_live_lock_refuses_a_second_writer(tmp_path, tiny_model_dir, data, capsys):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / ".lock"), str(tmp_path / "ready")])
    try:
        while not (tmp_path / "ready").exists():
            assert holder.poll() is None
            time.sleep(0.01)
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            runfolder.RunLock(str(run_dir), "training")
        code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + ["--run", "busy"], capsys)
        one_line_error(code, err, f"in use by process {holder.pid}")
        assert not (run_dir / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / ".lock").write_text(f"{gone.pid}\n")
    lock = runfolder.RunLock(str(tmp_path), "training")
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert str(tmp_path / ".lock") not in runfolder.HELD and not os_lock_held(tmp_path / ".lock")


def os_lock_held(path):
    """True when some process holds the OS lock on `path` (flock, as filelock takes it)."""
    import fcntl
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_evaluation_takes_the_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    yaml.safe_dump(vars(selfdistill.resolve(selfdistill.Config(run="r", out_dir=str(tmp_path)))),
                   open(run_dir / "config.yaml", "w"))
    seen = {}
    monkeypatch.setattr(ev, "evaluate_steps", lambda *a, **k: seen.setdefault("lock", (run_dir / ".lock").read_text()))
    ev.evaluate_run(str(run_dir))
    assert seen["lock"].strip() == str(os.getpid()) and not os_lock_held(run_dir / ".lock")


# ---------------------------------------------------------------------------------------------
# 3. A run folder is data, not code


def write_config(run_dir, **values):
    run_dir.mkdir(exist_ok=True)
    config = {**vars(selfdistill.resolve(selfdistill.Config(run=run_dir.name))), **values}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return str(run_dir)


def test_trust_remote_code_is_never_read_from_a_run_folder(tmp_path):
    run_dir = write_config(tmp_path / "theirs", trust_remote_code=True, model="their/model")
    assert ev.load_run_config(run_dir).trust_remote_code is False
    assert ev.load_run_config(run_dir, trust_remote_code=True).trust_remote_code is True  # our CLI


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
# 4. Damaged state recovers or explains itself


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


def test_stray_names_under_checkpoints_are_ignored(tmp_path):
    for name in ("step_000002", "step_000001.bak", ".tmp_step_000003", "step_7", "step_000005.damaged"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000004").write_text("a file, not a folder")
    (tmp_path / "checkpoints" / "notes.txt").write_text("")
    assert [os.path.basename(p) for p in runfolder.checkpoint_dirs(str(tmp_path))] == ["step_000002"]


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


# ---------------------------------------------------------------------------------------------
# 5. No traceback for a user mistake


@pytest.mark.parametrize("run, fragment", [("../escape", "plain folder name"), ("/abs/path", "plain folder name"),
                                           (".", "plain folder name"), ("a/b", "plain folder name")])
def test_run_names_that_are_not_plain_folders(run, fragment, tiny_model_dir, data, tmp_path, capsys):
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + ["--run", run], capsys)
    one_line_error(code, err, fragment)


def test_a_pasted_api_key_is_refused_and_never_shown(tiny_model_dir, data, tmp_path, capsys):
    secret = "sk-proj-abc123SECRET"
    code, out, err = run_main(settings(tiny_model_dir, data, tmp_path) + [f"critic_api_key_env={secret}"], capsys)
    one_line_error(code, err, "NAME of an environment variable")
    assert secret not in out + err and not any(tmp_path.iterdir())


def test_a_run_folder_that_is_a_file(tiny_model_dir, data, tmp_path, capsys):
    (tmp_path / "r").write_text("not a folder")
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + ["--run", "r"], capsys)
    one_line_error(code, err, "is not a folder")


def test_a_config_file_in_another_encoding(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes("lr: 0.001  # réglé\n".encode("latin-1"))
    code, _, err = run_main(["--config", str(path)], capsys)
    one_line_error(code, err, "is not UTF-8 text")


def test_a_question_longer_than_the_context(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"question": "1+" * 600 + "1", "answer": "601"}) + "\n")
    code, _, err = run_main(settings(tiny_model_dir, str(data), tmp_path), capsys)
    one_line_error(code, err, "do not fit the model's context")


def test_own_data_with_the_rule_critic(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "words.jsonl"
    data.write_text(json.dumps({"question": "What is two plus two?", "answer": "4"}) + "\n")
    code, _, err = run_main(settings(tiny_model_dir, str(data), tmp_path) + ["--context", "critique"], capsys)
    one_line_error(code, err, "critic=rule critiques toy arithmetic chains only")


@pytest.mark.parametrize("code_, text", [(errno.ENOSPC, "No space left on device"),
                                         (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")])
def test_a_full_or_read_only_disk_is_one_line(code_, text, tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(code_, text, str(tmp_path / "r" / "config.yaml.tmp"))
    monkeypatch.setattr(runfolder, "write_atomic", refuse)
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + ["--run", "r"], capsys)
    one_line_error(code, err, text)


def test_a_missing_toy_world_says_it_is_built_and_how_long(tmp_path, capsys):
    settings_ = toy_build.BuildSettings(steps=2, n_train=2, n_test=1, n_transfer=1, samples=2, max_correct=2, score_batch=8)
    toy_build.ensure_built(str(tmp_path / "world"), progress=True, settings=settings_)
    assert "toy world is missing" in capsys.readouterr().err
    toy_build.ensure_built(str(tmp_path / "world"), progress=True, settings=settings_)
    assert "missing" not in capsys.readouterr().err  # complete now: said once, built once


def test_compare_refuses_runs_evaluated_differently(tmp_path, capsys):
    for name, n in (("a", 12), ("b", 4)):
        run_dir = write_config(tmp_path / name)
        for step in (0, 1):  # the base and a checkpoint (a run at step 0 only is refused for that)
            row = {"step": step, "n": n, "k": n, "questions": 10, "temperature": 1.0,
                   **{m: 0.5 for m in ev.METRICS}, "ci": {m: [0.4, 0.6] for m in ev.METRICS}}
            runfolder.append_jsonl(os.path.join(run_dir, "eval.jsonl"), row)
    code, _, err = run_main([str(tmp_path / "a"), str(tmp_path / "b")], capsys, script=compare)
    one_line_error(code, err, "evaluated with other settings")


# ---------------------------------------------------------------------------------------------
# 6. Kills during an append and during the end-of-run evaluation


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
