"""The toy world: the paper's experiment, shrunk until it runs on two CPU cores.

Task: left-to-right integer chains such as `2+7+5-9`, solved in the paper's step-tagged format
`<step_1> 2+7=9 <step_2> 9+5=14 <step_3> 14-9=5 <answer> 5`. This file owns

  1. the problem generator (operands 1-9, every intermediate value in 0-30, 2-4 operations);
  2. the solver's surface styles (one per solution) and the step parser;
  3. reference solutions: a different route (added terms, taken terms, difference) in a phrasing
     the solver never uses; the knobs `order` and `phrasing` turn that alignment dial;
  4. the frozen rule-based critic: the paper's four cases A-D (`RuleCritic`);
  5. a character tokenizer with a chat template, a tiny Llama base model (1.08 M parameters)
     pretrained here from scratch, and difficulty-filtered train/test sets (Avg@16 < 5/16);
  6. instruments: `trace_stats` (what a response gets right: per-step arithmetic, chaining, answer
     = own last result, style mix) and `after_error_mass` (how the critique-conditioned teacher
     reads a student's error).

`ensure_built()` builds 5 once, deterministically from a seed, into a world's folder; build.json
records the settings, timings and the base model's measured accuracies (overall, per style, with
each arm's context: the `ceilings`), and the regime (`kept_at_zero`: kept problems at 0/16;
`right_on_faulty`: how often the solver writes a misconception right). Two named worlds ship, so
the quickstart starts at once (`model=NAME`; any built folder works as `model=DIR` too):

    toy     toy_world/     v3, the headline: fault_rate 1.0, the solver fails its misconceptions
                           systematically (the paper's regime: the fix is not in its samples)
    toy-v2  toy_world_v2/  the contrast: fault_rate 0.8, it writes them right a fifth of the time,
                           which a binary reward finds

    python toy.py build --world toy --force          # rebuild a named world (bit-identical)
    python toy.py build --root DIR --fault-rate 0.9  # any BuildSettings field is a checked flag
    python toy.py build --root DIR --recovery 0      # v1's teacher (see 2 below)
    python toy.py probe [--world toy-v2]             # trace stats and the teacher's after-error mass

A built world asked for other settings than its build.json's is an error that says to rebuild.
Besides train/test, a world has a transfer split (build_transfer): filtered problems none of whose
faulty facts lies on any train question's chain, evaluated at step 0 and at a run's last checkpoint.

Prompts (contexts.PROMPTS["toy"] through the chat template; each tag and special is one token):
    student  <|user|>2+7+5-9<|end|><|assistant|>
    teacher  <|user|>2+7+5-9\nfix: <critique><|end|><|assistant|>    (or "\nref: <reference>")
    response <step_1> 2+7=9 ... <answer> 5<|end|>

World v3: the same code as v2 with fault_rate 1.0 (see the README's comparison: at 0.8 GRPO's
binary reward found the fix in its own samples, 53-57 % of its groups had a reward contrast).

World v2 (v1's comparison was decided by the world, not the method; see the README):
  - arithmetic is the only lever: one solver style (a+b=r), so there is no style to choose (v1 had
    four, unequally hard, and GRPO won by avoiding the hard one); what the solver gets wrong is a
    fixed set of arithmetic facts (ASSUMPTION 0 below);
  - one length budget (BuildSettings.max_new_tokens, 64): the filter, training and evaluation all
    use it (selfdistill.resolve reads it from build.json).

Choices built into the base model (they shape the comparison; say so next to any result):
  0. ASSUMPTION (`faulty_share`, `fault_rate`): a fixed 30 % of the step facts a±b have one wrong
     result, which the solver's own traces write every time in v3 (80 % in v2; faulty_facts,
     solver_trace). Its critique- and reference-conditioned examples write them right.
  1. It is pretrained to follow critiques: after `fix: <critique>` the target is the critique's
     trace. A real instruct model follows feedback only as well as it happens to.
  2. ASSUMPTION (`recovery`, v2): a share of the critique examples departs from the critique at one
     step (a wrong result, which carries no loss) and continues correctly from its own wrong value,
     so after a student's error the teacher follows the student's state, as a model reading its
     own work would, instead of pasting the critique's digits (v1's teacher did, and taught wrong
     arithmetic after every error).
  3. ASSUMPTION: after `ref: <reference>` the target copies the reference with probability
     `copy_prob` (0.5) and is the model's own chain trace otherwise, so in-context use of a
     reference is partial by construction.
  4. Critique examples use chains of 3-4 operations (`critique_min_ops`): the filter keeps long
     chains, and copying a long critique is what the model learns last.
"""
import argparse
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
import dataclasses
from dataclasses import asdict, dataclass

import torch

import common
import critic
from contexts import (ANSWER_TAG as ANSWER, build_rows, critique_form, parse_steps, render_steps,
                      student_prompt_ids, teacher_prompt_ids)

# ---------------------------------------------------------------------------------------------
# Problems. Difficulty knobs: operand range, allowed intermediate values, number of operations.

OPERANDS = range(1, 10)
MIN_VALUE, MAX_VALUE = 0, 30
MIN_OPS, MAX_OPS = 2, 4


def apply(a, op, b):
    return a + b if op == "+" else a - b


def random_question(rng, min_ops=MIN_OPS, max_ops=MAX_OPS):
    """A chain whose running value stays within MIN_VALUE..MAX_VALUE after every operation."""
    value = rng.choice(OPERANDS)
    text = str(value)
    for _ in range(rng.randint(min_ops, max_ops)):
        moves = [(op, x) for op in "+-" for x in OPERANDS
                 if MIN_VALUE <= apply(value, op, x) <= MAX_VALUE]
        op, x = rng.choice(moves)
        value, text = apply(value, op, x), f"{text}{op}{x}"
    return text


def parse_question(question):
    """'2+7-5' -> (2, [('+', 7), ('-', 5)])."""
    first, *rest = re.findall(r"[+-]?\d+", question)
    return int(first), [(term[0], int(term[1:])) for term in rest]


def chain_steps(question):
    """The left-to-right steps as (a, op, b, result) tuples."""
    value, moves = parse_question(question)
    steps = []
    for op, x in moves:
        steps.append((value, op, x, apply(value, op, x)))
        value = steps[-1][3]
    return steps


def iter_problems(seed):
    """Distinct problems, one after another, deterministic per seed; `solution` is the default
    reference."""
    rng, seen = random.Random(seed), set()
    while True:
        question = random_question(rng)
        if question in seen:
            continue
        seen.add(question)
        yield {"id": f"toy-{seed}-{len(seen) - 1:05d}", "question": question,
               "answer": str(chain_steps(question)[-1][3]), "solution": reference_solution(question)}


