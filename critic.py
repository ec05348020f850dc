"""Judging a rollout: the binary reward, and the step-aligned critique a frozen critic writes.

Reward. The final answer is the text after the last `<answer>` tag (else the last `\\boxed{}`),
compared with the gold answer by a small hand-written normaliser. We chose it over `math-verify`
to keep the dependencies to five packages and because the toy world's answers are integers; on
real math data it will miss some correct answers (it undercounts the reward), because it does not
handle symbolic equivalence (`2\\sqrt{2}` vs `\\sqrt{8}`, `x+1` vs `1+x`), units (`5\\text{ cm}` vs
`5`), rounding (`0.333` vs `1/3`), percentages as decimals, sets/intervals in another order,
multiple answers, matrices, or constants like `\\pi` evaluated numerically.

Critique (PAPER.md §4). A frozen critic rewrites the solver's step-tagged trace by four cases:
A correct → reproduce it; B right answer, missing step → reproduce and insert it; C unfinished →
reproduce, condense, finish; D wrong → copy the correct steps verbatim up to the earliest error,
fix that step, finish. Every critic has one call, `critic(questions, responses, solutions,
answers) -> list[str | None]` (None: the call failed), and a `check()` the trainer runs at start:

    toy.RuleCritic()                    the toy world's program (toy.rule_critique)
    HFCritic(model_path, ...)           a local Hugging Face causal LM, greedy
    HTTPCritic(base_url, model, ...)    an OpenAI-compatible /chat/completions server, temperature 0

`validate_critique` decides whether a critique may enter the loss; an invalid one drops the
sample (counted), it never silently becomes a reference solution.
"""
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import torch

import common
from common import UserError
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


NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"


def normalize_answer(text):
    """Strip the LaTeX and formatting that does not change a math answer's value."""
    s = str(text).strip()
    s = last_boxed(s) if "\\boxed{" in s and last_boxed(s) is not None else s
    s = s.replace("$", "").replace("{,}", ",")            # `1{,}000` is LaTeX for `1,000`
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)    # but keep \rightarrow
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)   # \frac12 shorthand
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\{?\\circ\}?|\\%", "", s)             # degrees and percent signs as decoration
    s = re.sub(r"\\[,;:! ]", "", s)                      # LaTeX spacing commands
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]=", "", s)                      # "x=5" -> "5"
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands commas, not tuples like 1,2
        s = s.replace(",", "")
    return s


def to_number(s):
    """A normalised answer as an exact Fraction (integer, decimal, a/b, \\frac{a}{b}), or None."""
    try:
        if m := re.fullmatch(rf"([-+]?)\\frac\{{({NUMBER})\}}\{{({NUMBER})\}}", s):
            value = Fraction(m[2]) / Fraction(m[3])
            return -value if m[1] == "-" else value
        if m := re.fullmatch(rf"({NUMBER})/({NUMBER})", s):
            return Fraction(m[1]) / Fraction(m[2])
        if re.fullmatch(NUMBER, s):
            return Fraction(s)
    except ZeroDivisionError:
        pass
    return None


def answers_match(pred, gold):
    """Equal as exact numbers when both parse as numbers, else equal as normalised strings."""
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    return a != "" and a == b


def reward(response, gold):
    """The binary reward r ∈ {0, 1} on the final answer."""
    return 1.0 if answers_match(extract_answer(response), gold) else 0.0


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


def validate_critique(rollout, critique, gold=None):
    """(valid, reason). A critique is valid when all of these hold:

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
    Never raises."""
    if not isinstance(critique, str):
        return False, "no critique"
    try:
        steps, answer = parse_steps(critique)
    except ValueError as error:
        return False, f"bad step tags: {error}"
    if not steps:
        return False, "no step tags"
    if not all(steps):
        return False, f"step {steps.index('') + 1} is empty"
    if not answer:
        return False, "no answer"
    if gold is not None and not answers_match(extract_answer(critique), gold):
        return False, "the critique's answer is not the gold answer"
    try:
        rollout_steps = parse_steps(rollout)[0] if isinstance(rollout, str) else []
    except ValueError:
        rollout_steps = []
    n = min(len(steps), len(rollout_steps))
    k = next((i for i in range(n) if steps[i] != rollout_steps[i]), n)  # first changed step
    if k < n and squash(steps[k]) == squash(rollout_steps[k]):
        return False, f"step {k + 1} retypes the solver's step (whitespace/case only)"
    same_answer = answers_match(extract_answer(rollout), extract_answer(critique))
    if rollout_steps and same_answer and not set(steps) & set(rollout_steps):
        return False, "rewrites a right-answer trace without copying any of its steps"
    return True, "ok"


# ---------------------------------------------------------------------------------------------
# The model critic's instruction (PAPER.md §4, in our words)


