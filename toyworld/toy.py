"""The toy world: the paper's experiment, shrunk until it runs on two CPU cores. This file is the
world itself; how its base model and data are built, and the named worlds, are toy_build.py's.

Task: left-to-right integer chains such as `2+7+5-9`, solved in the paper's step-tagged format
`<step_1> 2+7=9 <step_2> 9+5=14 <step_3> 14-9=5 <answer> 5`. This file owns

  1. the problem generator (operands 1-9, every intermediate value in 0-30, 2-4 operations);
  2. the solver's surface styles (one per solution) and the step parser;
  3. reference solutions: a different route (added terms, taken terms, difference) in a phrasing
     the solver never uses; the knobs `order` and `phrasing` turn that alignment dial;
  4. the frozen rule-based critic: the paper's four cases A-D (`RuleCritic`);
  5. a character tokenizer with a chat template and the tiny Llama (1.08 M parameters) that
     toy_build.py pretrains;
  6. `trace_stats`: what a response gets right (per-step arithmetic, chaining, answer = own last
     result, style mix), the attribution eval.py logs.

Prompts (contexts.PROMPTS["toy"] through the chat template; each tag and special is one token):
    student  <|user|>2+7+5-9<|end|><|assistant|>
    teacher  <|user|>2+7+5-9\\nfix: <critique><|end|><|assistant|>    (or "\\nref: <reference>")
    response <step_1> 2+7=9 ... <answer> 5<|end|>
    critic   <|user|>2+7+5-9\nanswer: 5\nattempt: <response><|end|><|assistant|>   (the learned critic, toy_critic.py)
"""
import itertools
import random
import re
from collections import Counter

import torch

from plumbing.common import UserError
from contexts import parse_steps, render_steps, teacher_prompt_ids

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
# The frozen rule-based critic (the paper's §4).


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
            raise UserError(f"critic=rule critiques toy arithmetic chains only, and question id {r['id']} is "
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


def make_model(tok, seed, hidden=128):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
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
# Instruments: what a response gets right, and how the teacher reads a student's error.

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