def generate_problems(n, seed):
    return list(itertools.islice(iter_problems(seed), n))


# ---------------------------------------------------------------------------------------------
# Surface styles. A solution writes all its steps in one style, so the solver's correct steps
# have idiosyncratic phrasing, as a real model's do. "prose" is written by references only.

STYLES = ("plain", "spaced", "flipped", "words", "arrow")
REFERENCE_STYLE = "prose"

INT = r"(?:0|-?[1-9]\d*)"  # canonical integers only (no "07", no "-0"): parsing round-trips
NAT = r"(?:0|[1-9]\d*)"
STEP_PATTERNS = [  # (style, pattern, op when the pattern spells it in words)
    ("plain", rf"(?P<a>{INT})(?P<op>[+-])(?P<b>{NAT})=(?P<r>{INT})", None),
    ("spaced", rf"(?P<a>{INT}) (?P<op>[+-]) (?P<b>{NAT}) = (?P<r>{INT})", None),
    ("flipped", rf"(?P<r>{INT})=(?P<a>{INT})(?P<op>[+-])(?P<b>{NAT})", None),
    ("words", rf"add (?P<b>{NAT}) to (?P<a>{INT}): (?P<r>{INT})", "+"),
    ("arrow", rf"(?P<a>{INT})(?P<op>[+-])(?P<b>{NAT}) -> (?P<r>{INT})", None),
    ("words", rf"take (?P<b>{NAT}) from (?P<a>{INT}): (?P<r>{INT})", "-"),
    ("prose", rf"(?P<a>{INT}) plus (?P<b>{NAT}) is (?P<r>{INT})", "+"),
    ("prose", rf"(?P<a>{INT}) minus (?P<b>{NAT}) is (?P<r>{INT})", "-"),
]


def format_step(a, op, b, result, style):
    if style == "plain":
        return f"{a}{op}{b}={result}"
    if style == "spaced":
        return f"{a} {op} {b} = {result}"
    if style == "flipped":
        return f"{result}={a}{op}{b}"
    if style == "words":
        return f"add {b} to {a}: {result}" if op == "+" else f"take {b} from {a}: {result}"
    if style == "arrow":
        return f"{a}{op}{b} -> {result}"
    if style == "prose":
        return f"{a} {'plus' if op == '+' else 'minus'} {b} is {result}"
    raise ValueError(f"unknown style {style!r}")


def parse_step(text):
    """(a, op, b, result, style), or None when `text` is no step in any style.

    `result` is whatever the writer wrote, right or wrong; the arithmetic is not checked here."""
    for style, pattern, word_op in STEP_PATTERNS:
        m = re.fullmatch(pattern, text) if isinstance(text, str) else None
        if m:
            return int(m["a"]), word_op or m["op"], int(m["b"]), int(m["r"]), style
    return None


def restyle_step(text):
    """One step rewritten in the reference-only surface form (same values), or None."""
    step = parse_step(text)
    return format_step(*step[:4], REFERENCE_STYLE) if step else None


def is_world_model(model):
    """True for a named world (model=toy, model=toy-v2) and for any built world's folder or its
    model/ folder (build.json in the folder or beside it)."""
    return world_root(model) is not None


