"""Building a toy world (toy.py): pretraining its base model from scratch on a mixture, the
difficulty filter that picks its train and test problems, its transfer split, the instruments
that measure it, the named worlds, and the command line that builds and probes them.

`ensure_built()` builds the base model and the data sets once, deterministically from a seed, into a world's folder; build.json
records the settings, timings and the base model's measured accuracies (overall, per style, with
each arm's context: the `ceilings`), and the regime (`kept_at_zero`: kept problems at 0/16;
`right_on_faulty`: how often the solver writes a misconception right). Two named worlds ship, so
the quickstart starts at once (`model=NAME`; any built folder works as `model=DIR` too):

    toy     toy_world/     v3, the headline: fault_rate 1.0, the solver fails its misconceptions
                           systematically (the paper's regime: the fix is not in its samples)
    toy-v2  toy_world_v2/  the contrast: fault_rate 0.8, it writes them right a fifth of the time,
                           which a binary reward finds

    python -m toyworld.toy_build build --world toy --force          # rebuild a named world (bit-identical)
    python -m toyworld.toy_build build --root DIR --fault-rate 0.9  # any BuildSettings field is a checked flag
    python -m toyworld.toy_build build --root DIR --recovery 0      # a teacher that pastes the critique (2 below)
    python -m toyworld.toy_build probe [--world toy-v2]             # trace stats and the teacher's after-error mass
    python -m toyworld.toy_critic build --world toy [--force]       # its learned critics, beside it (toy_critic.py)

A built world asked for other settings than its build.json's is an error that says to rebuild; so
is a damaged one (a missing or cut file, a build.json that is not a world's record): it is never
rebuilt silently. A build goes into ROOT/.building under ROOT/.lock and replaces the old world only
once it has succeeded (a kill during that last move is finished by the next reader:
folders.recover); `build --force` with no flags keeps the settings its build.json records.
Besides train/test, a world has a transfer split (build_transfer): filtered problems none of whose
faulty facts lies on any train question's chain, evaluated at step 0 and at a run's last checkpoint.

What every world shares: arithmetic is the only lever (one solver style, a+b=r; what the solver gets
wrong is a fixed set of arithmetic facts, ASSUMPTION 0 below), and one length budget
(BuildSettings.max_new_tokens, 64) that the filter, training and evaluation all use
(selfdistill.resolve reads it from build.json). Why the worlds are built so, and how the earlier
ones misled: docs/toy_world.md and docs/history.md.

Choices built into the base model (they shape the comparison; say so next to any result):
  0. ASSUMPTION (`faulty_share`, `fault_rate`): a fixed 30 % of the step facts a±b have one wrong
     result, which the solver's own traces write every time in v3 (80 % in v2; faulty_facts,
     solver_trace). Its critique- and reference-conditioned examples write them right.
  1. It is pretrained to follow critiques: after `fix: <critique>` the target is the critique's
     trace. A real instruct model follows feedback only as well as it happens to.
  2. ASSUMPTION (`recovery`, v2): a share of the critique examples departs from the critique at one
     step (a wrong result, which carries no loss) and continues correctly from its own wrong value,
     so after a student's error the teacher follows the student's state, as a model reading its
     own work would, instead of pasting the critique's digits (which teaches wrong arithmetic
     after every error).
  3. ASSUMPTION: after `ref: <reference>` the target copies the reference with probability
     `copy_prob` (0.5) and is the model's own chain trace otherwise, so in-context use of a
     reference is partial by construction.
  4. Critique examples use chains of 3-4 operations (`critique_min_ops`): the filter keeps long
     chains, and copying a long critique is what the model learns last.
"""
import dataclasses
import itertools
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds, nothing written yet): exit 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import torch

from plumbing import common
import critic
from plumbing import options
from plumbing import runfolder
from plumbing import sampler
from contexts import student_prompt_ids, teacher_prompt_ids
from contexts import ANSWER_TAG as ANSWER, build_rows, critique_form, parse_steps, render_steps
from toyworld import folders
from toyworld.folders import (STAGING, WORLD, WORLD_ENTRIES, WORLDS, BuildSettings, check_settings, check_world,
                              damaged, interrupted_move, move_into_place, named_settings, paths, read_build_info,
                              rebuild_command, recover, settings_changes)
