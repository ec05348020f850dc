"""Protects the fixes of issue 23, "Reliability III": every bad input below ends in one line on
stderr and exit code 2, or a counted skip with a warning, or a clean recovery; never a traceback,
a hang, a silent wrong result or lost work.

| input | how it is handled |
|---|---|
| 4 processes start on one run folder at once (free, or with a stale lock), 20 times | exactly one gets the lock |
| RUN/.lock a folder, a link, a pipe | exit 2: not a lock file ...; remove it; it is kept |
| RUN/.lock holding garbage, nothing, -1, 0, a pid beyond pid_max, bytes | taken at once (the OS lock decides, not the text) |
| the lock's holder killed with SIGKILL | the next start takes the lock at once (the OS dropped it) |
| out_dir under a file / through a dangling link / a link loop; RUN a dangling link | exit 2: cannot use PATH: why |
| RUN/metrics.jsonl a folder | exit 2: cannot use PATH: Is a directory |
| an HTTP critic that never answers, with many retries | None after at most 3 × critic_timeout |
| an HTTP critic that fails, with a huge backoff | the waits are capped (MAX_BACKOFF, the deadline) |
| an HTTP critic reply over max_reply_bytes (declared or streamed) | counted failed critique, one attempt, a warning |
| SIGTERM / Ctrl-C while a request hangs or while it backs off | Stopped at once |
| SIGTERM to training while the critic hangs | stops in ~1 s with the last finished step's checkpoint |
| SIGINT to the trainer while its eval.py runs; SIGTERM to common.run_child's caller | passed on to the child; the parent waits for it; one line |
| Ctrl-C during `eval.py RUN` | exit 130, one line, no traceback |
| a checkpoint whose adapter holds NaN | eval skips it with a warning; resume moves it aside; analyze.py: one line |
| lora_alpha=0, lora_alpha=-4, critic_retries=11 | exit 2 before anything is written |
| a gold answer that is a JSON list, object, bool or decimal | exit 2 naming FILE:LINE (integers, strings accepted) |

The lock race runs RunLock's own source (read from runfolder.py, with filelock) in small processes that do
not import torch; the eval-child test is the only one that starts the trainer as a real process (~20 s)."""
import ast
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from plumbing import common
import critic
import eval as ev
from plumbing import runfolder
from plumbing.common import UserError
from conftest import one_line_error, run_main, run_settings, trip
from test_reliability import HOLDER, os_lock_held

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
settings = functools.partial(run_settings, max_new_tokens=6, max_steps=2, lr=0.05)


# ---------------------------------------------------------------------------------------------
# 1. The run lock

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


def wait_for(paths, seconds=60):
    deadline = time.time() + seconds
    while not all(os.path.exists(p) for p in paths):
        assert time.time() < deadline, "a starter did not report"
        time.sleep(0.005)


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


@pytest.mark.parametrize("kind", ["garbage", "empty", "minus one", "zero", "beyond pid_max", "binary"])
def test_a_lock_files_text_does_not_decide(kind, tmp_path):
    """The OS lock decides who writes; the text is only the pid for the message: any text is replaced."""
    make_lock(str(tmp_path / ".lock"), kind)
    lock = runfolder.RunLock(str(tmp_path), "training")
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()


def test_an_unusable_lock_stops_training_with_one_line(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    (tmp_path / "r" / ".lock").mkdir(parents=True)
    trip(monkeypatch, common, "load_model")
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + ["--run", "r"], capsys)
    one_line_error(code, err, "is not a lock file this program wrote (a folder)")


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


# ---------------------------------------------------------------------------------------------
# 2. Run and output paths


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


@pytest.mark.parametrize("kind", ["out_dir under a file", "run a dangling link", "out_dir a link loop",
                                  "out_dir through a dangling link"])
