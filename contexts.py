"""Every prompt the method uses, and the token-aligned rows the loss is computed on.

The student sees the question x; the teacher sees x and a context c (a reference solution or a
step-aligned critique). Both score the *same* response tokens y, so a row is built from token ids:

    student row: [pad ... pad | student_prompt(x)    | y]
    teacher row: [pad ... pad | teacher_prompt(x, c) | y]

Padding is on the left only (never between prompt and response), so every response ends at the
last column and response token t of row b sits at column L - len(y_b) + t in both rows.
"""
import bisect
import re

import torch

# ---------------------------------------------------------------------------------------------
# Prompt text. Two sets: "instruct" for real chat models, "toy" for the toy world's tiny
# character-level model (short, because every character is a token there).

PROMPTS = {
    "instruct": {
        "student": (
            "Solve the problem below. Write your reasoning as numbered steps, each opened by a tag "
            "<step_1>, <step_2>, ..., then give the final answer after the tag <answer>.\n\n"
            "Problem: {question}"
        ),
        "reference": (
            "Solve the problem below. Write your reasoning as numbered steps, each opened by a tag "
            "<step_1>, <step_2>, ..., then give the final answer after the tag <answer>.\n\n"
            "Problem: {question}\n\n"
            "A reference solution, written by someone else, follows. Use it to check your "
            "reasoning, then solve the problem your own way.\n\n{context}\n\n"
            "Now write your solution in the step format above."
        ),
        "critique": (
            "Solve the problem below. Write your reasoning as numbered steps, each opened by a tag "
            "<step_1>, <step_2>, ..., then give the final answer after the tag <answer>.\n\n"
            "Problem: {question}\n\n"
            "A reviewer went through your previous attempt step by step. Where it was right they "
            "kept your steps; at the first mistake they wrote the corrected step and finished the "
            "solution:\n\n{context}\n\n"
            "Now write your solution in the step format above."
        ),
    },
    "toy": {
        "student": "{question}",
        "reference": "{question}\nref: {context}",
        "critique": "{question}\nfix: {context}",
        # the toy critic's instruction (critic.critic_prompt; the instruct set's is there, in full):
        # the question, the gold answer and the attempt; it answers with the step-aligned critique
        "critic": "{question}\nanswer: {answer}\nattempt: {response}",
    },
}

TRUNCATION_MARKER = "\n[... middle of the context removed ...]\n"


def has_thinking_switch(tokenizer):
    """True when the chat template reads an `enable_thinking` flag (Qwen3 style)."""
    return "enable_thinking" in (tokenizer.chat_template or "")


def check_chat_template(tokenizer, where="the model"):
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {where} has no chat template; use an instruct/chat "
                         f"model or add a `chat_template` to its tokenizer_config.json")


def render_prompt(tokenizer, text, thinking):
    """Token ids of one user turn plus the assistant header, through the model's chat template.

    `thinking` is passed as `enable_thinking` only when the template supports it."""
    extra = {"enable_thinking": thinking} if has_thinking_switch(tokenizer) else {}
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, **extra)
    # The template already wrote any BOS token into the text, so add no special tokens here.
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def truncate_middle(tokenizer, context, max_tokens):
    """Cut the middle of a too-long context, keeping its start and end and a visible marker.

    Only the context is ever shortened: the question and the final instruction stay whole."""
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if max_tokens <= 0 or len(ids) <= max_tokens:
        return context
    head = max_tokens // 2
    tail = max_tokens - head
    return (tokenizer.decode(ids[:head]) + TRUNCATION_MARKER + tokenizer.decode(ids[-tail:]))


def student_prompt_ids(tokenizer, question, prompts="instruct", thinking=False):
    return render_prompt(tokenizer, PROMPTS[prompts]["student"].format(question=question), thinking)


# The teacher prompt each arm's context goes into: the two critique-form controls are critiques.
TEMPLATE_OF = {"reference": "reference", "critique": "critique", "critique_quoting": "critique",
               "critique_no_prefix": "critique"}


def teacher_prompt_ids(tokenizer, question, context, kind, prompts="instruct", thinking=False,
                       max_context_tokens=0):
    """The teacher's prompt: the question plus a context of `kind` (a key of TEMPLATE_OF)."""
    context = truncate_middle(tokenizer, context, max_context_tokens)
    text = PROMPTS[prompts][TEMPLATE_OF[kind]].format(question=question, context=context)
    return render_prompt(tokenizer, text, thinking)


# ---------------------------------------------------------------------------------------------
# Rows: [left pad | prompt | response], built from ids so the response is never re-tokenised.

