"""Judging a rollout: the binary reward, and the step-aligned critique a frozen critic writes.

Reward. The final answer is the text after the last `<answer>` tag (else the last `\\boxed{}`).
Two plain integers are compared exactly (the fast path: the toy world, microseconds); any other
pair goes to Hugging Face's `math-verify`, which parses both sides' LaTeX with SymPy and knows
what a hand-written normaliser misses: `2\\sqrt{2}` = `\\sqrt{8}`, `\\pi/2`, sets and intervals in
any order, percentages, units, `3 \\times 10^{8}`, `x+1` = `1+x`, `\\text{}` answers, matrices.
On the 104 hand-labelled pairs of tests/test_answers.py it agrees with the labels on 99 (the
normaliser it replaced: 60). A parse failure is a wrong answer, never an exception; a pathological
answer is cut off after a few seconds and counts as wrong, on any thread (see answers_match).

Critique (the paper's §4). A frozen critic rewrites the solver's step-tagged trace by four cases:
A correct → reproduce it; B right answer, missing step → reproduce and insert it; C unfinished →
reproduce, condense, finish; D wrong → copy the correct steps verbatim up to the earliest error,
fix that step, finish. Every critic has one call, `critic(questions, responses, solutions,
answers) -> list[str | Failure]` (a Failure says why no critique came back: critic_error,
critique_truncated, critic_oom), and a `check()` the trainer runs at start:

    toy.RuleCritic()                    the toy world's program (toy.rule_critique)
    HFCritic(model_path, ...)           a local Hugging Face causal LM, greedy
    HTTPCritic(base_url, model, ...)    an OpenAI-compatible /chat/completions server, temperature 0

`validate_critique` decides whether a critique may enter the loss; an invalid one drops the
sample (counted), it never silently becomes a reference solution.
"""
import collections
import http.client
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import math_verify
import torch

import contexts
from plumbing import common
from plumbing import sampler
from plumbing.common import UserError
from contexts import check_chat_template, parse_steps, render_prompt

log = logging.getLogger("critic")

# ---------------------------------------------------------------------------------------------
# Answers and the binary reward


def last_boxed(text):
    """Content of the last `\\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the answer was cut off


def extract_answer(text):
    """The text after the last `<answer>` tag, up to `</answer>` or the end of its line; else the
    content of the last `\\boxed{}`; else None."""
    if not isinstance(text, str):
        return None
    i = text.rfind("<answer>")
    if i >= 0:
        after = text[i + len("<answer>"):].lstrip()  # the answer may start on the next line
        answer = re.split(r"</answer>|\n", after, maxsplit=1)[0].strip()
        if answer:
            return answer
    return last_boxed(text)


def normalize_answer(text):
    """The answer without `$`, a `\\boxed{}` wrapper, LaTeX spacing and whitespace. Only the data
    loaders use it: a gold answer that this turns into "" could never be matched."""
    s = str(text)
    s = last_boxed(s) if last_boxed(s) is not None else s
    return re.sub(r"\\[,;:! ]|\$|\s", "", s)


# The fast path: when both answers are plain integers (ASCII digits, an optional sign, spaces
# around) they are compared as Python ints and math-verify is not called: ~1 µs instead of ~10 ms.
# The toy world's gold answers are integers and so is every answer its base model wrote in our
# samples at T = 1, so its reward and Maj@k are the old exact integer check. math-verify reads
# integers exactly, so the two agree there (tests/test_answers.py checks random ints, signs and
# leading zeros). Any other pair, garbage included, goes to math-verify. 100 digits keeps int()
# clear of Python's 4300-digit limit.
PLAIN_INTEGER = re.compile(r"\s*[-+]?[0-9]{1,100}\s*")
CHECK_SECONDS = 3   # math-verify's limit per parse and per comparison; past it, counted as wrong
HELPER_SECONDS = 60  # off the main thread: the most we wait for the helper process (its start imports torch)
helper = {"process": None, "lock": threading.Lock()}


def as_latex(answer):
    """An answer as math-verify's LaTeX reader wants it: in `$...$` (it reads only delimited math),
    without a sentence's full stop (`x = 5.` does not parse), a bare matrix body `1&2\\\\3&4` inside
    a pmatrix."""
    answer = re.sub(r"(?<!\.)\.$", "", str(answer).strip())
    if "&" in answer and "\\begin" not in answer:
        answer = "\\begin{pmatrix}" + answer + "\\end{pmatrix}"
    return "$" + answer + "$"


def verify(pred, gold, seconds=CHECK_SECONDS):
    """math-verify's verdict on two answers, gold first (its rules are asymmetric: an equation is
    read as its right-hand side in the prediction). Its timeouts use SIGALRM, so this must run in a
    main thread; a parse failure, an error or a timeout is False, never an exception. We let an
    inequality answer an interval (`x \\le 3` for `(-\\infty, 3]`), which math-verify's default
    allows only the other way round."""
    # LaTeX only: math-verify's plain-expression reader also picks numbers out of garbage
    # (`c1 171=18 q18+9,` read as 18), which a reward must not pay for.
    latex = [math_verify.LatexExtractionConfig()]
    gold, pred = (math_verify.parse(as_latex(s), latex, parsing_timeout=seconds) for s in (gold, pred))
    return math_verify.verify(gold, pred, timeout_seconds=seconds, allow_set_relation_comp=True)


def serve():
    """The helper process's loop: for each line [pred, gold, seconds] (JSON) on stdin, `verify` on
    this process's main thread, and its verdict as one JSON line on stdout."""
    for line in sys.stdin:
        print(json.dumps(verify(*json.loads(line))), flush=True)