def test_run_paths_that_cannot_be_used_are_one_line(kind, tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    extra, strerror = path_case(kind, tmp_path)
    trip(monkeypatch, common, "load_model")
    argv = [word for word in settings(tiny_model_dir, data, tmp_path) if not word.startswith("out_dir=")]
    code, _, err = run_main(argv + extra + ["--run", "r"], capsys)  # its out_dir in place of the default's
    one_line_error(code, err, f"error: cannot use {tmp_path}")
    assert strerror in err


def test_a_log_that_is_a_folder_is_one_line(tiny_model_dir, data, tmp_path, capsys):
    (tmp_path / "r" / "metrics.jsonl").mkdir(parents=True)
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path, max_steps=1) + ["--run", "r"], capsys)
    one_line_error(code, err, f"cannot use {tmp_path / 'r' / 'metrics.jsonl'}: Is a directory")


# ---------------------------------------------------------------------------------------------
# 3. The HTTP critic


class Server:
    """A loopback OpenAI-compatible critic: the first `good` POSTs get a critique, the rest `mode`:
    hang (no answer until the test ends) | 500 | huge (declared length) | stream (huge, no length)."""

    def __init__(self, mode, good=0):
        self.mode, self.good, self.posts, self.release = mode, good, 0, threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body, length=True):
                try:
                    self.send_response(code)
                    if length:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up
                    pass

            def do_GET(self):
                self.reply(200, json.dumps({"data": [{"id": "critic-model"}]}).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                server.posts += 1
                critique = "<step_1> 1+1=2 <answer> 2"
                if server.posts > server.good:
                    if server.mode == "hang":
                        server.release.wait()
                        return
                    if server.mode == "500":
                        return self.reply(500, b"{}")
                    critique = "x" * 100_000
                body = json.dumps({"choices": [{"message": {"content": critique}}]}).encode()
                self.reply(200, body, length=server.mode != "stream")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    common.STOPPING.clear()
    servers = []
    yield lambda mode, good=0: servers.append(Server(mode, good)) or servers[-1]
    common.STOPPING.clear()
    for server in servers:
        server.close()


ARGS = (["1+1"], ["<step_1> 1+1=3 <answer> 3"], ["<step_1> 1+1=2 <answer> 2"], ["2"])


def timed(fn):
    start = time.monotonic()
    return fn(), time.monotonic() - start


def test_retries_of_a_silent_critic_end_at_the_deadline(serve):
    """A server that never answers, 10 retries: one critique gets DEADLINE_TIMEOUTS × timeout in all."""
    server = serve("hang")
    http = critic.HTTPCritic(server.url, "critic-model", timeout=0.3, retries=10, backoff=0.01)
    result, seconds = timed(lambda: http(*ARGS))
    assert result == [critic.Failure("critic_error")] and seconds < critic.DEADLINE_TIMEOUTS * 0.3 + 1.0
    assert server.posts < 11


@pytest.mark.parametrize("cap", ["deadline", "MAX_BACKOFF"])
def test_the_backoff_is_capped(cap, serve, monkeypatch):
    """backoff=1000 s after a 500: the waits end at the deadline, or at MAX_BACKOFF under a long deadline."""
    server = serve("500")
    timeout = 0.3 if cap == "deadline" else 60
    if cap == "MAX_BACKOFF":
        monkeypatch.setattr(critic, "MAX_BACKOFF", 0.1)
    http = critic.HTTPCritic(server.url, "critic-model", timeout=timeout, retries=3, backoff=1000)
    result, seconds = timed(lambda: http(*ARGS))
    assert result == [critic.Failure("critic_error")] and seconds < 2.5
    assert server.posts == (4 if cap == "MAX_BACKOFF" else 1)


@pytest.mark.parametrize("mode", ["huge", "stream"])
def test_a_reply_over_the_size_cap_is_a_counted_failure(mode, serve, caplog):
    """A 100 kB reply with a 10 kB cap, its length declared or not: None, one attempt, a warning."""
    server = serve(mode)
    http = critic.HTTPCritic(server.url, "critic-model", timeout=5, retries=3, max_reply_bytes=10_000)
    with caplog.at_level(logging.WARNING, logger="critic"):
        assert http(*ARGS) == [critic.Failure("critic_error")]
    assert server.posts == 1
    assert any("over the 10000" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["hang", "500"])
def test_a_stop_abandons_a_hanging_request_or_a_backoff(mode, serve):
    """STOPPING (set by the training's signal handler) ends the call at once, with Stopped."""
    server = serve(mode)
    http = critic.HTTPCritic(server.url, "critic-model", timeout=30, retries=3, backoff=100)
    threading.Timer(0.3, common.STOPPING.set).start()
    start = time.monotonic()
    with pytest.raises(critic.Stopped):
        http(*(column * 3 for column in ARGS))
    assert time.monotonic() - start < 1.5


def test_sigterm_while_the_critic_hangs_stops_training_with_a_checkpoint(serve, tiny_model_dir, data, tmp_path,
                                                                          capsys):
    """Step 1's critiques arrive, step 2's never do: SIGTERM then stops the run in about a second
    (critic_timeout is 20 s), step 2 dropped and step 1 checkpointed, so a resume loses nothing."""
    server = serve("hang", good=4)  # batch_size 4, one rollout each: step 1 is answered
    argv = ["--context", "critique", "--run", "c", *settings(
        tiny_model_dir, data, tmp_path, max_steps=3, critic="http", critic_url=server.url,
        critic_model="critic-model", critic_timeout=20, critic_retries=1)]
    sent = {}

    def terminate_when_step_2_waits():
        while server.posts < 5:
            time.sleep(0.01)
        time.sleep(0.2)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_step_2_waits, daemon=True).start()
    code, out, err = run_main(argv, capsys)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert time.monotonic() - sent["at"] < 5
    assert "stopped by signal 15 after step 1; checkpoint saved" in out
    run_dir = tmp_path / "c"
    assert [os.path.basename(p) for p in runfolder.checkpoint_dirs(str(run_dir))] == ["step_000001"]
    assert [r["step"] for r in runfolder.read_jsonl(str(run_dir / "metrics.jsonl"))] == [1]