def critic_prompt(question, response, solution, answer):
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
                 batch_size=8, trust_remote_code=False):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        check_chat_template(self.tokenizer, where=f"the critic {model_path}")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype),
            trust_remote_code=trust_remote_code).to(device).eval().requires_grad_(False)
        self.device, self.max_new_tokens, self.batch_size = device, max_new_tokens, batch_size
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.stop_ids.discard(None)

    def check(self):
        pass

    def generate(self, prompts):
        """Greedy completions of a few prompts, decoded with special tokens kept (the think tags
        are special in some tokenizers and clean_critique needs them)."""
        ids = [render_prompt(self.tokenizer, p, thinking=True) for p in prompts]
        out, truncated = common.generate(self.model, self.tokenizer, ids, self.max_new_tokens, temperature=0,
                                         batch_size=len(ids), stop=self.stop_ids)
        return [self.tokenizer.decode(row if cut else row[:-1], skip_special_tokens=False)
                for row, cut in zip(out, truncated)]

    def __call__(self, questions, responses, solutions, answers):
        prompts = [critic_prompt(*item) for item in zip(questions, responses, solutions, answers,
                                                        strict=True)]
        critiques = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            try:
                critiques += [clean_critique(t) for t in self.generate(batch)]
            except torch.OutOfMemoryError:  # one too-long batch drops its samples, not the run
                log.warning("critic ran out of memory on %d prompts; they count as failed", len(batch))
                critiques += [None] * len(batch)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return critiques


class HTTPCritic:
    """An OpenAI-compatible /chat/completions server (e.g. vLLM serving QwQ-32B), temperature 0.

    The API key is read from $api_key_env at each request and is never stored or logged.
    `timeout` applies per request (per socket operation); a request that times out, cannot
    connect, or gets HTTP 5xx/429 is retried `retries` times with a short exponential backoff;
    any other HTTP error or a malformed reply fails at once. A sample that failed is None."""

    def __init__(self, base_url, model, api_key_env="OPENAI_API_KEY", timeout=120, retries=3,
                 max_tokens=4096, workers=4, backoff=1.0):
        self.base_url = base_url.rstrip("/")
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.max_tokens = timeout, retries, max_tokens
        self.workers, self.backoff = workers, backoff

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
                listing = json.loads(reply.read())
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

    def post(self, prompt):
        """One request; returns the reply's text or raises."""
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        request = urllib.request.Request(self.base_url + "/chat/completions", data=body,
                                         headers=self.headers(), method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as reply:
            content = json.loads(reply.read())["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("the reply has no text content")
        return content

    def ask(self, prompt):
        """One critique with bounded retries; None when it still failed."""
        for attempt in range(max(self.retries, 0) + 1):
            try:
                return clean_critique(self.post(prompt))
            except urllib.error.HTTPError as error:
                error.close()
                reason = f"HTTP {error.code}"
                if error.code in (401, 403):  # the key is refused: no sample can succeed
                    raise ConnectionError(f"critic at {self.base_url} refused the API key in "
                                          f"${self.api_key_env} (HTTP {error.code})") from None
                if error.code != 429 and error.code < 500:
                    break  # our request is wrong; repeating it will not help
            except (OSError, http.client.HTTPException) as error:  # timeout, refused, reset
                reason = " ".join(str(getattr(error, "reason", error)).split()) or type(error).__name__
            except (ValueError, KeyError, IndexError, TypeError) as error:  # not the expected JSON
                reason = f"malformed reply ({type(error).__name__})"
                break
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        log.warning("critic request failed after %d attempt(s): %s", attempt + 1, reason)
        return None

    def __call__(self, questions, responses, solutions, answers):
        prompts = [critic_prompt(*item) for item in zip(questions, responses, solutions, answers,
                                                        strict=True)]
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.workers, len(prompts))) as pool:
            return list(pool.map(self.ask, prompts))


def make_critic(kind, **settings):
    critics = {"hf": HFCritic, "http": HTTPCritic}
    if kind not in critics:
        raise ValueError(f"unknown critic {kind!r}; expected one of {', '.join(critics)}")
    return critics[kind](**settings)


def from_config(cfg, device):
    """The frozen model critic (hf or http) of a run's config, checked once (one-line errors).
    The toy world's rule critic is toy.RuleCritic."""
    settings = {
        "hf": dict(model_path=cfg.critic_model, device=str(device), dtype=cfg.dtype,
                   max_new_tokens=cfg.critic_max_new_tokens, trust_remote_code=cfg.trust_remote_code),
        "http": dict(base_url=cfg.critic_url, model=cfg.critic_model, api_key_env=cfg.critic_api_key_env,
                     timeout=cfg.critic_timeout, retries=cfg.critic_retries,
                     max_tokens=cfg.critic_max_new_tokens),
    }[cfg.critic]
    try:
        judge = make_critic(cfg.critic, **settings)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the critic '{cfg.critic_model}': {str(e).splitlines()[0]}") from None
    try:
        judge.check()
    except (ConnectionError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    return judge