from toyworld.toy import (after_error_mass, MIN_OPS, MIN_VALUE, MAX_VALUE, OPERANDS, STEP_PATTERNS, STYLES, apply,
                 chain_steps, format_step, iter_problems, generate_problems, make_model, make_tokenizer,
                 parse_question, parse_step, random_question, reference_solution, response_style,
                 restyle_step, rule_critique, solve, trace_stats)

if __name__ == "__main__":  # imported: Ctrl-C is KeyboardInterrupt again, one line through common.user_errors
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
    static KV cache (sampler.generate)."""
    responses, _ = sampler.generate(model, tok, prompts, max_new_tokens, temperature, batch_size=batch_size,
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
# Build once, in place: a world is complete, or the old one stays (its folder: toyworld/folders.py).


def ensure_built(root=WORLD, progress=True, force=False, settings=None, threads=2):
    """{"model_dir", "train", "test", "transfer"} under `root`. A complete world (check_world) is used
    as built; asked for other settings than its build.json's (or than its name stands for) it is an
    error that says how to rebuild. A damaged one is an error too, never rebuilt silently. An empty or
    missing folder is built, and `force` rebuilds: `settings` (BuildSettings) or else the world's own
    (its name's, or its readable build.json's), else BuildSettings(). A build goes into a staging
    folder and replaces the old world only once it has succeeded (build_in_place).

    threads: torch threads for the build (at most the machine's cores). On our 2-core machine two
    threads built the world 1.7x faster than one, bit-identical to it. With another busy process
    on the same cores, one thread is faster (two spin-wait on each other)."""
    out = paths(root)
    recover(root)  # a build stopped while moving its finished world into place: finish that first
    asked = settings or named_settings(root)
    if force:
        build_in_place(root, check_settings(asked or own_settings(root) or BuildSettings()), progress, threads)
        return out
    if os.path.lexists(os.path.join(root, "build.json")):
        saved = check_world(root)["settings"]
        changes = settings_changes(saved, check_settings(asked)) if asked else {}
        if changes:
            listed = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in changes.items())
            raise common.UserError(f"the toy world in {root} was built with {listed}; rebuild it "
                                   f"({rebuild_command(root)}, same flags) or use another folder")
        return out
    left = [name for name in WORLD_ENTRIES if os.path.exists(os.path.join(root, name))]
    if left:  # a world without its record: we cannot tell what it was built with
        raise damaged(root, f"it holds {', '.join(left)} but no build.json (the record of its settings)",
                      record_read=False)
    if progress:
        print(f"the toy world is missing in {root}; building it now (about 10 minutes on 2 CPU cores; "
              f"`python -m toyworld.toy_build build` does the same)", file=sys.stderr)
    build_in_place(root, check_settings(asked or BuildSettings()), progress, threads, only_if_missing=True)
    return out


def own_settings(root):
    """The settings a readable build.json records (fields of other versions dropped), or None."""
    try:
        saved = read_build_info(root)["settings"]
    except common.UserError:
        return None
    names = {f.name for f in dataclasses.fields(BuildSettings)}
    return BuildSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names})


def build_in_place(root, settings, progress, threads, only_if_missing=False):
    """Build into ROOT/.building while holding ROOT/.lock (a second build into the same folder is a
    one-line error while the first runs), then move the new world's entries over the old ones
    (move_into_place). Until then the old world, build.json included, is untouched: a build that
    fails or is interrupted leaves it as it was, and a leftover .building is cleared by the next."""
    os.makedirs(root, exist_ok=True)
    lock = runfolder.RunLock(root, "building a toy world", noun="toy world folder")
    try:
        if only_if_missing and os.path.exists(os.path.join(root, "build.json")):
            return  # another build finished while we looked
        staging = os.path.join(root, STAGING)
        if interrupted_move(root):  # a build stopped in its last step: its finished world goes first
            move_into_place(staging, root)
            if only_if_missing:
                return
        shutil.rmtree(staging, ignore_errors=True)
        previous = torch.get_num_threads()
        threads = min(threads, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        try:
            build(staging, paths(staging), settings, progress, threads)
        finally:
            torch.set_num_threads(previous)
        move_into_place(staging, root)
    finally:
        lock.release()


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
        runfolder.write_atomic(out[split], "".join(json.dumps(p) + "\n" for p in problems))
    info = {"settings": asdict(settings), "final_loss": round(final_loss, 4),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": {"pretrain": round(pretrain_s), "total": round(time.time() - start),
                        "data": round(time.time() - start - pretrain_s)},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "threads": threads,
            "n_train": len(train), "n_test": len(test), "n_transfer": len(transfer), **stats,
            **transfer_stats}
    runfolder.write_atomic(os.path.join(root, "build.json"), json.dumps(info, indent=1))  # last: complete


def summary(root):
    info = read_build_info(root)
    return (f"toy world in {root}/: base model ({info['parameters'] / 1e6:.2f} M parameters), "
            f"{info['n_train']} train / {info['n_test']} test problems\n"
            f"base model at T = 1: plain Avg@{info['settings']['samples']} "
            f"{info['plain_avg']:.3f} over {info['scored']} problems; with a critique of its own "
            f"wrong attempt {info['critique_accuracy']:.3f}; with the reference "
            f"{info['reference_accuracy']:.3f}\n"
            f"built in {info['seconds']['total']} s (pretraining {info['seconds']['pretrain']} s)")


def probe(root=WORLD, samples=4, seed=0):
    """Measure a built world's base model on its test set: trace statistics and how its teacher
    reads a student's error (after_error_mass)."""
    from transformers import AutoModelForCausalLM
    info = check_world(root)  # a damaged world is one line, not a traceback halfway
    settings = BuildSettings(**{**asdict(BuildSettings()), **info["settings"], "samples": samples})
    out = paths(root)
    tok, model = make_tokenizer(), AutoModelForCausalLM.from_pretrained(out["model_dir"]).eval()
    problems = common.load_jsonl(out["test"])
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
    """python -m toyworld.toy_build build|probe [--world NAME | --root DIR] [--force] [--threads N] [--SETTING V ...]:
    every BuildSettings field is a flag (--fault-rate 0.9; tuples as comma lists, --mix 0.5,0.3,0.2),
    range-checked before a build starts and recorded in build.json."""
    parser = options.Parser(description="Build a toy world (base model + data), or probe a built one.")
    parser.add_argument("command", choices=["build", "probe"])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--world", choices=sorted(WORLDS), help="a named world (default toy; toy-v2 = the contrast)")
    where.add_argument("--root", help="a folder of your own (any build settings)")
    parser.add_argument("--force", action="store_true", help="rebuild a complete folder too")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (one when the cores are busy)")
    notes = options.field_help(BuildSettings)
    for f in dataclasses.fields(BuildSettings):
        convert = type(f.default)
        if convert is tuple:
            convert = lambda text, kind=type(f.default[0]): tuple(kind(x) for x in text.split(","))
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=convert, metavar="V",
                            help=f"build setting (default {f.default}) {notes.get(f.name, '')}".strip())
    args = parser.parse_args(argv)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildSettings)
             if getattr(args, f.name) is not None}
    root = os.path.join(folders.HERE, WORLDS[args.world or "toy"][0]) if args.root is None else args.root
    if not root.strip():
        raise common.UserError("--root must name a folder")
    if os.path.exists(root) and not os.path.isdir(root):
        raise common.UserError(f"--root {root} exists and is not a folder")
    if not 1 <= args.threads <= 1024:
        raise common.UserError(f"--threads must lie in 1..1024, got {args.threads}")
    if args.command == "probe":
        if flags:
            raise common.UserError("build settings (" + ", ".join(flags) + ") apply to `build` only")
        if not os.path.isfile(os.path.join(root, "build.json")):
            raise common.UserError(f"no built toy world in {root}; build it first: python -m toyworld.toy_build build")
        torch.set_num_threads(args.threads)
        print(json.dumps(probe(root), indent=1))
        return
    named = named_settings(root)
    settings = BuildSettings(**{**asdict(named or BuildSettings()), **flags}) if named or flags else None
    if named and settings_changes(json.loads(json.dumps(asdict(named))), settings):
        raise common.UserError(f"a named world's folder ({root}) holds its own settings; build other "
                               f"settings into a folder of your own: --root DIR")
    ensure_built(root, progress=True, force=args.force, settings=settings, threads=args.threads)
    try:
        print(summary(root))
    except (KeyError, TypeError, ValueError):  # another version's build.json records other measurements
        print(f"toy world in {root}/: built (its build.json lacks some of this version's measurements)")


if __name__ == "__main__":
    with common.user_errors():
        command_line()