# ---------------------------------------------------------------------------------------------
# 4. Signals and the eval child


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


def test_ctrl_c_during_evaluation_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "evaluate_run", interrupted)
    code, _, err = run_main([str(tmp_path)], capsys, script=ev)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == ["stopped by Ctrl-C; finished work is kept (checkpoints, eval.jsonl rows): "
                                        "rerun the same command to continue"]


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


# ---------------------------------------------------------------------------------------------
# 5. Adapters with NaN or inf


def poison_adapter(checkpoint):
    from safetensors.torch import load_file, save_file
    path = os.path.join(checkpoint, "adapter_model.safetensors")
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})


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
# 6. Config and data


@pytest.mark.parametrize("override, fragment", [
    ("lora_alpha=0", "'lora_alpha' must be at least 1"),
    ("lora_alpha=-4", "'lora_alpha' must lie in 0.."),
    ("critic_retries=11", "'critic_retries' must lie in 0..10"),
])
def test_settings_that_would_never_learn_or_wait_too_long(override, fragment, tiny_model_dir, data, tmp_path,
                                                          capsys):
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + [override], capsys)
    one_line_error(code, err, fragment)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("answer, kind", [([1, 2], "a list"), ({"value": 3}, "an object"), (True, "true/false"),
                                          (0.5, "a decimal number")])
def test_a_gold_answer_that_is_not_text_or_an_integer(answer, kind, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n"
                    + json.dumps({"question": "2+2", "answer": answer}) + "\n")
    with pytest.raises(UserError) as e:
        common.load_jsonl(str(path), normalize=critic.normalize_answer)
    assert str(e.value).startswith(f"{path}:2: 'answer' is {kind} (") and "\n" not in str(e.value)


def test_integer_and_string_answers_stay_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": "q", "answer": a}) + "\n" for a in (7, -3, "7", "\\frac{1}{2}")))
    assert [r["answer"] for r in common.load_jsonl(str(path), normalize=critic.normalize_answer)] == \
        ["7", "-3", "7", "\\frac{1}{2}"]


def test_a_list_answer_stops_training_with_one_line(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1+1", "answer": [2]}) + "\n")
    code, _, err = run_main(settings(tiny_model_dir, str(path), tmp_path / "out"), capsys)
    one_line_error(code, err, f"{path}:1: 'answer' is a list ([2])")