def verify_off_main_thread(pred, gold):
    """`verify` for a worker thread, where math-verify's SIGALRM timeout raises instead of running,
    and turning it off would let a pathological answer (9^{9^{9^9}}) run forever. We ask one shared
    helper process (`serve`, started on first use; it imports torch, a few seconds), one question at
    a time; a helper that does not answer in HELPER_SECONDS is killed and the answer is wrong."""
    with helper["lock"]:
        process = helper["process"]
        if process is None or process.poll() is not None:
            process = helper["process"] = subprocess.Popen(
                [sys.executable, "-c", "import critic; critic.serve()"], text=True,
                cwd=os.path.dirname(os.path.abspath(__file__)), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            process.stdin.write(json.dumps([pred, gold, CHECK_SECONDS]) + "\n")
            process.stdin.flush()
            if select.select([process.stdout], [], [], HELPER_SECONDS)[0]:
                return json.loads(process.stdout.readline())
        except (OSError, ValueError):  # the helper died (broken pipe, no reply line)
            pass
        log.warning("an answer check got no verdict in %d s; counted as wrong", HELPER_SECONDS)
        process.kill()
        process.wait()
        helper["process"] = None
        return False


def answers_match(pred, gold, exact=False):
    """Whether a predicted answer equals the gold one: plain integers exactly (the fast path), any
    other pair by math-verify (`verify`). A missing answer or one math-verify cannot parse is wrong.
    A pathological answer costs at most ~3 × CHECK_SECONDS and counts as wrong. Safe on any thread.
    exact: integers only, anything else is wrong (the toy world, whose answers are integers: its
    reward must not pay `1+7` for 8)."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if PLAIN_INTEGER.fullmatch(pred) and PLAIN_INTEGER.fullmatch(gold):
        return int(pred) == int(gold)
    if exact:
        return False
    if threading.current_thread() is threading.main_thread():
        return verify(pred, gold, CHECK_SECONDS)
    return verify_off_main_thread(pred, gold)


def reward(response, gold, exact=False):
    """The binary reward r ∈ {0, 1} on the final answer (exact: see answers_match)."""
    return 1.0 if answers_match(extract_answer(response), gold, exact) else 0.0


# ---------------------------------------------------------------------------------------------
# Critique text: cleaning and validation


def clean_critique(text):
    """Drop the critic's thinking and anything before `<step_1>`."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    if "</think>" in text:   # the template opened the think block in the prompt (QwQ does)
        text = text.rsplit("</think>", 1)[1]
    text = text.split("<think>", 1)[0]  # thinking that never ended: no critique came out of it
    start = text.find("<step_1>")
    return (text[start:] if start >= 0 else text).strip()


def squash(step):
    return re.sub(r"\s+", "", step).lower()


VALIDATION = ("full", "format", "off")  # critique_validation: what a critique must pass to enter the loss


class Failure:
    """A critique that did not come back, and why: `reason` is the name it is counted under in
    metrics.jsonl (train/dropped/REASON) and prepare.json. critic_error: the request or the model
    failed; critique_truncated: the critic reached its token budget (critic_max_new_tokens) before
    it finished, e.g. still inside <think>; critic_oom: out of memory even one prompt at a time.
    Falsy, like the None it replaces: `if critique:` reads as before."""
    __slots__ = ("reason",)

    def __init__(self, reason):
        self.reason = reason

    def __bool__(self):
        return False

    def __eq__(self, other):
        return isinstance(other, Failure) and other.reason == self.reason

    def __hash__(self):
        return hash(self.reason)

    def __repr__(self):
        return f"Failure({self.reason!r})"


def validate_critique(rollout, critique, gold=None, mode="full"):
    """(valid, reason); an invalid critique's reason starts with the name it is counted under
    (`reason.split(":")[0]`: critic_error, critique_truncated, critic_oom, bad_format,
    wrong_answer, retyped_step, rewrote_right_answer). With mode="full" (the default) a critique
    is valid when all of these hold:

    1. it parses: step tags numbered 1..N in order, N >= 1, no empty step, a non-empty answer;
    2. no paraphrased step: let k be the first step where critique and rollout differ (steps are
       compared after stripping their ends; before k they are equal by construction). If the
       critique's step k equals the rollout's step k up to whitespace and case, the critic retyped
       a step instead of copying it, and the teacher would push on correct tokens;
    3. no rewrite of a right answer: when the rollout parses and ends in the critique's own answer
       (cases A and B, which reproduce the solver's work), the critique must copy at least one of
       the rollout's steps verbatim; one that shares none is a reference solution in disguise.
       (A rollout right by luck with a wrong first step is dropped too: the safe side.)
    4. when `gold` is given, the critique's answer matches it: every case ends at the right answer.
    An unparseable or unfinished rollout (case C) has no steps to align with: rules 2 and 3 skip.
    mode="format" checks rules 1-3 only (no gold check); mode="off" accepts any critique that came
    back with text. Never raises."""
    if isinstance(critique, Failure):
        return False, f"{critique.reason}: no critique came back"
    if not isinstance(critique, str):
        return False, "critic_error: no critique came back"
    if mode == "off":
        return (True, "ok") if critique.strip() else (False, "bad_format: empty critique")
    try:
        steps, answer = parse_steps(critique)
    except ValueError as error:
        return False, f"bad_format: bad step tags: {error}"
    if not steps:
        return False, "bad_format: no step tags"
    if not all(steps):
        return False, f"bad_format: step {steps.index('') + 1} is empty"
    if not answer:
        return False, "bad_format: no answer"
    if mode == "full" and gold is not None and not answers_match(extract_answer(critique), gold):
        return False, "wrong_answer: the critique's answer is not the gold answer"
    try:
        rollout_steps = parse_steps(rollout)[0] if isinstance(rollout, str) else []
    except ValueError:
        rollout_steps = []
    n = min(len(steps), len(rollout_steps))
    k = next((i for i in range(n) if steps[i] != rollout_steps[i]), n)  # first changed step
    if k < n and squash(steps[k]) == squash(rollout_steps[k]):
        return False, f"retyped_step: step {k + 1} retypes the solver's step (whitespace/case only)"
    same_answer = answers_match(extract_answer(rollout), extract_answer(critique))
    if rollout_steps and same_answer and not set(steps) & set(rollout_steps):
        return False, "rewrote_right_answer: rewrites a right-answer trace without copying any of its steps"
    return True, "ok"



def verdict(rollout, critique, gold=None, mode="full"):
    """"ok", or the name an invalid critique is counted under (validate_critique's reason code)."""
    return validate_critique(rollout, critique, gold, mode)[1].split(":")[0]

# ---------------------------------------------------------------------------------------------
# The model critic's instruction (the paper's §4, in our words)


def critic_prompt(question, response, solution, answer, prompts="instruct"):
    """The critic's instruction in the run's prompt set: the toy world's learned critic reads a
    short toy form (contexts.PROMPTS["toy"]["critic"]: question, gold answer, attempt), as the toy
    solver reads short toy prompts; any other critic reads the full instruction below."""
    if prompts == "toy":
        return contexts.PROMPTS["toy"]["critic"].format(question=question, answer=answer, response=response)
    # Concatenation, not str.format: LaTeX braces in the inputs must pass through untouched.
    return (
        "You are reviewing a student's solution to a math problem. You know a correct solution "
        "and the correct final answer. Your job is to write a corrected version of the student's "
        "own solution, which the student will study.\n\n"
        "Problem:\n" + question + "\n\n"
        "Correct final answer: " + str(answer) + "\n\n"
        "A correct solution (for checking only; do not copy its wording or its route):\n"
        + solution + "\n\n"
        "The student's solution:\n" + response + "\n\n"
        "The student writes numbered steps, each opened by a tag <step_1>, <step_2>, ..., and the "
        "final answer after the tag <answer>. Rewrite the student's solution in exactly that "
        "format, in the student's own words and notation, by the first rule that applies:\n"
        "A. Every step is correct and the final answer is right: reproduce the student's solution "
        "exactly, character for character.\n"
        "B. The final answer is right but a step needed to justify it is missing: reproduce the "
        "student's steps exactly and insert the missing step where it belongs.\n"
        "C. The solution is unfinished (it stops before a final answer): reproduce the student's "
        "correct steps, condense any repetition, and finish the solution to the correct answer.\n"
        "D. A step is wrong: copy every step before the first wrong one exactly, character for "
        "character. Replace the first wrong step with a correct step; write only the corrected "
        "version, never the wrong one, and do not say that it was wrong. Then continue with "
        "correct steps to the correct final answer.\n\n"
        "Number the steps 1, 2, 3, ... in order. Do not mention the correct solution, grade the "
        "student or explain your changes. Output only the step-tagged solution: start with "
        "<step_1> and end with <answer> followed by the final answer."
    )


# ---------------------------------------------------------------------------------------------
# Critics


class HFCritic:
    """A frozen local Hugging Face causal LM: eval mode, no grad, greedy, batched, left-padded."""

    def __init__(self, model_path, device="cpu", dtype="float32", max_new_tokens=1024,
                 batch_size=8, trust_remote_code=False, prompts="instruct"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        check_chat_template(self.tokenizer, where=f"the critic {model_path}")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype),
            trust_remote_code=trust_remote_code).to(device).eval().requires_grad_(False)
        self.device, self.max_new_tokens, self.batch_size = device, max_new_tokens, batch_size
        self.prompts = prompts  # the prompt set of critic_prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.stop_ids.discard(None)

    def check(self):
        pass

    def generate(self, prompts):
        """Greedy completions of a few prompts, decoded with special tokens kept (the think tags
        are special in some tokenizers and clean_critique needs them), and whether each reached
        max_new_tokens before its end."""
        ids = [render_prompt(self.tokenizer, p, thinking=True) for p in prompts]
        # never past the model's last position (the toy critic has 512): a critique that would go
        # on is cut there and counts as critique_truncated, instead of an indexing error
        positions = getattr(self.model.config, "max_position_embeddings", None) or 10 ** 9
        budget = max(1, min(self.max_new_tokens, positions - max(map(len, ids))))
        out, truncated = sampler.generate(self.model, self.tokenizer, ids, budget, temperature=0,
                                         batch_size=len(ids), stop=self.stop_ids)
        return [self.tokenizer.decode(row if cut else row[:-1], skip_special_tokens=False)
                for row, cut in zip(out, truncated)], truncated

    def __call__(self, questions, responses, solutions, answers):
        prompts = [critic_prompt(*item, prompts=self.prompts)
                   for item in zip(questions, responses, solutions, answers, strict=True)]
        critiques, start, batch_size = [], 0, self.batch_size
        while start < len(prompts):
            batch = prompts[start:start + batch_size]
            try:
                texts, truncated = self.generate(batch)
            except torch.OutOfMemoryError:  # halve the batch and retry before any sample is dropped
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if batch_size > 1:
                    batch_size //= 2
                    log.warning("critic ran out of memory on %d prompts; retrying %d at a time "
                                "(set critic_batch=%d)", len(batch), batch_size, batch_size)
                    continue
                log.warning("critic ran out of memory on one prompt; it counts as critic_oom")
                texts, truncated = [Failure("critic_oom")], [False]
            critiques += [text if isinstance(text, Failure) else
                          Failure("critique_truncated") if cut else clean_critique(text)
                          for text, cut in zip(texts, truncated)]
            start += len(batch)
        self.batch_size = batch_size  # the size that fitted serves the next call too
        return critiques


