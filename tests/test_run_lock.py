"""One writer per run folder: RunLock takes an OS lock (filelock: flock) on RUN/.lock and writes its
pid there for the message others get. A live holder refuses a second writer ("in use by process N")
before anything is written; a stale lock file (its writer gone, or killed with SIGKILL) is taken at
once; of 4 processes that start on one run at the same moment exactly one gets the lock (20 rounds,
half of them over a stale lock); any text in the lock file is replaced (the OS lock decides, not the
text); a RUN/.lock that is no plain file (a folder, a dangling link, a pipe) is one `error:` line and
left in place; evaluation takes the lock too.

The race runs RunLock's own source (read from runfolder.py, with filelock) in small processes that
do not import torch."""
import functools
import os
import subprocess
import sys
import time

import pytest
import yaml

import eval as ev
import selfdistill
from plumbing import common
from plumbing import runfolder
from plumbing.common import UserError
from conftest import one_line_error, os_lock_held, run_main, run_settings, trip, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
settings = functools.partial(run_settings, max_new_tokens=6, max_steps=2, lr=0.05)


# ---------------------------------------------------------------------------------------------
# A live lock refuses, a stale one is taken over


HOLDER = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)  # the OS lock RunLock takes (filelock: flock)
os.write(fd, f"{os.getpid()}\\n".encode())
open(sys.argv[2], "w").close()
time.sleep(60)"""


@pytest.mark.bad_input
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


@pytest.mark.bad_input
def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / ".lock").write_text(f"{gone.pid}\n")
    lock = runfolder.RunLock(str(tmp_path), "training")
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert str(tmp_path / ".lock") not in runfolder.HELD and not os_lock_held(tmp_path / ".lock")


@pytest.mark.bad_input
def test_the_lock_of_a_killed_holder_is_taken_at_once(tmp_path):
    """SIGKILL leaves RUN/.lock with the dead holder's pid; the OS has dropped its lock, so the next
    start takes it without any takeover."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".lock"), str(tmp_path / "ready")])
    wait_for([str(tmp_path / "ready")])
    with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
        runfolder.RunLock(str(tmp_path), "training")
    holder.kill()
    holder.wait()
    assert (tmp_path / ".lock").read_text() == f"{holder.pid}\n"
    start = time.time()
    lock = runfolder.RunLock(str(tmp_path), "training")
    assert time.time() - start < 1 and (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()


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
# Simultaneous starters


# A starter process: RunLock and its helpers exec'd from runfolder.py's source, UserError from
# common.py's (importing them
# would import torch, ~7 s a process), started on a go-file so that all four try at the same time.
# Every file operation they make waits 0-2 ms before and after: the windows between two of them,
# microseconds in real runs, become wide enough for a race to show in 20 rounds.
STARTER = r"""
import ast, atexit, builtins, contextlib, errno, os, random, re, stat, sys, time, types
run_dir, go, result, done, source = sys.argv[1:]
wanted = {"UserError", "HELD", "RunLock", "write_pid", "check_lock_file", "lock_holder", "alive"}
trees = [ast.parse(open(path).read()) for path in source.split(os.pathsep)]  # runfolder.py, common.py
named = lambda n: getattr(n, "name", None) or next((t.id for t in getattr(n, "targets", []) if hasattr(t, "id")), None)
code = ast.Module([n for tree in trees for n in tree.body if named(n) in wanted], [])

def jitter(call):
    def slowed(*args, **kwargs):
        time.sleep(random.random() * 0.002)
        try:
            return call(*args, **kwargs)
        finally:
            time.sleep(random.random() * 0.002)
    return slowed

slow_os = types.SimpleNamespace(**vars(os))
for name in ("open", "write", "close", "link", "replace", "rename", "remove", "lstat", "kill"):
    setattr(slow_os, name, jitter(getattr(os, name)))
space = {m.__name__: m for m in (atexit, contextlib, errno, re, stat, sys, time)}
space.update(os=slow_os, open=jitter(builtins.open))
exec(compile(code, source, "exec"), space)
open(result + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
try:
    space["RunLock"](run_dir, "testing")
    outcome = "ok"
except space["UserError"] as e:
    outcome = str(e)
with open(result + ".tmp", "w") as f:
    f.write(outcome)
os.replace(result + ".tmp", result)
while not os.path.exists(done):  # hold the lock until every starter has tried
    time.sleep(0.005)
"""


def pid_max():
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 ** 22


def dead_pid():
    pid = pid_max() - 1
    while runfolder.alive(pid):
        pid -= 1
    return pid


@pytest.mark.bad_input
def test_four_simultaneous_starters_one_lock(tmp_path):
    """Of 4 processes that take one run's lock at the same moment, exactly one gets it, 20 times over;
    in odd rounds the folder holds a stale lock that all four try to take over."""
    stale = dead_pid()
    for round_ in range(20):
        run_dir = tmp_path / f"run{round_}"
        run_dir.mkdir()
        if round_ % 2:
            (run_dir / ".lock").write_text(f"{stale}\n")
        go, done = str(tmp_path / f"go{round_}"), str(tmp_path / f"done{round_}")
        results = [str(tmp_path / f"result{round_}_{k}") for k in range(4)]
        starters = [subprocess.Popen([sys.executable, "-c", STARTER, str(run_dir), go, r, done,
                                      os.pathsep.join(os.path.join(ROOT, "plumbing", f) for f in ("runfolder.py", "common.py"))])
                    for r in results]
        wait_for([r + ".ready" for r in results])
        open(go, "w").close()
        wait_for(results)
        outcomes = [open(r).read() for r in results]
        open(done, "w").close()
        assert [s.wait(timeout=60) for s in starters] == [0] * 4
        winners = [k for k, outcome in enumerate(outcomes) if outcome == "ok"]
        assert len(winners) == 1, (round_, outcomes)
        assert all(f"in use by process {starters[winners[0]].pid}" in outcome
                   for k, outcome in enumerate(outcomes) if k != winners[0]), outcomes
        assert os.listdir(run_dir) == [".lock"]  # no temporary file left; the lock file stays, released


# ---------------------------------------------------------------------------------------------
# Lock files that are odd


def make_lock(path, kind):
    if kind == "folder":
        os.mkdir(path)
    elif kind == "dangling link":
        os.symlink(path + ".missing", path)
    elif kind == "pipe":
        os.mkfifo(path)  # reading it would block forever
    else:
        text = {"garbage": "hello\n", "empty": "", "minus one": "-1\n", "zero": "0\n",
                "beyond pid_max": f"{pid_max() + 1}\n", "binary": "\udcff\udcfe"}[kind]
        with open(path, "w", errors="surrogateescape") as f:
            f.write(text)


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["folder", "dangling link", "pipe"])
def test_a_lock_that_is_not_a_file_is_reported_not_removed(kind, tmp_path):
    """A RUN/.lock that is no plain file was not made by us: a one-line error at once, left in place."""
    path = str(tmp_path / ".lock")
    make_lock(path, kind)
    start = time.time()
    with pytest.raises(UserError) as e:
        runfolder.RunLock(str(tmp_path), "training")
    assert time.time() - start < 1
    assert "is not a lock file" in str(e.value) and "remove it if no process uses the run" in str(e.value)
    assert "\n" not in str(e.value) and os.path.lexists(path)


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["garbage", "empty", "minus one", "zero", "beyond pid_max", "binary"])
def test_a_lock_files_text_does_not_decide(kind, tmp_path):
    """The OS lock decides who writes; the text is only the pid for the message: any text is replaced."""
    make_lock(str(tmp_path / ".lock"), kind)
    lock = runfolder.RunLock(str(tmp_path), "training")
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()


@pytest.mark.bad_input
def test_an_unusable_lock_stops_training_with_one_line(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    (tmp_path / "r" / ".lock").mkdir(parents=True)
    trip(monkeypatch, common, "load_model")
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + ["--run", "r"], capsys)
    one_line_error(code, err, "is not a lock file this program wrote (a folder)")