def build_rows(prompt_ids, response_ids, pad_id):
    """Left-padded rows of prompt ‖ response.

    Returns input_ids, attention_mask, position_ids (B, L) and response_mask (B, T), where
    T = longest response and column j of the (B, T) grid is row position L - T + j: hidden state
    at position L - T - 1 + j predicts response column j. Shorter responses are right-aligned, so
    their first columns are masked out."""
    B = len(prompt_ids)
    T = max(len(r) for r in response_ids)
    L = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    L = max(L, T + 1)  # at least one prompt position precedes the first response token
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        row = list(p) + list(r)
        input_ids[b, L - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, L - len(row):] = 1
        response_mask[b, T - len(r):] = True
        assert input_ids[b, L - len(r):].tolist() == list(r)
    # Positions count real tokens only, so a left-padded row sees exactly what it would unpadded.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids, "response_mask": response_mask}


def build_pair(student_prompts, teacher_prompts, response_ids, pad_id):
    """Student and teacher rows over the same responses; asserts the response ids are identical."""
    student = build_rows(student_prompts, response_ids, pad_id)
    teacher = build_rows(teacher_prompts, response_ids, pad_id)
    T = student["response_mask"].shape[1]
    s_tail = student["input_ids"][:, -T:][student["response_mask"]]
    t_tail = teacher["input_ids"][:, -T:][teacher["response_mask"]]
    assert torch.equal(s_tail, t_tail), "student and teacher rows disagree on the response ids"
    assert torch.equal(student["response_mask"], teacher["response_mask"])
    return student, teacher


# ---------------------------------------------------------------------------------------------
# Step tags: "<step_1> ... <step_2> ... <answer> ...".

STEP_TAG = re.compile(r"<step_(\d+)>")
ANSWER_TAG = "<answer>"


def parse_steps(text):
    """Split a step-tagged text into (steps, answer).

    steps: the stripped text after each <step_k> tag, in order; answer: the stripped text after
    the first <answer> tag, or None when there is none. Text before the first tag is ignored.
    Raises ValueError when the tags are not numbered 1, 2, 3, ... in order."""
    body, _, answer = text.partition(ANSWER_TAG)
    parts = STEP_TAG.split(body)  # [before, "1", step1, "2", step2, ...]
    numbers = [int(n) for n in parts[1::2]]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"step tags are numbered {numbers}, expected 1..{len(numbers)}")
    steps = [s.strip() for s in parts[2::2]]
    return steps, (answer.strip() if _ else None)


def render_steps(steps, answer):
    """The inverse of parse_steps: "<step_1> a <step_2> b <answer> c"."""
    text = " ".join(f"<step_{i}> {s}" for i, s in enumerate(steps, start=1))
    return f"{text} {ANSWER_TAG} {answer}" if text else f"{ANSWER_TAG} {answer}"


def distilled_span(mask, lengths):
    """(B, T) the response tokens that enter the loss: all (length None) or the first `length`
    of each response (responses are right-aligned in the grid)."""
    span = mask.clone()
    T = mask.shape[1]
    for b, n in enumerate(lengths):
        if n is not None:
            start = T - int(mask[b].sum())
            span[b, start + n:] = False
    return span


# ---------------------------------------------------------------------------------------------
# Critique forms (the paper's §4): the aligned critique and the paper's two controls, as texts.

def first_differing_step(response_text, critique_text):
    """Index of the first step where critique and rollout differ (with a step-aligned critic, the
    earliest error), or None: unparseable tags, or no differing step among the shared ones."""
    if not isinstance(critique_text, str):  # the critic failed on this rollout
        return None
    try:
        ours, theirs = parse_steps(response_text)[0], parse_steps(critique_text)[0]
    except ValueError:
        return None
    return next((i for i in range(min(len(ours), len(theirs))) if ours[i] != theirs[i]), None)


def critique_form(form, response_text, critique_text, restyle=None):
    """The context text of one critique form for one rollout:
    critique:           the step-aligned critique as the critic wrote it;
    critique_quoting:   its first differing step k reads "<the rollout's step k> is wrong; correct:
                        <the critique's step k>", so the wrong tokens sit in the context;
    critique_no_prefix: the corrected trace without the solver's tokens: every step passed through
                        `restyle` (another surface form, same values) when given, else the
                        critique's steps from k on, renumbered (the solver's prefix dropped).
    A rollout with no differing step (a correct one) keeps the critique in the quoting form."""
    if form == "critique":
        return critique_text
    steps, answer = parse_steps(critique_text)
    k = first_differing_step(response_text, critique_text)
    if form == "critique_quoting":
        if k is None:
            return critique_text
        ours = parse_steps(response_text)[0]
        return render_steps(steps[:k] + [f"{ours[k]} is wrong; correct: {steps[k]}"] + steps[k + 1:], answer)
    if form == "critique_no_prefix":
        if restyle is not None:
            restyled = [restyle(s) for s in steps]
            if all(restyled):
                return render_steps(restyled, answer)
        return render_steps(steps[len(steps) if k is None else k:], answer)
    raise ValueError(f"unknown critique form {form!r}")


