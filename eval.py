"""Evaluation: Avg@k, Pass@k, Maj@k and mean length at every checkpoint of a run (the paper's §6),
and the base model as step 0. The other programs that read runs have a file each: the comparison
tables and plots (compare.py), the per-token advantage analysis of Fig. 4 (analyze.py) and data
preparation (prepare.py); they share this file's metrics and its checked loading of a run's config.

Choices the paper leaves open (ours):
 1. Maj@k pools answers that critic.answers_match calls equal; unparseable answers do not vote.
    A tie for the most votes counts as wrong (the strict rule: it never flatters, and Maj@k stays
    a count of questions, as in the paper). With n > k samples, Maj@k averages disjoint blocks of k.
 2. Every checkpoint samples with the same seed (common random numbers), so differences between
    steps are less noisy than independent draws would make them.
 3. Confidence intervals: percentile bootstrap over questions, 1000 resamples, seed 0.
 4. Step 0 is the same model on the same questions with the same sampling in every arm: its row is
    computed once and copied to the other runs of the same out_dir whose `base_key` (digests of the
    base model's files and of the test set, device, samples, temperature, seed, length, sampling
    and thread settings) is equal.
 5. A test question whose prompt plus max_new_tokens exceeds the model's context is skipped with a
    warning that counts it (rows count the questions kept); training refuses such a question.

Outputs: RUN/eval.jsonl, one line per (step, setting): step, n, k, questions, temperature, test (a
digest of the evaluated file: rows of a file since changed are not reused), avg, pass, maj, length
(tokens, EOS excluded), unparseable, truncated, ci {metric: [lo, hi]}; rates are fractions. Every
reader skips a malformed row (read_rows) with one warning per file. Step 0 also has base_key (and
reused_from when copied). In the toy world each row has
`toy`: toy.trace_stats of all samples (per-step arithmetic, chaining, answer = own last result,
style mix and per-style accuracy), which compare.py shows in a last table. A toy world's transfer
split (toy_build.build_transfer) is evaluated at step 0 and the last checkpoint; its rows say
`split: "transfer"` (test rows have no `split`). After evaluating, the rows the run's report_to
has not had yet (an interrupted evaluation's included) are sent there (tracking.evaluation_rows).

Commands:
    python eval.py runs/critique-s0 [--samples 12] [--questions 30] [--temperature 1.1] [--k 12]
    torchrun --standalone --nproc_per_node=4 eval.py runs/critique-4gpu   # sharded
"""
import argparse
import contextlib
import functools
import json
import math
import os
import re
import sys
from collections import Counter

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds, nothing written yet): exit 130, no traceback
    import signal
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import torch
from safetensors import SafetensorError

from plumbing import common
import contexts
import critic
from plumbing import options
from plumbing import ranks
from plumbing import runfolder
from plumbing import sampler
import selfdistill  # the method: Config, its choices and its rules
from plumbing import tracking
from toyworld import world
from plumbing.common import UserError

METRICS = ("avg", "pass", "maj", "length", "unparseable", "truncated")


# ---------------------------------------------------------------------------------------------
# Metrics: pure functions of per-question samples.