def budget(root=None):
    """The toy world's one length budget: build.json's max_new_tokens (the default if unbuilt)."""
    root = root or WORLD
    try:
        with open(os.path.join(root, "build.json")) as f:
            return json.load(f)["settings"]["max_new_tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return (named_settings(root) or BuildSettings()).max_new_tokens


def solve(question, style):
    """The correct left-to-right trace in `style`."""
    steps = chain_steps(question)
    return render_steps([format_step(*s, style) for s in steps], str(steps[-1][3]))


# ---------------------------------------------------------------------------------------------
# Reference solutions: a different derivation, as in real datasets. The grouped route totals the
# added terms, totals the taken terms, then takes the difference. Its intermediate values must
# never line up with the chain's (a prototype's "additions first" coincided 69 % of the time),
# so it tries orders of the terms until the sequence of values differs.

def sum_steps(terms, start_at_zero=False):
    """Steps that total `terms` left to right (counting up from 0 when start_at_zero)."""
    if not terms:
        return []
    value, rest = (0, terms) if start_at_zero else (terms[0], terms[1:])
    steps = []
    for x in rest:
        steps.append((value, "+", x, value + x))
        value += x
    return steps


def grouped_route(question):
    """Total the added terms, total the taken terms, take the difference, as (a, op, b, r) steps."""
    first, moves = parse_question(question)
    added = [first] + [x for op, x in moves if op == "+"]
    taken = [x for op, x in moves if op == "-"]
    chain_values = [r for *_, r in chain_steps(question)]
    difference = [(sum(added), "-", sum(taken), sum(added) - sum(taken))] if taken else []
    # Reversed order first (it rarely coincides), then every other order of the terms.
    for added_order in itertools.permutations(added[::-1]):
        for taken_order in itertools.permutations(taken[::-1]):
            steps = sum_steps(added_order) + sum_steps(taken_order) + difference
            if [r for *_, r in steps] != chain_values:
                return steps
    # Every order passes through the chain's values (3+3+3, 9-3-3): count up from zero instead.
    return sum_steps(added, start_at_zero=True) + sum_steps(taken) + difference


def reference_solution(question, order="grouped", phrasing="other"):
    """A step-tagged reference. order: "grouped" (a different route) | "chain" (the solver's);
    phrasing: "other" (the reference-only style) | "same" (the solver's most common, a+b=r)."""
    steps = {"grouped": grouped_route, "chain": chain_steps}[order](question)
    style = {"other": REFERENCE_STYLE, "same": "plain"}[phrasing]
    return render_steps([format_step(*s, style) for s in steps], str(steps[-1][3]))


# ---------------------------------------------------------------------------------------------
# The frozen rule-based critic (PAPER.md §4).

def critique_case(question, response, gold_answer):
    """(case, critique): the step-aligned critique of `response` and which case produced it.

    The rollout's steps are walked against the chain. A step equal to the next chain step is
    kept verbatim; one equal to a later chain step means the solver skipped steps, which are
    inserted (in the solver's style) before it; anything else stops the walk. Then the rest of
    the chain is written in the solver's style (the style most of its steps use; a+b=r if none),
    and the gold answer closes it. The stopping step is never restated. Cases:
      A  every step right, nothing missing, right answer: the rollout reproduced exactly;
      B  right answer, some step missing: reproduced with the missing steps inserted;
      C  unfinished or unparseable (no answer tag, truncated or garbage step, bad tags): the
         correct prefix kept verbatim, then the remaining chain steps and the answer;
      D  wrong (a wrong step, an extra step, or a wrong answer): the steps before the earliest
         error verbatim, the corrected step in the solver's style, the rest, the right answer.
    """
    chain = chain_steps(question)
    gold = str(chain[-1][3])
    assert gold == str(gold_answer).strip(), f"gold answer {gold_answer!r} does not fit {question}"
    try:
        texts, answer = parse_steps(response)
    except ValueError:  # misnumbered step tags: nothing can be quoted safely
        texts, answer = [None], None
    parsed = [parse_step(t) for t in texts]
    styles = Counter(p[4] for p in parsed if p)
    style = styles.most_common(1)[0][0] if styles else "plain"

    kept, k, inserted, stop = [], 0, False, None
    for text, step in zip(texts, parsed):
        if step is None:
            stop = "unparseable"
            break
        later = [j for j in range(k, len(chain)) if chain[j] == step[:4]]
        if not later:
            stop = "wrong"
            break
        kept += [format_step(*chain[i], style) for i in range(k, later[0])]  # skipped steps
        inserted |= later[0] > k
        kept.append(text)
        k = later[0] + 1
    rest = [format_step(*s, style) for s in chain[k:]]

    if stop == "unparseable" or (stop is None and answer is None):
        case = "C"
    elif stop == "wrong" or answer != gold:
        case = "D"
    else:
        case = "B" if inserted or rest else "A"
    return case, render_steps(kept + rest, gold)


def rule_critique(question, response, gold_answer):
    """The step-aligned critique of `response` (a step-tagged string); see critique_case."""
    return critique_case(question, response, gold_answer)[1]


def check_rule_critic(records):
    """critic=rule reads toy chains only: a one-line error for data it cannot critique."""
    for r in records:
        if not re.fullmatch(r"\d+([+-]\d+)+", r["question"].strip()) or \
                str(chain_steps(r["question"])[-1][3]) != str(r["answer"]).strip():
            raise common.UserError(f"critic=rule critiques toy arithmetic chains only, and question id {r['id']} is "
                            f"not one (or its answer does not fit it); use critic=hf or critic=http")


class RuleCritic:
    """The toy world's frozen critic, with the interface of critic.py's model critics."""

    def check(self):
        pass

    def __call__(self, questions, responses, solutions, answers):
        return [rule_critique(q, r, a) for q, r, a in zip(questions, responses, answers, strict=True)]


# ---------------------------------------------------------------------------------------------
# Tokenizer: one token per character, plus single-token chat specials and step tags.

SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|user|>", "<|assistant|>", "<|end|>"]
TAG_TOKENS = [f"<step_{i}>" for i in range(1, 10)] + ["<answer>"]
ALPHABET = [chr(c) for c in range(32, 127)] + ["\n"]  # printable ASCII covers every prompt
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + TAG_TOKENS + ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", unk_token="<|unk|>",
                                  eos_token="<|end|>", padding_side="left",
                                  clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    # Tags are ordinary added tokens: one token each, and kept by skip_special_tokens=True.
    tok.add_tokens(TAG_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(tok, seed):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    # Plain sampling by default: no hidden top-k/top-p in anyone's generate() call.
    model.generation_config.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return model


# ---------------------------------------------------------------------------------------------
# Build settings.

@dataclass
class BuildSettings:
    seed: int = 0
    steps: int = 2000             # pretraining steps: a fixed count, so the build is deterministic
    batch_size: int = 32
    lr: float = 1e-3              # lr 3e-3 stalled in MEASURED.md; 2e-3 learned slower here
    warmup: int = 50              # linear warm-up steps
    decay: float = 0.25           # last share of the steps, lr decays linearly to lr / 10 (most of
                                  # the accuracy appears during this decay)
    mix: tuple = (0.5, 0.35, 0.15)  # shares of plain / critique / reference examples
    styles: tuple = ("plain",)    # the solver's surface styles. v1 had four, unequally hard
                                  # (plain 32 %, flipped 14 %), so GRPO could win by choosing a
                                  # style. One style leaves arithmetic the only lever.
    faulty_share: float = 0.3     # ASSUMPTION: the solver's misconceptions. This share of the step
    fault_rate: float = 1.0       # facts (a, op, b) has one wrong result, which the solver's own
                                  # traces write at this rate (faulty_facts). 1.0 (v3): it fails
                                  # them systematically, the paper's regime, where its own samples
                                  # rarely hold the fix; v2's 0.8 wrote them right a fifth of the
                                  # time, which GRPO's reward found (the toy-v2 world). Without
                                  # misconceptions one style made the 1 M solver 98 % right; random
                                  # slips instead were unlearned by every arm in 5 steps: noise.
    recovery: float = 0.3         # ASSUMPTION: share of critique examples whose response departs
                                  # from the critique at one step (a wrong result, no loss on it)
                                  # and continues correctly from its own state; 0 = v1's teacher,
                                  # which only ever saw the critique copied and so pasted the
                                  # critique's digits after a student's error
    copy_prob: float = 0.5        # ASSUMPTION: chance a reference-conditioned target copies it
    critique_min_ops: int = 3     # critique examples use chains of >= this many operations: the
                                  # filter keeps long chains, where copying a critique is hardest
    n_train: int = 320
    n_test: int = 200
    n_transfer: int = 200         # the transfer split: filtered problems none of whose faulty facts
                                  # lies on any train question's chain (build_transfer)
    samples: int = 16             # samples per problem for the difficulty filter (Avg@16)
    max_correct: int = 4          # keep problems with at most this many correct (Avg@16 < 5/16)
    max_new_tokens: int = 64      # THE length budget: filter, training and evaluation all use it
                                  # (v1 filtered at 96 but trained at 64, cutting its "words"
                                  # traces); a 4-step plain trace is about 46 tokens
    score_batch: int = 1024       # rows per generate() call when scoring


def check_settings(settings):
    """A one-line UserError for the first setting out of its range, before a build starts (a NaN
    or a share above 1 would otherwise cost a 6-minute build and give a world of nonsense)."""
    s, finite = settings, lambda x: isinstance(x, (int, float)) and math.isfinite(x)
    shares = ("decay", "faulty_share", "fault_rate", "recovery", "copy_prob")
    for name in ("lr", *shares):
        if not finite(getattr(s, name)):
            raise common.UserError(f"build setting {name} must be a finite number, got {getattr(s, name)}")
    rules = [
        ("seed", s.seed >= 0, "must be >= 0"), ("steps", s.steps >= 1, "must be >= 1"),
        ("batch_size", s.batch_size >= 1, "must be >= 1"), ("lr", 0 < s.lr <= 1, "must lie in (0, 1]"),
        ("warmup", s.warmup >= 1, "must be >= 1 (steps of linear warm-up)"),
        ("decay", 0 < s.decay <= 1, "must lie in (0, 1] (the share of steps whose lr decays)"),
        *[(name, 0 <= getattr(s, name) <= 1, "must lie in [0, 1]") for name in shares[1:]],
        ("mix", len(s.mix) == 3 and all(finite(x) and x >= 0 for x in s.mix) and sum(s.mix) > 0,
         "must be three shares >= 0 (plain, critique, reference), not all 0"),
        ("styles", len(s.styles) > 0 and set(s.styles) <= set(STYLES), f"must name some of {','.join(STYLES)}"),
        ("critique_min_ops", MIN_OPS <= s.critique_min_ops <= MAX_OPS, f"must lie in {MIN_OPS}..{MAX_OPS}"),
        ("n_train", s.n_train >= 1, "must be >= 1"), ("n_test", s.n_test >= 1, "must be >= 1"),
        ("n_transfer", s.n_transfer >= 0, "must be >= 0 (0 = no transfer split)"),
        ("samples", s.samples >= 1, "must be >= 1"),
        ("max_correct", 0 <= s.max_correct <= s.samples, f"must lie in 0..samples ({s.samples})"),
        ("max_new_tokens", 1 <= s.max_new_tokens <= 512, "must lie in 1..512 (a 4-step trace is ~46 tokens)"),
        ("score_batch", s.score_batch >= s.samples, f"must be >= samples ({s.samples})"),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise common.UserError(f"build setting {name}={getattr(s, name)!r} {rule}")
    return settings


# ---------------------------------------------------------------------------------------------
# Pretraining mixture. The prompts come from contexts.py, so training later sees exactly them.

def corrupted_attempt(rng, question, styles=STYLES):
    """A rollout to critique: correct (A), a step dropped (B), truncated (C) or wrong (D)."""
    style, steps = rng.choice(styles), chain_steps(question)
    case = rng.choices("ABCD", weights=(0.15, 0.05, 0.2, 0.6))[0]
    if case == "B":
        texts = [format_step(*s, style) for s in steps]
        del texts[rng.randrange(len(texts))]
        return render_steps(texts, str(steps[-1][3]))
    if case == "C":
        full = solve(question, style)
        return full[:rng.randrange(len(full))]
    if case == "D":  # one step's result is off; later steps carry the wrong value through
        bad = rng.randrange(len(steps))
        texts, value = written_steps(question, style, lambda i, a, op, b: apply(a, op, b) + (
            rng.choice([-10, -2, -1, 1, 2, 10]) if i == bad else 0))
        return render_steps(texts, str(value))
    return solve(question, style)


def written_steps(question, style, write):
    """The chain's step texts as a solver writes them: `write(i, a, op, b)` is the result written at
    step i, and each step starts from the previous *written* value. Returns (texts, last value)."""
    texts, value = [], parse_question(question)[0]
    for i, (_, op, b, _) in enumerate(chain_steps(question)):
        result = write(i, value, op, b)
        texts.append(format_step(value, op, b, result, style))
        value = result
    return texts, value


def departing_trace(rng, question, style):
    """A response that follows the chain (the critique's route) up to a random step, writes a wrong
    result there and then continues correctly *from its own wrong value*, as a solver that
    slipped would: (text, (start, end)), the character span of the wrong result."""
    bad = rng.randrange(len(chain_steps(question)))

    def write(i, a, op, b):
        right = apply(a, op, b)
        return right if i != bad else rng.choice(
            [x for x in (right - 10, right - 2, right - 1, right + 1, right + 2, right + 10) if x >= 0])

    texts, value = written_steps(question, style, write)
    head = render_steps(texts[:bad + 1], "")[:-len(f" {ANSWER} ")]  # the trace up to the wrong step
    m = next(m for name, pattern, _ in STEP_PATTERNS if name == style
             for m in [re.fullmatch(pattern, texts[bad])] if m)
    start = len(head) - len(texts[bad])
    return render_steps(texts, str(value)), (start + m.start("r"), start + m.end("r"))


def faulty_facts(seed, share):
    """The solver's misconceptions: a fixed random `share` of the step facts (a, op, b) within the
    world's ranges, each mapped to one wrong result (off by 1 or 2), deterministic per seed."""
    rng, faults = random.Random(f"facts-{seed}"), {}
    for a in range(MIN_VALUE, MAX_VALUE + 1):
        for op in "+-":
            for b in OPERANDS:
                right = apply(a, op, b)
                if MIN_VALUE <= right <= MAX_VALUE and rng.random() < share:
                    faults[(a, op, b)] = rng.choice([x for x in (right - 2, right - 1, right + 1, right + 2)
                                                     if x >= 0])
    return faults


def solver_trace(rng, question, style, faults, rate):
    """The chain trace as the solver writes it: at a faulty fact it writes the fact's wrong result
    with probability `rate`, and the next step goes on from the written value."""
    def write(i, a, op, b):
        return faults[(a, op, b)] if (a, op, b) in faults and rng.random() < rate else apply(a, op, b)
    texts, value = written_steps(question, style, write)
    return render_steps(texts, str(value))


def training_example(rng, tok, settings, faults):
    """(prompt_ids, response_ids, no_loss): one example of the mixture; the response ends with
    eos; no_loss is a (start, end) range of response tokens that carry no loss, or None. `faults`
    are the solver's misconceptions (faulty_facts)."""
    kind = rng.choices(["plain", "critique", "reference"], weights=settings.mix)[0]
    question = random_question(rng, settings.critique_min_ops if kind == "critique" else MIN_OPS)
    style = rng.choice(settings.styles)
    target, no_loss = solve(question, style), None  # the model's own trace, unless replaced below
    if kind == "plain":  # the solver's own work, misconceptions included
        target = solver_trace(rng, question, style, faults, settings.fault_rate)
        prompt = student_prompt_ids(tok, question, prompts="toy", thinking=False)
    elif kind == "critique":
        gold = str(chain_steps(question)[-1][3])
        critique = rule_critique(question, corrupted_attempt(rng, question, settings.styles), gold)
        target = critique
        if rng.random() < settings.recovery:  # the response leaves the critique at one step
            critique_style = response_style(critique)
            target, (start, end) = departing_trace(rng, question, critique_style)
            count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
            no_loss = (count(target[:start]), count(target[:end]))
        prompt = teacher_prompt_ids(tok, question, critique, "critique", prompts="toy",
                                    thinking=False)
    else:  # mostly the default reference, sometimes the other knob settings
        order, phrasing = ("grouped", "other") if rng.random() < 0.7 else rng.choice(
            [("grouped", "same"), ("chain", "other"), ("chain", "same")])
        reference = reference_solution(question, order, phrasing)
        if rng.random() < settings.copy_prob:
            target = reference
        else:  # its own work beside the reference: its misconceptions are still its own
            target = solver_trace(rng, question, style, faults, settings.fault_rate)
        prompt = teacher_prompt_ids(tok, question, reference, "reference", prompts="toy",
                                    thinking=False)
    return prompt, tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], no_loss


def batches(rng, tok, settings, bucket=64):
    """Length-bucketed batches: sort `bucket` batches' worth of examples by length, cut, shuffle."""
    faults = faulty_facts(settings.seed, settings.faulty_share)
    while True:
        pool = [training_example(rng, tok, settings, faults) for _ in range(bucket * settings.batch_size)]
        pool.sort(key=lambda ex: len(ex[0]) + len(ex[1]))
        chunks = [pool[i:i + settings.batch_size] for i in range(0, len(pool), settings.batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def response_loss(model, batch, pad_id):
    """Mean cross-entropy over response tokens only (prompt, padding and no_loss spans carry none)."""
    rows = build_rows([p for p, _, _ in batch], [r for _, r, _ in batch], pad_id)
    T = rows["response_mask"].shape[1]
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                   position_ids=rows["position_ids"]).logits[:, -T - 1:-1]  # (B, T, V)
    targets = rows["input_ids"][:, -T:]                                        # (B, T)
    mask = rows["response_mask"].clone()
    for b, (_, response, no_loss) in enumerate(batch):
        if no_loss:  # responses are right-aligned in the (B, T) grid
            mask[b, T - len(response) + no_loss[0]:T - len(response) + no_loss[1]] = False
    return torch.nn.functional.cross_entropy(logits[mask], targets[mask])


def pretrain(model, tok, settings, progress=True):
    from tqdm import tqdm
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    # Warm-up, hold, then a linear decay to lr / 10 over the last `decay` share of the steps.
    decay_start = settings.steps * (1 - settings.decay)
    scale = lambda s: min((s + 1) / settings.warmup, 1.0,
                          1.0 - 0.9 * (s - decay_start) / (settings.steps - decay_start))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
    model.train()
    stream, losses = batches(rng, tok, settings), []
    for _ in tqdm(range(settings.steps), desc="pretrain", mininterval=5,
                  disable=not progress or not common.progress_bars()):
        loss = response_loss(model, next(stream), tok.pad_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-50:]) / len(losses[-50:])


# ---------------------------------------------------------------------------------------------
# Sampling and the difficulty filter.

def sample(model, tok, prompts, max_new_tokens=64, temperature=1.0, batch_size=1024):
    """One sampled response (text, specials stripped) per prompt, in big left-padded batches with a
    static KV cache (common.generate)."""
    responses, _ = common.generate(model, tok, prompts, max_new_tokens, temperature, batch_size=batch_size,
                                   static_cache=True)
    return tok.batch_decode(responses, skip_special_tokens=True)


def is_correct(response, answer):
    """The toy reward: critic.reward with the exact integer check, the one training uses here."""
    return critic.reward(response, answer, exact=True) == 1.0


def score(model, tok, problems, settings):
    """Samples per problem (plain prompt, T = 1): a list of `settings.samples` texts each."""
    k = settings.samples
    prompts = [student_prompt_ids(tok, p["question"], prompts="toy", thinking=False)
               for p in problems for _ in range(k)]
    texts = sample(model, tok, prompts, settings.max_new_tokens, 1.0, settings.score_batch)
    return [texts[i * k:(i + 1) * k] for i in range(len(problems))]


def response_style(text):
    """The style of a response's first step ("none" when it has no parseable first step)."""
    try:
        steps = parse_steps(text)[0]
    except ValueError:
        return "none"
    step = parse_step(steps[0]) if steps else None
    return step[4] if step else "none"


def trace_stats(texts, correct):
    """What a toy response gets right, to attribute a change in accuracy (eval.py logs these):
    step_arith: share of parsed steps whose written result is right for their written operands;
    step_chain: share of steps after the first whose first operand is the previous written result;
    answer_own: share of responses with steps and an answer whose answer is their last result;
    styles: share of responses per style of the first step; style_accuracy: accuracy per style."""
    arith, chain, own, styles, hits = [], [], [], Counter(), Counter()
    for text, ok in zip(texts, correct):
        style = response_style(text)
        styles[style] += 1
        hits[style] += bool(ok)
        try:
            steps, answer = parse_steps(text)
        except ValueError:
            continue
        parsed = [parse_step(t) for t in steps]
        for i, step in enumerate(parsed):
            if step is None:
                continue
            arith.append(apply(*step[:3]) == step[3])
            if i and parsed[i - 1]:
                chain.append(step[0] == parsed[i - 1][3])
        if answer is not None and parsed and parsed[-1]:
            own.append(answer == str(parsed[-1][3]))
    mean = lambda flags: sum(flags) / len(flags) if flags else None
    return {"step_arith": mean(arith), "step_chain": mean(chain), "answer_own": mean(own),
            "styles": {k: v / len(texts) for k, v in styles.most_common()},
            "style_accuracy": {k: hits[k] / v for k, v in styles.most_common()}}


def result_offset(text, k):
    """Character offset of the result of step k (0-based) in a step-tagged text, or None."""
    tags = list(re.finditer(r"<step_\d+>\s*", text))
    if k >= len(tags):
        return None
    end = tags[k + 1].start() if k + 1 < len(tags) else text.find("<answer>", tags[k].end())
    body = text[tags[k].end():end if end >= 0 else len(text)].rstrip()
    for _, pattern, _ in STEP_PATTERNS:
        m = re.fullmatch(pattern, body)
        if m:
            return tags[k].end() + m.start("r")
    return None


@torch.inference_mode()
def after_error_mass(model, tok, rollouts, limit=600):
    """How the critique-conditioned teacher reads a student's error. For wrong rollouts, at each
    result after the first wrong step whose state-consistent value (right for the rollout's own
    operands) and the critique's value start with different digits: the teacher's probability of
    each first digit. v1's teacher put 0.89 on the critique's and 0.08 on the state's.
    rollouts: (question, response text) pairs. Returns {n, state_mass, critique_mass}."""
    probes = []  # (prompt ids + response prefix ids, state digit id, critique digit id)
    for question, text in rollouts:
        try:
            steps = [parse_step(t) for t in parse_steps(text)[0]]
        except ValueError:
            continue
        chain = chain_steps(question)
        if not all(steps) or len(steps) > len(chain):
            continue
        first = next((i for i, st in enumerate(steps) if st[:4] != chain[i]), None)
        if first is None:
            continue
        critique = rule_critique(question, text, str(chain[-1][3]))
        prompt = teacher_prompt_ids(tok, question, critique, "critique", prompts="toy", thinking=False)
        for k in range(first + 1, len(steps)):
            state, told = str(apply(*steps[k][:3])), str(chain[k][3])
            offset = result_offset(text, k)
            if offset is None or state[0] == told[0]:
                continue
            prefix = tok(text[:offset], add_special_tokens=False)["input_ids"]
            probes.append((prompt + prefix, tok.convert_tokens_to_ids(state[0]),
                           tok.convert_tokens_to_ids(told[0])))
        if len(probes) >= limit:
            break
    if not probes:
        return {"n": 0, "state_mass": None, "critique_mass": None}
    state_mass, critique_mass = [], []
    for i in range(0, len(probes), 256):
        part = probes[i:i + 256]
        width = max(len(p) for p, _, _ in part)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p, _, _ in part])
        mask = (ids != tok.pad_token_id).long()
        probs = model(input_ids=ids, attention_mask=mask,
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].softmax(-1)
        state_mass += probs[torch.arange(len(part)), [s for _, s, _ in part]].tolist()
        critique_mass += probs[torch.arange(len(part)), [c for _, _, c in part]].tolist()
    return {"n": len(probes), "state_mass": sum(state_mass) / len(probes),
            "critique_mass": sum(critique_mass) / len(probes)}