def departure_index(response_ids, critique_ids):
    """The first response token that leaves the critique's verbatim prefix: the first t with
    response_ids[t] != critique_ids[t] (or t = len(critique_ids): the response goes on past it).
    A response that is the critique followed by EOS departs at its EOS. Compared as token ids:
    the verbatim prefix tokenises as the response did, up to a token at the boundary."""
    n = min(len(response_ids), len(critique_ids))
    return next((t for t in range(n) if response_ids[t] != critique_ids[t]), n)


def span_end(tokenizer, response_ids, critique_text):
    """distill_span=through_first_divergence: the distilled span's length, through the first token
    that leaves the critique's verbatim prefix (contexts.distilled_span takes it)."""
    return 1 + departure_index(response_ids, tokenizer(critique_text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Where each step sits among a response's tokens (for the per-token advantage A_t).

def token_pieces(tokenizer, ids):
    """The text each token adds to the decoded response (prefix decodes, so pieces join up)."""
    prefixes = [tokenizer.decode(ids[:t], skip_special_tokens=False) for t in range(len(ids) + 1)]
    return [prefixes[t + 1][len(prefixes[t]):] for t in range(len(ids))]


def step_regions(pieces, wrong_step):
    """Token indices where each tag starts, and the masks prefix / wrong step / after (or None
    when the wrong step's tag is not found). The wrong step is its text after the tag, up to the
    next tag; its tag counts as prefix (the critique has the same tag)."""
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    tags = [(m.group(1), bisect.bisect_right(starts, m.start()) - 1, bisect.bisect_left(starts, m.end()))
            for m in re.finditer(r"<step_(\d+)>|<answer>", "".join(pieces))]
    boundaries = [first for _, first, _ in tags]
    wrong = next((i for i, (number, _, _) in enumerate(tags) if number == str(wrong_step + 1)), None)
    if wrong is None:
        return boundaries, None
    body_start = tags[wrong][2]
    body_end = tags[wrong + 1][1] if wrong + 1 < len(tags) else len(pieces)
    position = torch.arange(len(pieces))
    masks = (position < body_start, (position >= body_start) & (position < body_end), position >= body_end)
    return boundaries, masks


def advantage_stats(tokenizer, responses, advantages, texts, critiques):
    """`analysis/*` for the training log: mean A_t = log π_T(ŷ_t) − log π_θ(ŷ_t) over all distilled
    tokens, and over the wrong rollouts' correct prefix, first wrong step and the rest (the first
    step where rollout and critique differ; rollouts whose step cannot be located are left out)."""
    sums = {"prefix": [], "wrong": [], "after": []}
    for ids, A, text, critique in zip(responses, advantages, texts, critiques):
        wrong = first_differing_step(text, critique)
        if wrong is None:
            continue
        _, masks = step_regions(token_pieces(tokenizer, ids), wrong)
        if masks is None:
            continue
        for name, m in zip(sums, masks):
            sums[name].append(A[m])
    out = {"analysis/A_mean": torch.cat(advantages).mean().item() if advantages else None,
           "analysis/rollouts": len(sums["wrong"])}
    for name, parts in sums.items():
        values = torch.cat(parts) if parts else torch.zeros(0)
        out[f"analysis/A_{name}"] = values.mean().item() if values.numel() else None
    return out


# ---------------------------------------------------------------------------------------------
# What a response takes from the teacher's prompt and context (train/leak_rate, train/context_overlap).

LEAK_MARKERS = {"toy": ("ref:", "fix:"), "instruct": ("reference solution", "reviewer")}  # PROMPTS' own words


def leak_rate(texts, prompts_kind):
    """Share of responses that mention the teacher's privileged prompt (a context-leakage sign)."""
    markers = LEAK_MARKERS[prompts_kind]
    return sum(any(m in t for m in markers) for t in texts) / max(len(texts), 1)


def ngram_overlap(response, context, n=4):
    """Share of the response's token n-grams that also occur in the context (copying the context)."""
    grams = {tuple(response[i:i + n]) for i in range(len(response) - n + 1)}
    if not grams:
        return 0.0
    seen = {tuple(context[i:i + n]) for i in range(len(context) - n + 1)}
    return len(grams & seen) / len(grams)


def context_overlap(tokenizer, responses, context_texts):
    """Mean over responses of ngram_overlap with its own teacher context (0 where it has none)."""
    return sum(ngram_overlap(r, tokenizer(c, add_special_tokens=False)["input_ids"])
               for r, c in zip(responses, context_texts) if c) / max(len(responses), 1)
