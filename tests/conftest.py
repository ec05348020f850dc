"""Test kit: a tiny causal LM and a character tokenizer with a chat template, built offline.

Nothing is downloaded: the tokenizer is made with the `tokenizers` library, the model from a
LlamaConfig with random weights; both are saved and loaded back through the Auto classes, the
same path a user's model folder takes. `critic_server` is a local OpenAI-compatible critic whose
failures (slow, refusing the key, garbage) a test switches on."""
import json
import os
import random
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting

SPECIALS = ["<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
ALPHABET = [chr(c) for c in range(32, 127)] + ["\n"]

# ChatML with a Qwen3-style thinking switch: with enable_thinking false the generation prompt
# ends in an empty think block.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def make_char_tokenizer(chat_template=CHAT_TEMPLATE):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", unk_token="<|unk|>",
                                  eos_token="<|im_end|>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def make_tiny_model(tokenizer, hidden=32, layers=2, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


def save_tiny(path, chat_template=CHAT_TEMPLATE):
    tok = make_char_tokenizer(chat_template)
    model = make_tiny_model(tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_settings(model_dir, data, out_dir, **extra):
    """key=value arguments of a short run on a tiny model: 4 questions a step, no evaluation, one
    thread (on a small shared machine two OpenMP threads can make a tiny step 50x slower)."""
    values = dict(model=model_dir, train_file=data, test_file=data, out_dir=str(out_dir), threads=1,
                  prompts="instruct", batch_size=4, micro_batch=4, eval_at_end=False)
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_main(argv, capsys, script=None):
    """script.main(argv) in-process (selfdistill by default): (exit code, stdout, stderr)."""
    import selfdistill
    code = 0
    try:
        (script or selfdistill).main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, fragment=""):
    """A mistake's ending: exit code 2, no traceback, exactly one `error:` line (containing
    `fragment`) on stderr."""
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and fragment in err, err[-2000:]
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err[-2000:]


class Tripwire(Exception):
    """Raised by a replaced function: the program got further than it should have."""


def trip(monkeypatch, owner, name):
    """Replace owner.name by a function that raises Tripwire: reaching it fails the test."""
    def tripped(*args, **kwargs):
        raise Tripwire(f"{name} was reached")
    monkeypatch.setattr(owner, name, tripped)


# More shared helpers, for tests filed in several subject files.


def error_line(argv, capsys, script=None):
    """Run the program on argv: the mistake ends as conftest.one_line_error says, and its `error: ...`
    line is the last thing on stderr (a progress bar may come before it once training has started);
    returns the line."""
    code, out, err = run_main(argv, capsys, script)
    one_line_error(code, err)
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert err.rstrip("\n").endswith(line), err[-2000:]
    return line


def put(path, content):
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def timed(fn):
    start = time.monotonic()
    return fn(), time.monotonic() - start


def wait_for(paths, seconds=60):
    deadline = time.time() + seconds
    while not all(os.path.exists(p) for p in paths):
        assert time.time() < deadline, "a starter did not report"
        time.sleep(0.005)


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


# The `bad_input` marker (pytest.ini) counts the bad inputs and damaged states the suite covers: each
# test that feeds one (and asserts exit 2 with one `error:` line, a counted skip or a recovery) carries
# @pytest.mark.bad_input itself, so the count follows the test wherever it is filed; the controls
# beside them (valid inputs that must stay accepted, facts of the shipped worlds) carry none.
# Count them with: pytest --collect-only -q -m bad_input | tail -1


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny Llama causal LM and a character tokenizer with a chat template."""
    return save_tiny(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) loaded back through the Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model.eval(), tok


@pytest.fixture(scope="session")
def no_template_model_dir(tmp_path_factory):
    """Like tiny_model_dir, but the tokenizer has no chat template."""
    return save_tiny(tmp_path_factory.mktemp("tiny_no_template"), chat_template=None)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """24 one-step sums in the project's JSONL format, with reference solutions."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(24):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({"id": i, "question": f"{a}+{b}", "answer": a + b,
                                "solution": f"<step_1> {a}+{b}={a + b} <answer> {a + b}"}) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def restore_process_state():
    """train() installs SIGINT/SIGTERM handlers and `threads` sets torch's thread count; in-process
    runs must leave neither behind in pytest."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    torch.set_num_threads(threads)


class CriticServer:
    """A local OpenAI-compatible critic server whose behaviour a test sets:
    models    GET /models: list (serves "critic-model") | 401 | 403 | 404
    replies   POST: good | slow (2 s late, then good) | not_json | 400 | 401 | flaky (500 once, then
              good) | no_step_tags | length (good text, but finish_reason "length": cut at max_tokens)
    critique  the text of a good reply; `requests` holds (headers, body) of every POST."""

    def __init__(self):
        self.models, self.replies, self.critique, self.requests = "list", "good", "<step_1> 1+1=2 <answer> 2", []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, body):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                    pass

            def do_GET(self):
                if server.models in ("401", "403"):
                    return self.send(int(server.models), b'{"error": "invalid api key"}')
                if server.models == "404":
                    return self.send(404, b"{}")
                self.send(200, json.dumps({"data": [{"id": "critic-model"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((dict(self.headers), body))
                mode = server.replies
                if mode == "slow":
                    time.sleep(2.0)
                if mode in ("400", "401") or (mode == "flaky" and len(server.requests) == 1):
                    return self.send(500 if mode == "flaky" else int(mode), b'{"error": "no"}')
                if mode == "not_json":
                    return self.send(200, b"<html>502 Bad Gateway</html>")
                content = "The student is wrong; the answer is 2." if mode == "no_step_tags" else server.critique
                finish = "length" if mode == "length" else "stop"  # length: cut at max_tokens
                self.send(200, json.dumps({"choices": [{"message": {"content": content},
                                                        "finish_reason": finish}]}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def critic_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.delenv("CRITIC_KEY_FOR_TESTS", raising=False)
    server = CriticServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """(cfg, peft model in eval mode, tokenizer): the tiny model with a non-zero LoRA adapter, one per
    test module (tests load other adapters into it)."""
    from plumbing import common
    import selfdistill
    cfg = selfdistill.Config(model=tiny_model_dir, prompts="instruct", lora_r=4, chunk_size=5, micro_batch=8)
    model, tok = common.load_model(cfg, tiny_model_dir, torch.device("cpu"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # student ≠ teacher
    return cfg, model.eval(), tok