def pass_at_k(n, c, k):
    """Unbiased Pass@k from n ≥ k samples with c correct: 1 − C(n−c, k) / C(n, k)."""
    if n < k:
        raise ValueError(f"Pass@{k} needs at least {k} samples, got {n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def answer_key(answer):
    """A cheap key for Maj@k: a plain integer's value (critic.PLAIN_INTEGER, the toy world's
    answers), else the stripped text; None (no vote) for a missing or empty answer. Equal keys are
    the same answer; answers with different keys may still be equivalent (majority_correct asks)."""
    if answer is None or not str(answer).strip():
        return None
    text = str(answer).strip()
    return int(text) if critic.PLAIN_INTEGER.fullmatch(text) else text


def majority_correct(answers, gold, exact=False):
    """1.0 when the most voted answer is unique and correct; a tie counts as wrong (strict).
    Answers vote together when critic.answers_match calls them equal: each distinct key joins the
    first group whose first key it matches (math-verify is asked once per pair of distinct keys,
    never for two integers), and the winner is judged against the gold the same way."""
    votes = Counter(key for key in map(answer_key, answers) if key is not None)
    groups = {}  # first key of a group -> its votes, in order of first appearance
    for key, count in votes.items():
        first = next((g for g in groups if critic.answers_match(str(key), str(g), exact)), key)
        groups[first] = groups.get(first, 0) + count
    ranked = sorted(groups.items(), key=lambda item: -item[1])[:2]
    if not ranked or (len(ranked) == 2 and ranked[1][1] == ranked[0][1]):
        return 0.0
    return float(critic.answers_match(str(ranked[0][0]), gold, exact))


def maj_at_k(answers, gold, k, exact=False):
    """Maj@k from n ≥ k answers: the mean over disjoint blocks of k (one block when n = k)."""
    blocks = [answers[i:i + k] for i in range(0, len(answers) - k + 1, k)]
    return sum(majority_correct(b, gold, exact) for b in blocks) / len(blocks)


def question_scores(answers, correct, lengths, truncated, gold, k, exact=False):
    """Every metric for one question's n samples (exact: critic.answers_match's integer check)."""
    n = len(answers)
    return {"avg": sum(correct) / n, "pass": pass_at_k(n, sum(correct), k),
            "maj": maj_at_k(answers, gold, k, exact), "length": sum(lengths) / n,
            "unparseable": sum(a is None for a in answers) / n, "truncated": sum(truncated) / n}


def bootstrap_ci(values, resamples=1000, seed=0, level=0.95):
    """Percentile bootstrap interval of the mean, resampling questions with replacement."""
    values = torch.tensor(values, dtype=torch.float64)  # (Q,)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(values), (resamples, len(values)), generator=generator)  # (R, Q)
    means = values[index].mean(-1)  # (R,)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return [low.item(), high.item()]


def summarize(per_question, seed=0):
    """Means over questions and their bootstrap CIs: {metric: value, "ci": {metric: [lo, hi]}}."""
    out = {m: sum(q[m] for q in per_question) / len(per_question) for m in METRICS}
    out["ci"] = {m: bootstrap_ci([q[m] for q in per_question], seed=seed) for m in METRICS}
    return out


# ---------------------------------------------------------------------------------------------
# Reading eval.jsonl: every reader (evaluation's done set, the base row's reuse, compare.py's tables
# and figure) takes the rows through one check, so a damaged row is skipped and counted, never shown.


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole(value, least=0):
    return type(value) is int and value >= least


def row_problem(row):
    """Why an eval.jsonl row cannot be read as one (a hand edit, another program's line), or None."""
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    missing = [f for f in ("step", "n", "k", "questions", "temperature", *METRICS, "ci") if f not in row]
    if missing:
        return "no " + ", ".join(missing)
    if not whole(row["step"]):
        return f"step {row['step']!r} is not a whole number >= 0"
    bad = [f for f in ("n", "k", "questions") if not whole(row[f], 1)]
    bad += [] if finite(row["temperature"]) and row["temperature"] > 0 else ["temperature"]
    bad += [m for m in METRICS if not finite(row[m]) or row[m] < 0 or (m != "length" and row[m] > 1)]
    ci = row["ci"]
    bad += ["ci"] if not isinstance(ci, dict) or not all(
        isinstance(ci.get(m), list) and len(ci[m]) == 2 and all(map(finite, ci[m])) for m in METRICS) else []
    bad += [f for f, kind in (("split", str), ("base_key", dict), ("toy", dict)) if not isinstance(row.get(f, kind()), kind)]
    if isinstance(row.get("toy"), dict):  # toy.trace_stats: rates (None: nothing to count), per-style rates
        if not all(v is None or finite(v) or isinstance(v, dict) and all(map(finite, v.values()))
                   for v in row["toy"].values()):
            bad.append("toy")
    return f"{', '.join(dict.fromkeys(bad))} not a valid value" if bad else None


WARNED = set()  # (file, bad lines): each file's damaged rows are reported once per process


def read_rows(path, problem=row_problem):
    """The usable rows of a JSONL log (eval.jsonl by default); rows `problem` finds fault with are
    skipped, with one warning per file that counts them and names the first."""
    rows, bad = [], []
    for lineno, row in runfolder.numbered_jsonl(path):
        why = problem(row)
        if why:
            bad.append((lineno, why))
        else:
            rows.append(row)
    if bad and (path, tuple(bad)) not in WARNED:
        WARNED.add((path, tuple(bad)))
        print(f"warning: {path}: {len(bad)} malformed row{'s' * (len(bad) > 1)} skipped (line {bad[0][0]}: "
              f"{bad[0][1]})", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------
# Evaluating a run: the base model (step 0) and every checkpoint.


def load_run_config(run_dir, trust_remote_code=False):
    """A run folder's config.yaml through the same strict checks as training: it is data, not code.
    trust_remote_code is never taken from the file, only from this process's command line."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir} does not exist" + (" (it is a file)" if os.path.exists(run_dir) else ""))
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        has = "checkpoints but" if runfolder.checkpoint_dirs(run_dir) else "no checkpoints and"
        raise UserError(f"{run_dir} has {has} no config.yaml: not a selfdistill run folder")
    values = {}
    for key, value in options.read_yaml_config(path).items():
        try:
            options.check_key(selfdistill.Config, key)
            values[key] = options.coerce(selfdistill.Config, selfdistill.CHOICES, key, value, from_text=False)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    lacking = [key for key in ("arm", "model") if key not in values]  # the trainer writes every key
    if lacking:
        raise UserError(f"{path} has no {' or '.join(lacking)}: not the config a run saved (damaged or cut short)")
    cfg = selfdistill.Config(**{**values, "trust_remote_code": trust_remote_code})
    try:
        selfdistill.check_consistency(cfg)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return cfg


def load_adapter(model, checkpoint):
    """Put a checkpoint's LoRA weights into the model (None: a zero adapter, i.e. the base)."""
    from peft import set_peft_model_state_dict
    if checkpoint is None:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.zero_()  # B = 0 makes the update s·BA exactly zero
        return
    set_peft_model_state_dict(model, runfolder.load_adapter_file(checkpoint))  # NaN/inf: NonFiniteAdapter


def student_at(model, checkpoint):
    """A context in which the model is the student of this checkpoint: its LoRA weights loaded,
    or for step 0 (None) the base with the adapter switched off, the numbers of a zero adapter
    (s·BA = 0 added) without the adapter's matmuls (18 % of a toy evaluation)."""
    if checkpoint is None:
        return model.disable_adapter()
    load_adapter(model, checkpoint)
    return contextlib.nullcontext()


def checkpoint_steps(run_dir):
    """{step: checkpoint folder}, with step 0 = the base model (no folder)."""
    steps = {0: None}
    for path in runfolder.checkpoint_dirs(run_dir):
        steps[int(os.path.basename(path).split("_")[1])] = path
    return steps


def sample_answers(model, tokenizer, cfg, device, records, n, temperature, desc):
    """n samples per question → per-question scores (with the model's adapter as it is now)."""
    from tqdm import tqdm
    question_prompts = [contexts.student_prompt_ids(tokenizer, r["question"], cfg.prompts, cfg.student_thinking)
                        for r in records]  # built once per question, not n times
    prompts = [ids for ids in question_prompts for _ in range(n)]
    responses, truncated = [], []
    for i in tqdm(range(0, len(prompts), cfg.generation_batch), desc=desc, leave=False,
                  disable=not common.progress_bars()):
        ids, cut = sampler.generate(model, tokenizer, prompts[i:i + cfg.generation_batch], cfg.max_new_tokens,
                                   temperature, cfg.top_p, cfg.top_k, cfg.generation_batch)
        responses, truncated = responses + ids, truncated + cut
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    lengths = [len(r) - (not cut) for r, cut in zip(responses, truncated)]  # EOS not counted
    per_question, exact = [], world.exact_answers(cfg)  # decided once, not per answer
    for q, record in enumerate(records):
        part = slice(q * n, (q + 1) * n)
        answers = [critic.extract_answer(t) for t in texts[part]]
        correct = [critic.answers_match(a, record["answer"], exact) for a in answers]
        per_question.append((answers, correct, lengths[part], truncated[part], record["answer"], texts[part]))
    return per_question


def base_key(cfg, model_path, test_path, setting, device):
    """Everything that decides step 0's numbers (the base model with a zero adapter sampled with
    the run's seed): equal keys give bit-identical step-0 rows, so one evaluation serves every arm.
    The base and the test set enter by their contents (a base rebuilt under the same path is
    another base; the same files under two paths are one), the device by its kind."""
    fields = ("seed", "max_new_tokens", "prompts", "student_thinking", "top_p", "top_k",
              "generation_batch", "dtype", "threads", "logit_temperature")
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"model": runfolder.model_digest(model_path), "test": runfolder.file_digest(test_path),
            "device": kind, **setting, **{f: getattr(cfg, f) for f in fields}}


def reusable_base_row(run_dir, key):
    """A step-0 row with this base key from a sibling run's eval.jsonl (same out_dir), or None."""
    root = os.path.dirname(os.path.abspath(run_dir))
    for name in sorted(os.listdir(root)):
        other = os.path.join(root, name)
        if not os.path.isdir(other) or os.path.samefile(other, run_dir):
            continue
        for row in read_rows(os.path.join(other, "eval.jsonl")):
            if row["step"] == 0 and row.get("base_key") == key:
                return {**row, "reused_from": name}
    return None


def check_adapter_base(checkpoint, model_path, run_dir):
    """A checkpoint is evaluated on the base it was trained on, compared by contents, not by path.
    Its adapter_config.json names the base folder (absolute: common.load_model). The same folder must
    still hold the files the run started from (RUN/inputs.json's digest: a base rebuilt or replaced in
    place is another base); another folder is fine when it holds the same files (the named one's
    digest, or if that is gone inputs.json's). Other contents are a one-line error; a base that can
    no longer be checked (gone, no inputs.json: an older run) a warning."""
    try:
        with open(os.path.join(checkpoint, "adapter_config.json")) as f:
            named = json.load(f)["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a damaged checkpoint: student_at skips it with a warning
    here = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
    if not isinstance(named, str):
        return
    ours = runfolder.model_digest(model_path)
    if named == here:
        started = runfolder.saved_inputs(run_dir).get("model")
        if started not in (None, ours):
            raise UserError(f"{checkpoint} was trained on the base in {here}, whose files have changed since "
                            f"the run started (digest {started}, now {ours}); evaluate with the base it was "
                            f"trained on")
        return
    theirs = runfolder.model_digest(named) if os.path.isdir(named) else runfolder.saved_inputs(run_dir).get("model")
    if theirs is None:
        print(f"warning: {checkpoint} was trained on {named}, which is gone; evaluating on {here}, whose "
              f"contents cannot be checked against it (the run has no inputs.json)", file=sys.stderr)
    elif theirs != ours:
        raise UserError(f"{checkpoint} was trained on the base {named}, but {here} holds other weights "
                        f"(digest {ours}, trained on {theirs}); evaluate with the base it was trained on")
    elif not os.path.isdir(named):
        print(f"warning: {checkpoint}'s base {named} moved: evaluating on {here}, the same files "
              f"(digest {ours})", file=sys.stderr)


def evaluate_run(run_dir, samples=None, questions=None, temperature=None, k=None, model=None,
                 tokenizer=None, trust_remote_code=False):
    """Evaluate step 0 and every checkpoint not yet in RUN_DIR/eval.jsonl with these settings;
    append one line per step and return all rows of these settings. Pass `model`/`tokenizer` (a
    peft model of this run) to reuse a loaded model; its adapter is overwritten. Holds the run's
    lock while it writes (a training process on the same run is refused, and vice versa), then
    sends the rows report_to has not had yet (tracking.evaluation_rows: a missing package warns).
    Under torchrun each process samples its share of the questions and rank 0 writes."""
    cfg = load_run_config(run_dir, trust_remote_code)
    device = next(model.parameters()).device if model is not None else common.pick_device(cfg)
    rank, _ = ranks.init_ranks(device)
    lock = runfolder.RunLock(run_dir, "evaluating") if rank == 0 else None
    # the model is loaded when a step first needs it, and once for both splits
    load = functools.cache(lambda: (model, tokenizer) if model is not None else
                           common.load_model(cfg, world.resolve_paths(cfg)[0], device))
    # the tokenizer and the context length, to skip a test question that does not fit (weights not loaded)
    window = functools.cache(lambda: (tokenizer, getattr(model.config, "max_position_embeddings", None))
                             if model is not None else common.context_window(cfg, world.resolve_paths(cfg)[0]))
    with tracking.evaluation_rows(cfg, run_dir):  # report_to: the rows it has not had yet
        try:
            rows = evaluate_steps(run_dir, cfg, samples, questions, temperature, k, load, device, window=window)
            if world.transfer_path(cfg):  # the toy world's transfer probe: step 0 and the last checkpoint
                evaluate_steps(run_dir, cfg, samples, questions, temperature, k, load, device, split="transfer",
                               window=window)
            return rows
        finally:
            if lock:
                lock.release()


def in_split(row, split="test"):
    """Rows of the test set carry no `split`; the toy world's transfer probe's say "transfer"."""
    return row.get("split", "test") == split


def evaluate_steps(run_dir, cfg, samples, questions, temperature, k, load, device, split="test", window=None):
    """Evaluate one split's steps not yet in eval.jsonl; load() gives (model, tokenizer), loaded
    once; window() (tokenizer, context length) picks the questions that fit (fitting_records).
    split="transfer": the toy world's transfer split (toy_build.build_transfer), at step 0 and the
    last checkpoint only: whether an arm learned to repair facts it never trained on."""
    n = samples or cfg.eval_samples
    k = k or n
    if not 1 <= k <= n:
        raise UserError(f"k = {k} must lie in 1..samples ({n})")
    temperature = temperature or cfg.temperature
    check_temperature(temperature)
    model_path, _, test_path = world.resolve_paths(cfg)
    test_path = test_path if split == "test" else world.transfer_path(cfg)
    records = common.load_jsonl(test_path, normalize=critic.normalize_answer)
    if window:
        records = fitting_records(cfg, records, *window(), test_path)
    records = records[:questions or cfg.eval_questions or len(records)]
    setting = {"n": n, "k": k, "questions": len(records), "temperature": temperature}
    path = os.path.join(run_dir, "eval.jsonl")
    digest = runfolder.file_digest(test_path)  # rows of a test file with other contents are not done

    def ours(row):  # rows written before rows had a "test" digest count as this file's
        return in_split(row, split) and row.get("test", digest) == digest and \
            all(row.get(f) == v for f, v in setting.items())
    done = {row["step"] for row in read_rows(path) if ours(row)}
    rank, world_size = ranks.init_ranks(device)
    steps = checkpoint_steps(run_dir)
    if split != "test":
        steps = {s: steps[s] for s in {0, max(steps)}}
    todo = ranks.from_rank0({s: c for s, c in steps.items() if s not in done})
    if len(steps) == 1 and rank == 0 and split == "test":
        print(f"{run_dir} has no checkpoints yet: step 0 (the base model) only")
    key = base_key(cfg, model_path, test_path, setting, device)
    if any(todo.values()):  # the newest checkpoint speaks for the run's base (every process checks: none waits)
        check_adapter_base(todo[max(s for s, c in todo.items() if c)], model_path, run_dir)
    exact = world.exact_answers(cfg)  # the toy's exact integer check, decided once
    if world_size > 1:  # other processes draw other random numbers: a different step 0 from one process's
        key["processes"] = world_size
    for step, checkpoint in sorted(todo.items()):
        if step == 0 and (row := ranks.from_rank0(reusable_base_row(run_dir, key) if rank == 0 else None)):
            if rank == 0:
                print(f"step 0: the base model's evaluation reused from {row['reused_from']} (same base_key)")
                runfolder.append_jsonl(path, {**row, "test": digest})
            continue
        model, tokenizer = load()
        try:
            student = student_at(model, checkpoint)
        except (*runfolder.DAMAGED, SafetensorError) as e:
            print(f"warning: skipping the damaged checkpoint {checkpoint} ({type(e).__name__})", file=sys.stderr)
            continue
        torch.manual_seed(cfg.seed + (rank << 32))  # the same random numbers at every step (docstring, 2)
        with student:
            scored = ranks.gather(sample_answers(model, tokenizer, cfg, device, ranks.share(records, rank, world_size),
                                                  n, temperature, f"step {step}"))  # every question, in order
        if rank > 0:
            continue
        row = {"step": step, **setting, "test": digest,
               **summarize([question_scores(*s[:5], k, exact) for s in scored])}
        if split != "test":
            row["split"] = split
        if world_size > 1:
            row["processes"] = world_size
        if world.is_world_model(cfg.model):
            row["toy"] = world.toy_instruments(scored)
        if step == 0:
            row["base_key"] = key
        runfolder.append_jsonl(path, row)
    ranks.barrier()  # every row written before any process reads them
    rows = sorted(filter(ours, read_rows(path)), key=lambda r: r["step"])
    if rank == 0:
        print_summary(rows, run_dir, "" if split == "test" else f" ({split} split)")
    return rows


def fitting_records(cfg, records, tokenizer, limit, path):
    """The test questions whose prompt plus max_new_tokens fits the model's context; the others are
    counted and skipped with a warning (sampled past the context they would be silently wrong;
    training refuses such a question instead: common.check_fits). Rows count the questions kept."""
    skipped = common.longer_than(tokenizer, limit, cfg, records)
    if len(skipped) == len(records):
        raise UserError(f"no question of {path} fits the model's context of {limit} tokens with "
                        f"max_new_tokens={cfg.max_new_tokens}")
    if skipped:
        print(f"warning: {path}: {len(skipped)} of {len(records)} questions (first: id {skipped[0]['id']}) do not "
              f"fit the model's context of {limit} tokens with max_new_tokens={cfg.max_new_tokens}; skipped",
              file=sys.stderr)
        records = [r for r in records if all(r is not s for s in skipped)]
    return records


MIN_TEMPERATURE = 1e-3  # greedy in all but name below it; 1e-300 is 0 in float32 (logits / 0: NaN samples)


def check_temperature(temperature):
    if not finite(temperature) or temperature < MIN_TEMPERATURE:
        raise UserError(f"the evaluation temperature must be a finite number >= {MIN_TEMPERATURE:g}, "
                        f"got {temperature}")


def print_summary(rows, run_dir, what=""):
    if not rows:
        return
    k = rows[0]["k"]
    print(f"{run_dir}{what}: {rows[0]['questions']} questions × {rows[0]['n']} samples, T = "
          f"{rows[0]['temperature']}, 95% bootstrap CI over questions")
    print(f"{'step':>6} | {f'Avg@{k}':^20} | {f'Pass@{k}':^20} | {f'Maj@{k}':^20} | {'len':>6} | unparsed")
    for r in rows:
        cells = [f"{100 * r[m]:5.1f} [{100 * r['ci'][m][0]:5.1f}, {100 * r['ci'][m][1]:5.1f}]"
                 for m in ("avg", "pass", "maj")]
        print(f"{r['step']:>6} | " + " | ".join(cells) + f" | {r['length']:6.1f} | {100 * r['unparseable']:5.1f}%")


# ---------------------------------------------------------------------------------------------
# The config of a run folder or of a model, for the programs that take either (analyze.py, prepare.py).


def target_config(target, overrides):
    """(cfg, run_dir or None): a run folder's config, or a model folder / a toy world (by name,
    e.g. toy or toy-v2, or by folder) plus key=value."""
    is_run = os.path.isfile(os.path.join(target, "config.yaml"))
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", target) and not os.path.exists(target)
    if not is_run and not world.is_world_model(target) and not os.path.isdir(target) and not hub_id:
        raise UserError(f"{target} is neither a run folder (no config.yaml) nor a model folder")
    values = options.parse_overrides(selfdistill.Config, selfdistill.CHOICES, overrides)
    if not is_run:  # a model: the derived values a run of it would have (G, length budget)
        return selfdistill.resolve(selfdistill.Config(**{"model": target, **values})), None
    cfg = load_run_config(target, trust_remote_code=values.get("trust_remote_code", False))
    for key, value in values.items():
        setattr(cfg, key, value)
    selfdistill.check_consistency(cfg)
    return cfg, target


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = options.Parser(
        description="Evaluate selfdistill runs: Avg@k, Pass@k, Maj@k and length at every checkpoint.",
        epilog=__doc__[__doc__.index("Commands:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run folder(s)")
    parser.add_argument("--samples", type=int, help="samples per question (default: eval_samples)")
    parser.add_argument("--questions", type=int, help="test questions (default: eval_questions)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the run's)")
    parser.add_argument("--k", type=int, help="k of the @k metrics (default: samples)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the "
                        "model folder (never taken from a run's config.yaml)")
    args = parser.parse_intermixed_args(argv)
    common.default_signals()  # Ctrl-C: one line (user_errors), even when the trainer passes it on too
    with common.user_errors():
        for flag in ("samples", "questions", "k"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise UserError(f"--{flag} must be at least 1")
        if args.temperature is not None:
            check_temperature(args.temperature)
        for run_dir in args.paths:
            evaluate_run(run_dir, args.samples, args.questions, args.temperature, args.k,
                         trust_remote_code=args.trust_remote_code)
        ranks.leave_group()  # under torchrun


if __name__ == "__main__":
    main()