class Stopped(Exception):
    """A stop signal (common.STOPPING) abandoned the critic's requests: the step has no critiques."""


class ReplyTooLarge(ValueError):
    """The server's reply is larger than the critic reads: counted as a failed critique."""


DEADLINE_TIMEOUTS = 3  # a critique gets at most this many × timeout in all: attempts, waits, reads
MAX_BACKOFF = 30.0  # seconds: the longest wait between two attempts


class HTTPCritic:
    """An OpenAI-compatible /chat/completions server (e.g. vLLM serving QwQ-32B), temperature 0.

    The API key is read from $api_key_env at each request and is never stored or logged.
    `timeout` applies per request (per socket operation); a request that times out, cannot
    connect, or gets HTTP 5xx/429 is retried `retries` times with an exponential backoff of at most
    MAX_BACKOFF, all within DEADLINE_TIMEOUTS × timeout per critique; any other HTTP error, a
    malformed reply or one over `max_reply_bytes` fails at once. A sample that failed is a
    Failure: critic_error, or critique_truncated when the reply stopped at max_tokens
    (finish_reason "length"). `workers` requests are in flight at once (critic_batch).
    Requests run on daemon threads that a stop signal (common.STOPPING) abandons: the call then
    raises Stopped at once instead of waiting for a server that may never answer."""

    def __init__(self, base_url, model, api_key_env="OPENAI_API_KEY", timeout=120, retries=3,
                 max_tokens=4096, workers=4, backoff=1.0, max_reply_bytes=None, prompts="instruct"):
        self.base_url = base_url.rstrip("/")
        self.prompts = prompts  # the prompt set of critic_prompt
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.max_tokens = timeout, retries, max_tokens
        self.workers, self.backoff = workers, backoff
        # 64 bytes per token: JSON-escaped text (6 bytes per \uXXXX character) with room to spare
        self.max_reply_bytes = max_reply_bytes or 64 * max_tokens + 2 ** 16

    def __repr__(self):
        return (f"HTTPCritic(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r})")

    def headers(self):
        key = os.environ.get(self.api_key_env)
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return {"Content-Type": "application/json", **auth}

    def check(self):
        """Raise a one-line ConnectionError when the server cannot be reached or refuses the key,
        and a ValueError when it lists its models and ours is not among them."""
        request = urllib.request.Request(self.base_url + "/models", headers=self.headers())
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout, 10)) as reply:
                listing = json.loads(read_capped(reply, self.max_reply_bytes, time.monotonic() + 10))
        except urllib.error.HTTPError as error:
            error.close()
            if error.code in (401, 403):
                raise ConnectionError(f"critic at {self.base_url} refused the API key in "
                                      f"${self.api_key_env} (HTTP {error.code})") from None
            return  # reachable; some servers have no /models
        except (OSError, http.client.HTTPException) as error:
            reason = " ".join(str(getattr(error, "reason", error)).split())
            raise ConnectionError(f"critic at {self.base_url} is unreachable: {reason}") from None
        except ValueError:
            return
        served = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)] \
            if isinstance(listing, dict) else []
        if served and self.model not in served:
            raise ValueError(f"critic at {self.base_url} does not serve {self.model!r} "
                             f"(it serves {', '.join(map(str, served[:5]))})")

    def post(self, prompt, deadline):
        """One request: (the reply's text, whether it stopped at max_tokens); raises on failure
        (TimeoutError past `deadline`)."""
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        request = urllib.request.Request(self.base_url + "/chat/completions", data=body,
                                         headers=self.headers(), method="POST")
        timeout = max(0.01, min(self.timeout, deadline - time.monotonic()))
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            choice = json.loads(read_capped(reply, self.max_reply_bytes, deadline))["choices"][0]
        content = choice["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("the reply has no text content")
        return content, choice.get("finish_reason") == "length"

    def ask(self, prompt):
        """One critique with bounded retries and a deadline; a Failure when it still failed. Raises
        Stopped when a stop signal came first."""
        deadline = time.monotonic() + DEADLINE_TIMEOUTS * self.timeout
        for attempt in range(max(self.retries, 0) + 1):
            if common.STOPPING.is_set():
                raise Stopped
            try:
                text, cut = self.post(prompt, deadline)  # cut: max_tokens reached (greedy: again if asked)
                return Failure("critique_truncated") if cut else clean_critique(text)
            except urllib.error.HTTPError as error:
                error.close()
                reason = f"HTTP {error.code}"
                if error.code in (401, 403):  # the key is refused: no sample can succeed
                    raise ConnectionError(f"critic at {self.base_url} refused the API key in "
                                          f"${self.api_key_env} (HTTP {error.code})") from None
                if error.code != 429 and error.code < 500:
                    break  # our request is wrong; repeating it will not help
            except ReplyTooLarge as error:  # the same request would get the same reply
                reason = str(error)
                break
            except (OSError, http.client.HTTPException) as error:  # timeout, refused, reset
                reason = " ".join(str(getattr(error, "reason", error)).split()) or type(error).__name__
            except (ValueError, KeyError, IndexError, TypeError) as error:  # not the expected JSON
                reason = f"malformed reply ({type(error).__name__})"
                break
            delay = min(self.backoff * 2 ** attempt, MAX_BACKOFF)
            if attempt == self.retries or delay >= deadline - time.monotonic():
                break  # no retry left, or no time for one
            if common.STOPPING.wait(delay):  # not time.sleep: a stop signal ends the wait
                raise Stopped
        log.warning("critic request failed after %d attempt(s): %s", attempt + 1, reason)
        return Failure("critic_error")

    def __call__(self, questions, responses, solutions, answers):
        prompts = [critic_prompt(*item, prompts=self.prompts)
                   for item in zip(questions, responses, solutions, answers, strict=True)]
        critiques, done, errors = [Failure("critic_error")] * len(prompts), [], []
        todo = collections.deque(enumerate(prompts))

        def work():  # one worker: prompts from the shared queue until it is empty, or an error
            while not errors:
                try:
                    i, prompt = todo.popleft()
                except IndexError:  # the queue is empty
                    return
                try:
                    critiques[i] = self.ask(prompt)
                except Exception as error:  # Stopped, a refused key: raised by the caller's thread
                    errors.append(error)
                    return
                done.append(i)

        workers = [threading.Thread(target=work, daemon=True) for _ in range(min(self.workers, len(prompts)))]
        for worker in workers:
            worker.start()
        for worker in workers:  # short joins: a signal's handler runs in between and sets STOPPING
            while worker.is_alive() and not common.STOPPING.is_set():
                worker.join(0.1)
        if len(done) < len(prompts) and common.STOPPING.is_set():
            raise Stopped  # the workers still waiting are abandoned (daemon threads)
        if errors:
            raise errors[0]
        return critiques


def read_capped(reply, limit, deadline):
    """A reply's body, at most `limit` bytes (ReplyTooLarge past it) and read by `deadline`
    (TimeoutError past it: a server that trickles bytes still ends)."""
    declared = reply.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ReplyTooLarge(f"reply of {declared} bytes, over the {limit}-byte cap")
    parts, size = [], 0
    while chunk := reply.read1(min(2 ** 16, limit + 1 - size)):  # what has arrived, not a full 64 KiB
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ReplyTooLarge(f"reply over the {limit}-byte cap")
        if time.monotonic() > deadline:
            raise TimeoutError("the reply did not arrive in time")
    return b"".join(parts)


MAX_CRITIC_RETRIES = 10  # more would only wait longer: a critique's total time is capped anyway


def check_settings(cfg):
    """The critic's own settings in a run's config (selfdistill.check_consistency): one-line errors."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.critic_api_key_env):
        raise UserError("config key 'critic_api_key_env' must be the NAME of an environment variable "
                        "(e.g. OPENAI_API_KEY) that holds the key, not the key itself; it was not saved")
    if not cfg.critic_timeout > 0:
        raise UserError("config key 'critic_timeout' must be positive (seconds)")
    if cfg.critic_retries > MAX_CRITIC_RETRIES:
        raise UserError(f"config key 'critic_retries' must lie in 0..{MAX_CRITIC_RETRIES} (a critique gets "
                        f"a few critic_timeouts in all, retries included)")


def check_reachable(cfg):
    """A model critic that a critique arm calls must be named: a URL (http) or a model (hf)."""
    if cfg.critic == "http" and not cfg.critic_url:
        raise UserError("critic=http needs critic_url (e.g. http://127.0.0.1:8000/v1)")
    if cfg.critic == "hf" and not cfg.critic_model:
        raise UserError("critic=hf needs critic_model (a folder or hub id)")


def make_critic(kind, **settings):
    critics = {"hf": HFCritic, "http": HTTPCritic}
    if kind not in critics:
        raise ValueError(f"unknown critic {kind!r}; expected one of {', '.join(critics)}")
    return critics[kind](**settings)


def from_config(cfg, device, model_path=None):
    """The frozen model critic (hf or http) of a run's config, checked once (one-line errors).
    model_path: critic=hf's folder when world.critic_folder resolved a name. The toy world's rule
    critic is toy.RuleCritic."""
    settings = {
        "hf": dict(model_path=model_path or cfg.critic_model, device=str(device), dtype=cfg.dtype,
                   max_new_tokens=cfg.critic_max_new_tokens, batch_size=cfg.critic_batch,
                   trust_remote_code=cfg.trust_remote_code),
        "http": dict(base_url=cfg.critic_url, model=cfg.critic_model, api_key_env=cfg.critic_api_key_env,
                     timeout=cfg.critic_timeout, retries=cfg.critic_retries,
                     max_tokens=cfg.critic_max_new_tokens, workers=cfg.critic_batch),
    }[cfg.critic]
    settings["prompts"] = cfg.prompts  # the critic speaks the run's prompt set (toy or instruct)
    try:
        judge = make_critic(cfg.critic, **settings)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the critic '{cfg.critic_model}': {str(e).splitlines()[0]}") from None
    try:
        judge.check()
    except (ConnectionError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    return judge