def build_data(model, tok, settings, progress=True):
    """Score fresh problems until n_train + n_test pass the difficulty filter; measure the base."""
    from tqdm import tqdm
    torch.manual_seed(settings.seed + 1)
    need = settings.n_train + settings.n_test
    per_call = max(1, min(settings.score_batch // settings.samples, need))  # problems per call
    pool = generate_problems(40 * need + per_call, settings.seed + 1)
    faults, fact_writes = faulty_facts(settings.seed, settings.faulty_share), Counter()
    kept, records, styles, hits = [], [], Counter(), Counter()  # records: (operations, share correct)
    bar = tqdm(total=need, desc="filter", disable=not progress or not common.progress_bars())
    while len(kept) < need:
        chunk = pool[len(records):len(records) + per_call]
        if not chunk:
            raise RuntimeError(f"only {len(kept)} of {len(pool)} problems passed the filter")
        for problem, texts in zip(chunk, score(model, tok, chunk, settings)):
            flags = [is_correct(t, problem["answer"]) for t in texts]
            records.append((len(parse_question(problem["question"])[1]), sum(flags) / len(texts)))
            for t, ok in zip(texts, flags):
                styles[response_style(t)] += 1
                hits[response_style(t)] += ok
                fact_writes.update(faulty_fact_writes(t, faults))
            if sum(flags) <= settings.max_correct and len(kept) < need:
                kept.append((problem, texts))
                bar.update(1)
    bar.close()
    by_ops = {n: [share for ops, share in records if ops == n]
              for n in sorted({ops for ops, _ in records})}
    stats = {"scored": len(records), "kept": len(kept),
             "plain_avg": sum(share for _, share in records) / len(records),
             "plain_avg_by_ops": {str(n): sum(v) / len(v) for n, v in by_ops.items()},
             "kept_at_zero": sum(not any(is_correct(t, p["answer"]) for t in texts)
                                 for p, texts in kept) / len(kept),
             "right_on_faulty": fact_writes["right"] / max(1, sum(fact_writes.values())),
             "faulty_writes": sum(fact_writes.values()),
             "kept_by_ops": dict(sorted(Counter(str(len(parse_question(p["question"])[1]))
                                               for p, _ in kept).items())),
             "style_mix": {k: v / sum(styles.values()) for k, v in styles.most_common()},
             "style_accuracy": {k: hits[k] / v for k, v in styles.most_common()},
             "teacher_after_error": after_error_mass(
                 model, tok, [(p["question"], t) for p, texts in kept for t in texts
                              if not is_correct(t, p["answer"])]),
             **follow_rates(model, tok, kept, settings)}
    return [p for p, _ in kept[:settings.n_train]], [p for p, _ in kept[settings.n_train:]], stats


def faulty_fact_writes(text, faults):
    """Counter of "right" / "wrong" over the response's parsed steps at a faulty fact: how often the
    solver writes a misconception right (the fix it could find in its own samples)."""
    try:
        steps = [parse_step(t) for t in parse_steps(text)[0]]
    except ValueError:
        return Counter()
    return Counter("right" if st[3] == apply(*st[:3]) else "wrong" for st in steps
                   if st and st[:3] in faults)


def chain_facts(question):
    return {step[:3] for step in chain_steps(question)}


def build_transfer(model, tok, settings, train, taken):
    """The transfer split: problems that pass the same difficulty filter, have a faulty fact, and
    none of whose faulty facts lies on any train question's chain (nor are they train or test
    questions, `taken`). An arm that improves here learned to repair, not the train set's facts."""
    if not settings.n_transfer:
        return [], {}
    torch.manual_seed(settings.seed + 2)
    faults = faulty_facts(settings.seed, settings.faulty_share)
    seen_facts = set().union(*(chain_facts(p["question"]) for p in train)) & set(faults)
    stream = itertools.islice(iter_problems(settings.seed + 2),
                              100 * (settings.n_train + settings.n_test + settings.n_transfer))
    candidates = (p for p in stream if p["question"] not in taken and chain_facts(p["question"]) & set(faults)
                  and not chain_facts(p["question"]) & seen_facts)
    kept, per_call = [], max(1, settings.score_batch // settings.samples)
    while len(kept) < settings.n_transfer:
        chunk = list(itertools.islice(candidates, per_call))
        if not chunk:
            raise RuntimeError(f"only {len(kept)} transfer problems passed the filter; lower --n-transfer")
        for problem, texts in zip(chunk, score(model, tok, chunk, settings)):
            if sum(is_correct(t, problem["answer"]) for t in texts) <= settings.max_correct:
                kept.append({**problem, "id": problem["id"].replace("toy-", "transfer-", 1)})
    return kept[:settings.n_transfer], {"faulty_facts": len(faults),
                                        "transfer_faulty_facts": len(set(faults) - seen_facts)}


def follow_rates(model, tok, scored, settings):
    """Accuracy (T = 1) with a critique of the model's own wrong attempt, and with the reference;
    `ceilings`: the same for every self-distillation arm's context (reference_aligned: the toy dial's
    chain route in the solver's wording)."""
    wrong = [(p, t) for p, texts in scored
             for t in [next((t for t in texts if not is_correct(t, p["answer"])), None)] if t]
    critiques = [rule_critique(p["question"], t, p["answer"]) for p, t in wrong]
    prompts = [teacher_prompt_ids(tok, p["question"], c, "critique", prompts="toy", thinking=False)
               for (p, _), c in zip(wrong, critiques)]
    prompts += [teacher_prompt_ids(tok, p["question"], p["solution"], "reference", prompts="toy",
                                   thinking=False) for p, _ in scored]
    texts = sample(model, tok, prompts, settings.max_new_tokens, 1.0, settings.score_batch)
    with_critique, with_reference = texts[:len(wrong)], texts[len(wrong):]
    problems = [p for p, _ in scored]
    mean = lambda flags: sum(flags) / max(1, len(flags))
    # The other arms' contexts on the same wrong attempts, sampled after the two above (so adding
    # them changed none of the earlier numbers): each self-distillation arm's ceiling, the teacher's
    # accuracy with the arm's own context (the student at best becomes it).
    contexts_of = {
        "critique_quoting": [critique_form("critique_quoting", t, c) for (_, t), c in zip(wrong, critiques)],
        "critique_no_prefix": [critique_form("critique_no_prefix", t, c, restyle_step)
                               for (_, t), c in zip(wrong, critiques)],
        "reference_aligned": [reference_solution(p["question"], "chain", "same") for p in problems]}
    askers = {"critique_quoting": [p for p, _ in wrong], "critique_no_prefix": [p for p, _ in wrong],
              "reference_aligned": problems}  # a critique answers a wrong attempt; a reference, the question
    rows = [(arm, p, c) for arm, texts_ in contexts_of.items() for p, c in zip(askers[arm], texts_)]
    more = sample(model, tok, [teacher_prompt_ids(tok, p["question"], c, arm.split("_")[0], prompts="toy",
                                                  thinking=False) for arm, p, c in rows],
                  settings.max_new_tokens, 1.0, settings.score_batch)
    ceilings = {arm: mean([is_correct(t, p["answer"]) for t, (a, p, _) in zip(more, rows) if a == arm])
                for arm in contexts_of}
    critique_accuracy = mean([is_correct(t, p["answer"]) for t, (p, _) in zip(with_critique, wrong)])
    reference_accuracy = mean([is_correct(t, p["answer"]) for t, p in zip(with_reference, problems)])
    return {"critique_n": len(wrong),
            "critique_accuracy": critique_accuracy,
            "critique_exact_copy": mean([t == c for t, c in zip(with_critique, critiques)]),
            "reference_accuracy": reference_accuracy,
            "reference_exact_copy": mean([t == p["solution"]
                                          for t, p in zip(with_reference, problems)]),
            "ceilings": {"critique": critique_accuracy, "reference": reference_accuracy, **ceilings}}


# ---------------------------------------------------------------------------------------------
# Build once, cache in a folder. build.json is written last: a folder without it is incomplete.

def paths(root):
    return {"model_dir": os.path.join(root, "model"), "train": os.path.join(root, "train.jsonl"),
            "test": os.path.join(root, "test.jsonl"), "transfer": os.path.join(root, "transfer.jsonl")}


HERE = os.path.dirname(os.path.abspath(__file__))
WORLDS = {  # model=NAME: a folder beside this file, and the BuildSettings fields it changes
    "toy": ("toy_world", {}),  # v3, the headline: the solver fails its faulty facts systematically
    "toy-v2": ("toy_world_v2", {"fault_rate": 0.8}),  # the contrast: the fix is in its own samples
}
WORLD = os.path.join(HERE, WORLDS["toy"][0])


def world_root(model):
    """The folder of the toy world `model` names: a name of WORLDS, or a built world's folder or
    its model/ folder; None for any other model."""
    if model in WORLDS:
        return os.path.join(HERE, WORLDS[model][0])
    path = os.path.abspath(model)
    return next((root for root in (path, os.path.dirname(path))
                 if os.path.isfile(os.path.join(root, "build.json"))), None)


def named_settings(root):
    """The BuildSettings of the named world whose folder `root` is; None for any other folder."""
    return next((BuildSettings(**changes) for folder, changes in WORLDS.values()
                 if os.path.abspath(root) == os.path.join(HERE, folder)), None)


def resolve_paths(cfg):
    """A run's model folder and data files. A toy world (named or a folder) gives its model and,
    for empty train_file / test_file, its data; any other model without data files gets the
    default world's data."""
    root = world_root(cfg.model)
    model, train, test = cfg.model, cfg.train_file, cfg.test_file
    if root or not train or not test:
        built = ensure_built(root or WORLD)
        model = built["model_dir"] if root else model
        train, test = train or built["train"], test or built["test"]
    return model, train, test


def transfer_path(cfg):
    """The toy world's transfer split (build_transfer) for a run on a toy world with the world's
    own test set; None otherwise, or when the world has none (built before v3, or n_transfer=0)."""
    root = world_root(cfg.model)
    if not root or cfg.test_file:
        return None
    path = paths(root)["transfer"]
    return path if os.path.isfile(path) and os.path.getsize(path) else None


def settings_changes(saved, settings):
    """The fields where a built world's settings (build.json) differ from `settings`."""
    asked = json.loads(json.dumps(asdict(settings)))  # tuples as lists, as build.json holds them
    return {k: (saved.get(k), v) for k, v in asked.items() if saved.get(k) != v}


def ensure_built(root=WORLD, progress=True, force=False, settings=None, threads=2):
    """{"model_dir", "train", "test", "transfer"} under `root`; builds them first when the folder
    is incomplete (no build.json) or `force` is set. `settings`: BuildSettings (default: the named
    world's, else BuildSettings()). A complete world built with other settings than asked (or than
    its name stands for) is an error that says how to rebuild: never silently used instead.

    threads: torch threads for the build (at most the machine's cores). On our 2-core machine two
    threads built the world 1.7x faster than one, bit-identical to it. With another busy process
    on the same cores, one thread is faster (two spin-wait on each other)."""
    out = paths(root)
    asked = settings or named_settings(root)
    settings = check_settings(asked or BuildSettings())
    done = all(map(os.path.exists, [os.path.join(root, "build.json"), out["model_dir"], out["train"], out["test"]]))
    if done and not force and asked:
        try:
            with open(os.path.join(root, "build.json")) as f:
                saved = json.load(f)["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise common.UserError(f"{root}/build.json cannot be read ({type(e).__name__}); rebuild the "
                                   f"world: python toy.py build --root {root} --force") from None
        changes = settings_changes(saved if isinstance(saved, dict) else {}, settings)
        if changes:
            name = next((n for n, (folder, _) in WORLDS.items() if os.path.join(HERE, folder) == os.path.abspath(root)), None)
            what = f"--world {name}" if name else f"--root {root}"
            listed = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in changes.items())
            raise common.UserError(f"the toy world in {root} was built with {listed}; rebuild it "
                                   f"(python toy.py build {what} --force, same flags) or use another folder")
    if not done and progress:
        print(f"the toy world is missing or incomplete in {root}; building it now (about 10 minutes on "
              f"2 CPU cores; `python toy.py build` does the same)", file=sys.stderr)
    if force or not done:
        previous = torch.get_num_threads()
        threads = min(threads, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        try:
            build(root, out, settings, progress, threads)
        finally:
            torch.set_num_threads(previous)
    return out


def build(root, out, settings, progress, threads):
    import transformers
    os.makedirs(root, exist_ok=True)
    if os.path.exists(os.path.join(root, "build.json")):
        os.remove(os.path.join(root, "build.json"))  # from here on the folder reads incomplete
    start = time.time()
    tok = make_tokenizer()
    model = make_model(tok, settings.seed)
    final_loss = pretrain(model, tok, settings, progress)
    shutil.rmtree(out["model_dir"] + ".tmp", ignore_errors=True)
    model.save_pretrained(out["model_dir"] + ".tmp")
    tok.save_pretrained(out["model_dir"] + ".tmp")
    shutil.rmtree(out["model_dir"], ignore_errors=True)
    os.replace(out["model_dir"] + ".tmp", out["model_dir"])
    pretrain_s = time.time() - start

    train, test, stats = build_data(model, tok, settings, progress)
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    transfer, transfer_stats = build_transfer(model, tok, settings, train,
                                              {p["question"] for p in train + test})
    for split, problems in [("train", train), ("test", test), ("transfer", transfer)]:
        common.write_atomic(out[split], "".join(json.dumps(p) + "\n" for p in problems))
    info = {"settings": asdict(settings), "final_loss": round(final_loss, 4),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": {"pretrain": round(pretrain_s), "total": round(time.time() - start),
                        "data": round(time.time() - start - pretrain_s)},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "threads": threads,
            "n_train": len(train), "n_test": len(test), "n_transfer": len(transfer), **stats,
            **transfer_stats}
    common.write_atomic(os.path.join(root, "build.json"), json.dumps(info, indent=1))  # last: complete


def summary(root):
    info = json.load(open(os.path.join(root, "build.json")))
    return (f"toy world in {root}/: base model ({info['parameters'] / 1e6:.2f} M parameters), "
            f"{info['n_train']} train / {info['n_test']} test problems\n"
            f"base model at T = 1: plain Avg@{info['settings']['samples']} "
            f"{info['plain_avg']:.3f} over {info['scored']} problems; with a critique of its own "
            f"wrong attempt {info['critique_accuracy']:.3f}; with the reference "
            f"{info['reference_accuracy']:.3f}\n"
            f"built in {info['seconds']['total']} s (pretraining {info['seconds']['pretrain']} s)")


def probe(root=WORLD, samples=4, seed=0):
    """Measure a built world's base model on its test set: trace statistics and how its teacher
    reads a student's error (after_error_mass). Runs on the v1 world too."""
    from transformers import AutoModelForCausalLM
    info = json.load(open(os.path.join(root, "build.json")))
    settings = BuildSettings(**{**asdict(BuildSettings()), **info["settings"], "samples": samples})
    out = paths(root)
    tok, model = make_tokenizer(), AutoModelForCausalLM.from_pretrained(out["model_dir"]).eval()
    problems = [json.loads(line) for line in open(out["test"])]
    torch.manual_seed(seed)
    texts = score(model, tok, problems, settings)
    flat = [(p, t) for p, group in zip(problems, texts) for t in group]
    correct = [is_correct(t, p["answer"]) for p, t in flat]
    stats = trace_stats([t for _, t in flat], correct)
    stats["accuracy"] = sum(correct) / len(correct)
    stats["teacher_after_error"] = after_error_mass(
        model, tok, [(p["question"], t) for (p, t), ok in zip(flat, correct) if not ok])
    return stats


def command_line(argv=None):
    """python toy.py build|probe [--world NAME | --root DIR] [--force] [--threads N] [--SETTING V ...]:
    every BuildSettings field is a flag (--fault-rate 0.9; tuples as comma lists, --mix 0.5,0.3,0.2),
    range-checked before a build starts and recorded in build.json."""
    parser = argparse.ArgumentParser(description="Build a toy world (base model + data), or probe a built one.")
    parser.add_argument("command", choices=["build", "probe"])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--world", choices=sorted(WORLDS), help="a named world (default toy; toy-v2 = the contrast)")
    where.add_argument("--root", help="a folder of your own (any build settings)")
    parser.add_argument("--force", action="store_true", help="rebuild a complete folder too")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (one when the cores are busy)")
    notes = common.field_help(BuildSettings)
    for f in dataclasses.fields(BuildSettings):
        convert = type(f.default)
        if convert is tuple:
            convert = lambda text, kind=type(f.default[0]): tuple(kind(x) for x in text.split(","))
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=convert, metavar="V",
                            help=f"build setting (default {f.default}) {notes.get(f.name, '')}".strip())
    args = parser.parse_args(argv)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildSettings)
             if getattr(args, f.name) is not None}
    root = os.path.join(HERE, WORLDS[args.world or "toy"][0]) if args.root is None else args.root
    if not root.strip():
        raise common.UserError("--root must name a folder")
    if os.path.exists(root) and not os.path.isdir(root):
        raise common.UserError(f"--root {root} exists and is not a folder")
    if args.threads < 1:
        raise common.UserError(f"--threads must be >= 1, got {args.threads}")
    if args.command == "probe":
        if flags:
            raise common.UserError("build settings (" + ", ".join(flags) + ") apply to `build` only")
        if not os.path.isfile(os.path.join(root, "build.json")):
            raise common.UserError(f"no built toy world in {root}; build it first: python toy.py build")
        torch.set_num_threads(args.threads)
        print(json.dumps(probe(root), indent=1))
        return
    named = named_settings(root)
    settings = BuildSettings(**{**asdict(named or BuildSettings()), **flags}) if named or flags else None
    if named and settings_changes(json.loads(json.dumps(asdict(named))), settings):
        raise common.UserError(f"a named world's folder ({root}) holds its own settings; build other "
                               f"settings into a folder of your own: --root DIR")
    ensure_built(root, progress=True, force=args.force, settings=settings, threads=args.threads)
    print(summary(root))


if __name__ == "__main__":
    with common.user_errors():
        command_line()
