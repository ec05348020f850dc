"""An HTTP critic (critic.HTTPCritic) that misbehaves, at the start of a run and during it: a server
that refuses the API key (at start, or in mid-run) or does not serve critic_model is one `error:`
line; critiques that time out, answer HTTP 400, are not JSON or have no step tags are counted in
train/critique_invalid and the run goes on. Retries of a silent critic end at the deadline
(DEADLINE_TIMEOUTS x critic_timeout), the backoff is capped (MAX_BACKOFF, the deadline), a reply over
max_reply_bytes (declared or streamed) is one counted failure after one attempt, a stop (SIGTERM,
Ctrl-C) abandons a hanging request or a backoff at once, and SIGTERM while the critic hangs stops
training in about a second with the last finished step's checkpoint.

Two loopback servers: conftest's `critic_server` (the failures a test switches on) and `Server`
below (hangs, 500s, huge replies)."""
import functools
import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import critic
from plumbing import common
from plumbing import runfolder
from conftest import error_line, run_main, run_settings, timed

settings = functools.partial(run_settings, max_new_tokens=6, max_steps=1)


# ---------------------------------------------------------------------------------------------
# At the start and in mid-run: refusals are one line, failed critiques are counted


def http_settings(server, model_dir, data, out_dir, **extra):
    values = dict(critic="http", critic_url=server.url, critic_model="critic-model",
                  critic_api_key_env="CRITIC_KEY_FOR_TESTS", critic_timeout=0.5, critic_retries=0)
    return settings(model_dir, data, out_dir, **{**values, **extra})


@pytest.mark.bad_input
@pytest.mark.parametrize("code", ["401", "403"])
def test_critic_refusing_the_key_at_start(code, critic_server, tiny_model_dir, data, tmp_path, capsys):
    critic_server.models = code
    line = error_line(["--context", "critique", *http_settings(critic_server, tiny_model_dir, data,
                                                                   tmp_path)], capsys)
    assert line == (f"error: critic at {critic_server.url} refused the API key in $CRITIC_KEY_FOR_TESTS "
                    f"(HTTP {code})")


@pytest.mark.bad_input
def test_critic_that_does_not_serve_the_model(critic_server, tiny_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "critique", *http_settings(
        critic_server, tiny_model_dir, data, tmp_path, critic_model="Qwen/QwQ-32B")], capsys)
    assert line == f"error: critic at {critic_server.url} does not serve 'Qwen/QwQ-32B' (it serves critic-model)"


@pytest.mark.bad_input
@pytest.mark.parametrize("replies, logged", [
    ("slow", True), ("400", True), ("not_json", True), ("no_step_tags", False)])
def test_failed_critiques_are_counted_and_the_run_goes_on(replies, logged, critic_server, tiny_model_dir,
                                                         data, tmp_path, capsys, caplog):
    critic_server.replies = replies
    code, out, err = run_main(["--context", "critique", "--run", "c", *http_settings(
        critic_server, tiny_model_dir, data, tmp_path, max_steps=2)], capsys)
    assert code == 0 and "Traceback" not in err, err[-2000:]
    run_dir = tmp_path / "c"
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/critique_invalid"] for m in metrics] == [4, 4]  # every sample of both steps
    assert [m["train/zero_signal"] for m in metrics] == [1.0, 1.0]
    assert "invalid 4" in out
    samples = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and not any(s["valid"] for s in samples)
    assert (run_dir / "checkpoints" / "step_000002").is_dir()
    failures = [r for r in caplog.records if "critic request failed" in r.getMessage()]
    assert len(failures) == (8 if logged else 0)


@pytest.mark.bad_input
def test_critic_refusing_the_key_in_mid_run_stops(critic_server, tiny_model_dir, data, tmp_path, capsys):
    critic_server.models = "404"  # no /models listing: the start-up check cannot see the refusal
    critic_server.replies = "401"
    line = error_line(["--context", "critique", "--run", "c", *http_settings(
        critic_server, tiny_model_dir, data, tmp_path, max_steps=2)], capsys)
    assert "refused the API key in $CRITIC_KEY_FOR_TESTS (HTTP 401)" in line


# ---------------------------------------------------------------------------------------------
# Deadlines, backoff, reply size and stops


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


@pytest.mark.bad_input
def test_retries_of_a_silent_critic_end_at_the_deadline(serve):
    """A server that never answers, 10 retries: one critique gets DEADLINE_TIMEOUTS × timeout in all."""
    server = serve("hang")
    http = critic.HTTPCritic(server.url, "critic-model", timeout=0.3, retries=10, backoff=0.01)
    result, seconds = timed(lambda: http(*ARGS))
    assert result == [critic.Failure("critic_error")] and seconds < critic.DEADLINE_TIMEOUTS * 0.3 + 1.0
    assert server.posts < 11


@pytest.mark.bad_input
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


@pytest.mark.bad_input
@pytest.mark.parametrize("mode", ["huge", "stream"])
def test_a_reply_over_the_size_cap_is_a_counted_failure(mode, serve, caplog):
    """A 100 kB reply with a 10 kB cap, its length declared or not: None, one attempt, a warning."""
    server = serve(mode)
    http = critic.HTTPCritic(server.url, "critic-model", timeout=5, retries=3, max_reply_bytes=10_000)
    with caplog.at_level(logging.WARNING, logger="critic"):
        assert http(*ARGS) == [critic.Failure("critic_error")]
    assert server.posts == 1
    assert any("over the 10000" in r.getMessage() for r in caplog.records)


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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
