"""The real server path (issue 28): the shipped toy world's learned critic served by `transformers
serve` (the OpenAI-compatible API that `vllm serve` speaks) on 127.0.0.1, and `critic=http`
training against it. Protects: that critic.HTTPCritic talks to a real server (its /v1/models
check, its requests, its reply parsing), that the served critic writes exactly the critiques
critic=hf writes for the same prompts (both greedy, the same toy critic prompt), and that a
missing serving extra, a wrong model name or a server that is down is one line, not a traceback.

The server is started on a free port, waited for at most SERVER_START seconds and always stopped
(its whole process group), pass or fail. Skipped only when the serving extra is not installed.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import ROOT, run_main

from toyworld import toy_critic

SERVER_START = 120  # seconds: `transformers serve` answered /health within ~25 s on our 2 cores
STRONG = os.path.join(ROOT, "toyworld", "toy_world", "critics", "strong")


def serving_installed():
    try:
        toy_critic.check_serving()
        return True
    except Exception:
        return False


needs_serving = pytest.mark.skipif(not serving_installed(), reason="the serving extra is not installed: "
                                   + toy_critic.SERVING_EXTRA)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(path, log_path):
    """`transformers serve path` on a free port until the block ends; yields the base URL."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(toy_critic.serve_command(path, port), stdout=log, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            assert server.poll() is None, "the server exited: " + open(log_path).read()[-2000:]
            assert time.monotonic() < deadline, f"no /health in {SERVER_START} s: " + open(log_path).read()[-2000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@needs_serving
def test_training_through_transformers_serve_writes_the_hf_critics_critiques(tmp_path, capsys):
    """Two critique steps against the served strong critic; every critique logged equals critic=hf's
    on the same (question, attempt), and the server lists the critic under the name trained with."""
    import critic
    with served(STRONG, tmp_path / "server.log") as url:
        with urllib.request.urlopen(url + "/models", timeout=10) as reply:
            assert STRONG in [m["id"] for m in json.load(reply)["data"]]
        args = ["--context", "critique", "model=toy", "critic=http", f"critic_url={url}", f"critic_model={STRONG}",
                "max_steps=2", "batch_size=8", "micro_batch=8", "sample_every=1", "eval_at_end=false",
                "threads=1", f"out_dir={tmp_path}", "run=served"]
        start = time.monotonic()
        code, out, err = run_main(args, capsys)
        seconds = time.monotonic() - start
        assert code in (0, None), err
        # a name the server does not answer for is one line (HTTPCritic.check reads /v1/models)
        code, _, err = run_main(args[:5] + ["critic_model=strong"] + args[6:-1] + ["run=wrong-name"], capsys)
        assert code == 2 and "does not serve 'strong'" in err and "Traceback" not in err
    samples = [json.loads(line) for line in open(tmp_path / "served" / "samples.jsonl")]
    assert len(samples) == 16 and {s["step"] for s in samples} == {1, 2}
    answers = {json.loads(line)["question"]: json.loads(line)["answer"]
               for line in open(os.path.join(ROOT, "toyworld", "toy_world", "train.jsonl"))}
    local = critic.HFCritic(STRONG, max_new_tokens=128, prompts="toy")
    expected = local([s["question"] for s in samples], [s["response"] for s in samples],
                     [""] * len(samples), [answers[s["question"]] for s in samples])
    assert [s["context"] for s in samples] == expected
    assert sum(s["valid"] for s in samples) >= 12  # the strong critic: most critiques pass validation
    metrics = [json.loads(line) for line in open(tmp_path / "served" / "metrics.jsonl")]
    assert all(m["time/critic"] > 0 for m in metrics)
    print(f"two steps through transformers serve: {seconds:.1f} s")


def test_without_the_serving_extra_serving_is_one_line(monkeypatch, capsys):
    """`python -m toyworld.toy_critic serve strong` without FastAPI/uvicorn names the pip command."""
    monkeypatch.setitem(__import__("sys").modules, "fastapi", None)  # import fastapi now fails
    from plumbing import common
    with pytest.raises(SystemExit) as stop, common.user_errors():
        toy_critic.command_line(["serve", "strong"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and toy_critic.SERVING_EXTRA in err and len(err.strip().splitlines()) == 1


def test_a_server_that_is_down_is_one_line(tmp_path, capsys):
    """critic=http at a port nothing listens on: one line naming the address, before any step."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, _, err = run_main(["--context", "critique", "model=toy", "critic=http", f"critic_url={url}",
                             f"critic_model={STRONG}", "max_steps=1", "eval_at_end=false", "threads=1",
                             f"out_dir={tmp_path}"], capsys)
    assert code == 2 and "unreachable" in err and url in err and "Traceback" not in err
