"""Evaluation: Avg@k, Pass@k, Maj@k and mean length per checkpoint (PAPER.md §6), the paper-style
comparison table across runs, and the per-token advantage analysis of Fig. 4 (PAPER.md §2):

    A_t = log π_T(ŷ_t | x, c, ŷ<t) − log π_θ(ŷ_t | x, ŷ<t)

Choices the paper leaves open (ours):
 1. Maj@k pools answers that critic.answers_match calls equal; unparseable answers do not vote.
    A tie for the most votes counts as wrong (the strict rule: it never flatters, and Maj@k stays
    a count of questions, as in the paper). With n > k samples, Maj@k averages disjoint blocks of k.
 2. Every checkpoint samples with the same seed (common random numbers), so differences between
    steps are less noisy than independent draws would make them.
 3. Confidence intervals: percentile bootstrap over questions, 1000 resamples, seed 0.
 4. --compare picks the best step of the seed-averaged curve (not each seed's own best, which
    flatters more) and shows the final step beside it. Length has no "best": it is shown at the
    Avg@k-best step. Step 0 (the base model) is never a candidate.
 5. The analysis teacher is always the base model (LoRA off), the paper's; logits are divided by
    `logit_temperature`, as in the loss. Rollouts are sampled from the analysed model (step 0 =
    the base, the default), one per test question, and kept when the critic marks them wrong at
    a step we can locate (see first_wrong_step). The two controls are built from the critique
    (see analysis_contexts). Step 0's student is the base itself (a zero adapter).
 6. Step 0 is the same model on the same questions with the same sampling in every arm: its row is
    computed once and copied to the other runs of the same out_dir whose `base_key` (model, test
    set digest, samples, temperature, seed, length, sampling and thread settings) is equal.
 7. Spreads: --compare and --per-step show mean ± std over seeds; --plot draws the seed mean with
    a min–max band (with three seeds, the honest range); the pooled Fig. 4 draws the mean over
    rollouts ± 2 standard errors. The error focus needs a correct step before the wrong one and
    divides by at least FOCUS_FLOOR (see advantage_summary).

Outputs: RUN/eval.jsonl, one line per (step, setting): step, n, k, questions, temperature, avg,
pass, maj, length (tokens, EOS excluded), unparseable, truncated, ci {metric: [lo, hi]}; rates are
fractions. Step 0 also has base_key (and reused_from when copied). In the toy world each row has
`toy`: toy.trace_stats of all samples (per-step arithmetic, chaining, answer = own last result,
style mix and per-style accuracy), which --compare shows in a last table. --analyze writes
advantage_step_S.{html,json} (with matplotlib also .png, one rollout, and _aligned.png, all pooled)
to RUN/analysis/, or for a model to ./analysis/NAME/. --plot writes FIG.png (with matplotlib) and
FIG.csv, the figure's numbers.

Commands:
    python eval.py runs/critique-s0 [--samples 12] [--questions 30] [--temperature 1.1] [--k 12]
    python eval.py --compare runs/grpo-s* runs/critique-s* [--markdown] [--ci] [--per-step] [--reach 50]
    python eval.py --plot runs/grpo-s* runs/critique-s* [--out analysis/training.png] [--x rollouts]
    python eval.py --analyze runs/critique-s0 [--step 40] [--rollouts 8] [--out DIR]
    python eval.py --analyze toy                        # the toy base model, no run needed
    python eval.py --analyze path/to/model test_file=test.jsonl critic=http critic_url=... critic_model=...
    python eval.py --prepare omr.jsonl Qwen/Qwen3-1.7B critic=http critic_url=... critic_model=Qwen/QwQ-32B --out data/omr
"""
import argparse
import bisect
import contextlib
import csv
import dataclasses
import html
import json
import math
import os
import random
import re
import statistics
import sys
import textwrap
from collections import Counter

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds, nothing written yet): exit 130, no traceback
    import signal
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import torch
import yaml
from safetensors import SafetensorError

import common
import contexts
import critic
import selfdistill  # the method: Config, what the teacher sees
import toy
from common import UserError, read_jsonl

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
# Evaluating a run: the base model (step 0) and every checkpoint.


def load_run_config(run_dir, trust_remote_code=False):
    """A run folder's config.yaml through the same strict checks as training: it is data, not code.
    trust_remote_code is never taken from the file, only from this process's command line."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir} does not exist" + (" (it is a file)" if os.path.exists(run_dir) else ""))
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        has = "checkpoints but" if common.checkpoint_dirs(run_dir) else "no checkpoints and"
        raise UserError(f"{run_dir} has {has} no config.yaml: not a selfdistill run folder")
    values = {}
    for key, value in common.read_yaml_config(path).items():
        try:
            common.check_key(selfdistill.Config, key)
            values[key] = common.coerce(selfdistill.Config, selfdistill.CHOICES, key, value, from_text=False)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    cfg = selfdistill.Config(**{**values, "trust_remote_code": trust_remote_code})
    try:
        common.check_consistency(cfg)
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
    set_peft_model_state_dict(model, common.load_adapter_file(checkpoint))  # NaN/inf: NonFiniteAdapter


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
    for path in common.checkpoint_dirs(run_dir):
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
        ids, cut = common.generate(model, tokenizer, prompts[i:i + cfg.generation_batch], cfg.max_new_tokens,
                                   temperature, cfg.top_p, cfg.top_k, cfg.generation_batch)
        responses, truncated = responses + ids, truncated + cut
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    lengths = [len(r) - (not cut) for r, cut in zip(responses, truncated)]  # EOS not counted
    per_question, exact = [], selfdistill.exact_answers(cfg)  # decided once, not per answer
    for q, record in enumerate(records):
        part = slice(q * n, (q + 1) * n)
        answers = [critic.extract_answer(t) for t in texts[part]]
        correct = [critic.answers_match(a, record["answer"], exact) for a in answers]
        per_question.append((answers, correct, lengths[part], truncated[part], record["answer"], texts[part]))
    return per_question


def toy_instruments(scored):
    """The toy world's attribution of a checkpoint's accuracy (toy.trace_stats over all samples)."""
    import toy
    return toy.trace_stats([t for s in scored for t in s[5]], [c for s in scored for c in s[1]])


def base_key(cfg, model_path, test_path, setting):
    """Everything that decides step 0's numbers (the base model with a zero adapter sampled with
    the run's seed): equal keys give bit-identical step-0 rows, so one evaluation serves every arm."""
    import hashlib
    with open(test_path, "rb") as f:
        test_digest = hashlib.sha256(f.read()).hexdigest()[:16]
    fields = ("seed", "max_new_tokens", "prompts", "student_thinking", "top_p", "top_k",
              "generation_batch", "dtype", "threads", "logit_temperature")
    return {"model": os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
            "test": test_digest, **setting, **{f: getattr(cfg, f) for f in fields}}


def reusable_base_row(run_dir, key):
    """A step-0 row with this base key from a sibling run's eval.jsonl (same out_dir), or None."""
    root = os.path.dirname(os.path.abspath(run_dir))
    for name in sorted(os.listdir(root)):
        other = os.path.join(root, name)
        if not os.path.isdir(other) or os.path.samefile(other, run_dir):
            continue
        for row in read_jsonl(os.path.join(other, "eval.jsonl")):
            if row.get("step") == 0 and row.get("base_key") == key:
                return {**row, "reused_from": name}
    return None


def evaluate_run(run_dir, samples=None, questions=None, temperature=None, k=None, model=None,
                 tokenizer=None, trust_remote_code=False):
    """Evaluate step 0 and every checkpoint not yet in RUN_DIR/eval.jsonl with these settings;
    append one line per step and return all rows of these settings. Pass `model`/`tokenizer` (a
    peft model of this run) to reuse a loaded model; its adapter is overwritten. Holds the run's
    lock while it writes (a training process on the same run is refused, and vice versa).
    Under torchrun each process samples its share of the questions and rank 0 writes."""
    cfg = load_run_config(run_dir, trust_remote_code)
    device = next(model.parameters()).device if model is not None else common.pick_device(cfg)
    rank, _ = common.init_ranks(device)
    lock = common.RunLock(run_dir, "evaluating") if rank == 0 else None
    try:
        rows = evaluate_steps(run_dir, cfg, samples, questions, temperature, k, model, tokenizer, device)
        if toy.transfer_path(cfg):  # the toy world's transfer probe: step 0 and the last checkpoint
            evaluate_steps(run_dir, cfg, samples, questions, temperature, k, model, tokenizer, device,
                           split="transfer")
        return rows
    finally:
        if lock:
            lock.release()


def in_split(row, split="test"):
    """Rows of the test set carry no `split`; the toy world's transfer probe's say "transfer"."""
    return row.get("split", "test") == split


def evaluate_steps(run_dir, cfg, samples, questions, temperature, k, model, tokenizer, device, split="test"):
    """split="transfer": the toy world's transfer split (toy.build_transfer), at step 0 and the
    last checkpoint only: whether an arm learned to repair facts it never trained on."""
    n = samples or cfg.eval_samples
    k = k or n
    if not 1 <= k <= n:
        raise UserError(f"k = {k} must lie in 1..samples ({n})")
    temperature = temperature or cfg.temperature
    model_path, _, test_path = toy.resolve_paths(cfg)
    test_path = test_path if split == "test" else toy.transfer_path(cfg)
    records = common.load_jsonl(test_path, normalize=critic.normalize_answer)
    records = records[:questions or cfg.eval_questions or len(records)]
    setting = {"n": n, "k": k, "questions": len(records), "temperature": temperature}
    path = os.path.join(run_dir, "eval.jsonl")
    done = {row["step"] for row in read_jsonl(path)
            if in_split(row, split) and all(row.get(f) == v for f, v in setting.items())}
    rank, world = common.init_ranks(device)
    steps = checkpoint_steps(run_dir)
    if split != "test":
        steps = {s: steps[s] for s in {0, max(steps)}}
    todo = common.from_rank0({s: c for s, c in steps.items() if s not in done})
    if len(steps) == 1 and rank == 0 and split == "test":
        print(f"{run_dir} has no checkpoints yet: step 0 (the base model) only")
    key = base_key(cfg, model_path, test_path, setting)
    exact = selfdistill.exact_answers(cfg)  # the toy's exact integer check, decided once
    if world > 1:  # other processes draw other random numbers: a different step 0 from one process's
        key["processes"] = world
    for step, checkpoint in sorted(todo.items()):
        if step == 0 and (row := common.from_rank0(reusable_base_row(run_dir, key) if rank == 0 else None)):
            if rank == 0:
                print(f"step 0: the base model's evaluation reused from {row['reused_from']} (same base_key)")
                common.append_jsonl(path, row)
            continue
        if model is None:
            model, tokenizer = common.load_model(cfg, model_path, device)
        try:
            student = student_at(model, checkpoint)
        except (*common.DAMAGED, SafetensorError) as e:
            print(f"warning: skipping the damaged checkpoint {checkpoint} ({type(e).__name__})", file=sys.stderr)
            continue
        torch.manual_seed(cfg.seed + (rank << 32))  # the same random numbers at every step (docstring, 2)
        with student:
            scored = common.gather(sample_answers(model, tokenizer, cfg, device, common.share(records, rank, world),
                                                  n, temperature, f"step {step}"))  # every question, in order
        if rank > 0:
            continue
        row = {"step": step, **setting, **summarize([question_scores(*s[:5], k, exact) for s in scored])}
        if split != "test":
            row["split"] = split
        if world > 1:
            row["processes"] = world
        if toy.is_world_model(cfg.model):
            row["toy"] = toy_instruments(scored)
        if step == 0:
            row["base_key"] = key
        common.append_jsonl(path, row)
    common.barrier()  # every row written before any process reads them
    rows = sorted((r for r in read_jsonl(path) if in_split(r, split) and all(r.get(f) == v for f, v in setting.items())),
                  key=lambda r: r["step"])
    if rank == 0:
        print_summary(rows, run_dir, "" if split == "test" else f" ({split} split)")
    return rows


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
# --compare: the paper-style table, seeds of one arm pooled.

SAME_ARM_IGNORES = ("seed", "run", "out_dir", "device", "eval_at_end")  # do not change the experiment
TABLE_METRICS = (("pass", "Pass"), ("maj", "Maj"), ("avg", "Avg"))
TOY_STATS = ("step_arith", "step_chain", "answer_own")  # toy.trace_stats, shown by --compare


def load_compared_run(run_dir):
    """(config dict, {step: row}) using the latest evaluation setting of the run."""
    load_run_config(run_dir)  # the same checks and errors as evaluation
    config = common.read_yaml_config(os.path.join(run_dir, "config.yaml"))
    every = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    rows = [r for r in every if in_split(r)]
    if not rows:
        raise UserError(f"{run_dir} has no eval.jsonl yet; run: python eval.py {run_dir}")
    setting = {f: rows[-1][f] for f in EVAL_SETTING}
    return config, {r["step"]: r for r in rows if all(r[f] == v for f, v in setting.items())}, setting


EVAL_SETTING = ("n", "k", "questions", "temperature")  # runs compared must share these


def transfer_rows(run_dir, setting):
    """{step: row} of the toy world's transfer split evaluated with the test rows' n, k and T."""
    return {r["step"]: r for r in read_jsonl(os.path.join(run_dir, "eval.jsonl")) if in_split(r, "transfer")
            and all(r.get(f) == setting[f] for f in EVAL_SETTING if f != "questions")}


def non_default(config):
    """Settings that differ from the defaults of its arm (derived defaults included)."""
    defaults = dataclasses.asdict(selfdistill.resolve(selfdistill.Config(arm=config["arm"], model=config["model"])))
    return {key: value for key, value in config.items()
            if key not in SAME_ARM_IGNORES and key != "arm" and value != defaults.get(key)}


def pool_arm(runs):
    """Best step of the seed-mean curve and the final step, mean ± std over seeds (CI for one);
    the Avg@k curve at every step all seeds evaluated (step 0 too); each seed's base row."""
    steps = set.intersection(*[{s for s in rows if s > 0} or {0} for _, rows in runs])
    if not steps:
        raise UserError(f"the seeds of {runs[0][0]['run']} share no evaluated step")
    steps = sorted(steps)

    def at(metric, step):
        values = [rows[step][metric] for _, rows in runs]
        spread = statistics.stdev(values) if len(values) > 1 else runs[0][1][step]["ci"][metric]
        return {"value": statistics.fmean(values), "spread": spread, "step": step}

    def best_step(metric):  # earliest step with the highest seed mean
        return max(steps, key=lambda s: (statistics.fmean(rows[s][metric] for _, rows in runs), -s))

    out = {m: {"best": at(m, best_step(m)), "final": at(m, steps[-1])} for m, _ in TABLE_METRICS}
    out["length"] = {"best": at("length", out["avg"]["best"]["step"]), "final": at("length", steps[-1])}
    out["unparseable"] = {"final": at("unparseable", steps[-1])}
    out["avg_by_step"] = {step: at("avg", step) for step in steps}
    out["curve"] = {step: at("avg", step) for step in sorted(set.intersection(*[set(rows) for _, rows in runs]))}
    out["base"] = [rows[0] for _, rows in runs if 0 in rows]
    out["final_rows"] = [(config["seed"], rows[steps[-1]]) for config, rows in runs]
    if all("toy" in rows[step] for _, rows in runs for step in steps):
        best, final = out["avg"]["best"]["step"], steps[-1]
        out["toy"] = {when: {stat: statistics.fmean(rows[step]["toy"][stat] for _, rows in runs)
                             for stat in TOY_STATS if all(rows[step]["toy"][stat] is not None for _, rows in runs)}
                      for when, step in (("base", 0), ("best", best), ("final", final))
                      if all(step in rows for _, rows in runs)}
        out["toy_styles"] = {when: {style: statistics.fmean(rows[step]["toy"]["styles"].get(style, 0.0)
                                                            for _, rows in runs)
                                    for style in {st for _, rows in runs for st in rows[step]["toy"]["styles"]}}
                             for when, step in (("base", 0), ("final", final)) if all(step in rows for _, rows in runs)}
    return out


def group_runs(run_dirs):
    """Runs equal up to SAME_ARM_IGNORES are the seeds of one arm: ([(label, [(run_dir, config,
    {step: eval row})])], the non-default settings all arms share). --compare and --plot group alike."""
    arms, seen, first = {}, {}, None
    for run_dir in run_dirs:
        real = os.path.realpath(run_dir)
        if real in seen:
            raise UserError(f"{run_dir} is given twice (also as {seen[real]}); each run counts once")
        seen[real] = run_dir
        config, rows, setting = load_compared_run(run_dir)
        first = first or (run_dir, setting)
        if setting != first[1]:
            differ = ", ".join(f"{f} {first[1][f]} vs {setting[f]}" for f in EVAL_SETTING if setting[f] != first[1][f])
            raise UserError(f"{run_dir} was evaluated with other settings than {first[0]} ({differ}); "
                            f"evaluate them alike (python eval.py RUN --samples N --questions Q --temperature T)")
        key = json.dumps({k: v for k, v in config.items() if k not in SAME_ARM_IGNORES}, sort_keys=True)
        arms.setdefault(key, []).append((run_dir, config, rows))
    extras = [non_default(runs[0][1]) for runs in arms.values()]
    shared = {k: v for k, v in extras[0].items() if all(e.get(k, object()) == v for e in extras)}
    labels = [" ".join([runs[0][1]["arm"]] + [f"{k}={v}" for k, v in extra.items() if k not in shared])
              for runs, extra in zip(arms.values(), extras)]
    return list(zip(labels, arms.values())), shared


def teacher_ceiling(config):
    """The toy world's measured accuracy of the base teacher with this arm's context (build.json's
    `ceilings`, toy.follow_rates): with a fixed base teacher the student at best becomes it. None
    for GRPO, a moving teacher, a dial setting not measured, or a model that is no toy world."""
    root = toy.world_root(config.get("model", ""))
    dial = (config.get("toy_order"), config.get("toy_phrasing"))
    key = {("grouped", "other"): config["arm"], ("chain", "same"): "reference_aligned"}.get(dial)
    if not root or config["arm"] == "grpo" or config.get("teacher") != "base" or key is None:
        return None
    if config["arm"] != "reference" and dial != ("grouped", "other"):
        return None
    try:
        with open(os.path.join(root, "build.json")) as f:
            value = json.load(f).get("ceilings", {}).get(key)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def pool_transfer(members):
    """The transfer split's Avg@k at step 0 and at each seed's last step, mean ± std over seeds
    (one seed: its CI); None unless every seed evaluated both."""
    per_seed = [transfer_rows(run_dir, next(iter(rows.values()))) for run_dir, _, rows in members]
    if not all(0 in t and max(t) > 0 for t in per_seed):
        return None

    def at(values, rows):
        return {"value": statistics.fmean(values), "step": max(r["step"] for r in rows),
                "spread": statistics.stdev(values) if len(values) > 1 else rows[0]["ci"]["avg"]}
    finals = [t[max(t)] for t in per_seed]
    return {"base": at([t[0]["avg"] for t in per_seed], [t[0] for t in per_seed]),
            "final": at([r["avg"] for r in finals], finals), "questions": finals[0]["questions"]}


def compare_runs(run_dirs):
    """Arms (runs equal up to SAME_ARM_IGNORES), each pooled: a list of dicts, plus common notes."""
    groups, shared = group_runs(run_dirs)
    result = []
    for label, members in groups:
        runs = [(config, rows) for _, config, rows in members]
        config = runs[0][0]
        k = next(iter(runs[0][1].values()))["k"]
        result.append({"label": label, "seeds": sorted(c["seed"] for c, _ in runs), "k": k,
                       "questions_per_step": config["batch_size"],
                       "rollouts_per_step": config["batch_size"] * config["samples_per_question"],
                       "ceiling": teacher_ceiling(config), "transfer": pool_transfer(members),
                       **pool_arm(runs)})
    return result, shared


def at_budget(arm, budget, per_step):
    """The arm's Avg@k (seed mean) at the evaluated step whose budget (step × per_step) is closest
    to `budget` (ties: the earlier step), or None when its last step falls short of it by more
    than half a step."""
    steps = arm["avg_by_step"]
    if max(steps) * per_step < budget - per_step / 2:
        return None
    return steps[min(steps, key=lambda s: (abs(s * per_step - budget), s))]


def rollouts_to_reach(arm, score):
    """Rollouts drawn by the first evaluated step whose seed-mean Avg@k reaches `score`, or None."""
    step = next((s for s in sorted(arm["avg_by_step"]) if s and arm["avg_by_step"][s]["value"] >= score), None)
    return None if step is None else step * arm["rollouts_per_step"]


def budget_table(arms, markdown=False, reach=0.5):
    """Both axes of the comparison: each arm at equal questions (the largest number of questions any
    arm saw: the paper's budget) and at equal rollouts (the smallest number any arm drew), with the
    rollouts it needed to reach `reach` Avg@k. Arms that never reach a budget show a dash."""
    k = arms[0]["k"]
    finals = {a["label"]: a["avg"]["final"]["step"] for a in arms}
    Q = max(finals[a["label"]] * a["questions_per_step"] for a in arms)
    R = min(finals[a["label"]] * a["rollouts_per_step"] for a in arms)
    cell = lambda entry, a: "—" if entry is None else format_cell(entry, len(a["seeds"]), 100, markdown, step=True)
    header = ["arm", "questions/step", "rollouts/step", "questions", "rollouts", f"Avg@{k} final",
              f"Avg@{k} at {Q} questions", f"Avg@{k} at {R} rollouts", f"rollouts to Avg@{k} ≥ {100 * reach:g}"]
    body = [[a["label"], str(a["questions_per_step"]), str(a["rollouts_per_step"]),
             str(finals[a["label"]] * a["questions_per_step"]), str(finals[a["label"]] * a["rollouts_per_step"]),
             cell(a["avg"]["final"], a), cell(at_budget(a, Q, a["questions_per_step"]), a),
             cell(at_budget(a, R, a["rollouts_per_step"]), a),
             "—" if (n := rollouts_to_reach(a, reach)) is None else str(n)] for a in arms]
    note = ("Budgets: questions seen and rollouts drawn (step × questions per step × G), Avg@k in % ± std "
            "over seeds; each arm at the evaluated step (in parentheses) closest to the budget, a dash where "
            "it never got there:")
    return ["", *([note] if markdown else textwrap.wrap(note, WIDTH)), ""] + table_lines(header, body, markdown)


def transfer_table(arms, markdown=False):
    """The toy world's transfer probe: Avg@k on problems whose faulty facts lie on no train chain."""
    arms = [a for a in arms if a.get("transfer")]
    if not arms:
        return []
    k = arms[0]["k"]
    body = [[a["label"], format_cell(a["transfer"]["base"], len(a["seeds"]), 100, markdown),
             format_cell(a["transfer"]["final"], len(a["seeds"]), 100, markdown, step=True),
             format_cell(a["avg"]["final"], len(a["seeds"]), 100, markdown, step=True)] for a in arms]
    note = (f"Transfer probe ({arms[0]['transfer']['questions']} problems none of whose faulty facts lies on "
            f"a train chain): Avg@{k} in %, base and final, beside the test set's final:")
    return ["", *([note] if markdown else textwrap.wrap(note, WIDTH)), ""] + \
        table_lines(["arm", f"transfer Avg@{k} base", f"transfer Avg@{k} final (step)", f"test Avg@{k} final (step)"],
                    body, markdown)


def format_cell(entry, seeds, scale=100, markdown=False, step=False):
    """mean ± std over seeds, 1 decimal (one seed: the value; its CI is in the --ci table)."""
    text = f"{scale * entry['value']:.1f}"
    if seeds > 1:
        text += (" ± " if markdown else "±") + f"{scale * entry['spread']:.1f}"
    return text + (f" ({entry['step']})" if step else "")


def base_rows(arms):
    """Step 0 (the base model) pooled over seeds: one entry when every arm starts from the same
    base (equal base_key up to the seed), else one per group of arms. A base row reused by another
    arm (same base_key) counts once; rows without a base_key (older logs) count per run."""
    groups = {}  # base_key without the seed -> ({base_key: row}, arm labels)
    for a in arms:
        for index, row in enumerate(a["base"]):
            key = row.get("base_key") or {"row": f"{a['label']}/{index}"}
            family = json.dumps({f: v for f, v in key.items() if f not in ("seed", "row")}, sort_keys=True)
            rows, labels = groups.setdefault(family, ({}, []))
            rows[json.dumps(key, sort_keys=True)] = row
            if a["label"] not in labels:
                labels.append(a["label"])
    out = []
    for rows, labels in groups.values():
        rows = list(rows.values())

        def at(metric):
            values = [r[metric] for r in rows]
            return {"value": statistics.fmean(values), "step": 0,
                    "spread": statistics.stdev(values) if len(values) > 1 else rows[0]["ci"][metric]}
        label = "base (step 0)" if len(groups) == 1 else "base of " + ", ".join(labels)
        out.append({"label": label, "n": len(rows), **{m: at(m) for m in METRICS}})
    return out


def comparison_table(arms, shared, markdown=False, ci=False, reach=0.5):
    """The final checkpoint of each arm (and the base; on a toy world each self-distillation arm's
    teacher ceiling beside it), the best checkpoint in a second table, with --ci each run's 95%
    bootstrap intervals in a third; when the arms' budgets differ, both axes (budget_table); the
    toy world's transfer probe and attribution. Plain text fits WIDTH columns."""
    k = arms[0]["k"]
    ceilings = any(a["ceiling"] is not None for a in arms)  # a toy world's teacher, beside its students
    header = ["arm", "seeds", "step", f"Pass@{k}", f"Maj@{k}", f"Avg@{k}", "len", "unparsed"]
    header += ["teacher ceiling"] if ceilings else []
    body = []
    equal = [""] if ceilings else []  # the base has no teacher
    for base in base_rows(arms):
        body.append([base["label"], str(base["n"]), "0"] + [format_cell(base[m], base["n"], 100, markdown)
                                                            for m in ("pass", "maj", "avg")]
                    + [format_cell(base["length"], base["n"], 1, markdown),
                       format_cell(base["unparseable"], base["n"], 100, markdown)] + equal)
    for a in arms:
        seeds = len(a["seeds"])
        body.append([a["label"], str(seeds), str(a["avg"]["final"]["step"])]
                    + [format_cell(a[m]["final"], seeds, 100, markdown) for m in ("pass", "maj", "avg")]
                    + [format_cell(a["length"]["final"], seeds, 1, markdown),
                       format_cell(a["unparseable"]["final"], seeds, 100, markdown)]
                    + ([f"{100 * a['ceiling']:.1f}" if a["ceiling"] is not None else "—"] if ceilings else []))
    lines = ["Final checkpoint (step), in % (len: tokens); ± = std over seeds:", ""]
    lines += table_lines(header, body, markdown)
    best_header = ["arm"] + [f"{name}@{k} best" for _, name in TABLE_METRICS] + ["len at best Avg"]
    best_body = [[a["label"]] + [format_cell(a[m]["best"], len(a["seeds"]), 100, markdown, step=True)
                                 for m, _ in TABLE_METRICS]
                 + [format_cell(a["length"]["best"], len(a["seeds"]), 1, markdown, step=True)] for a in arms]
    lines += ["", "Best checkpoint (step) of the seed-mean curve; it is picked on the test set and flatters:", ""]
    lines += table_lines(best_header, best_body, markdown)
    if ci:
        lines += ["", "95% bootstrap CI over questions, final checkpoint, each run:", ""]
        lines += table_lines(["arm", "seed", "step"] + [f"{name}@{k}" for _, name in TABLE_METRICS] + ["unparsed"],
                             [[a["label"], str(seed), str(row["step"])]
                              + [f"[{100 * row['ci'][m][0]:.1f}, {100 * row['ci'][m][1]:.1f}]"
                                 for m in ("pass", "maj", "avg", "unparseable")]
                              for a in arms for seed, row in a["final_rows"]], markdown)
    notes = [""]
    if any(len(a["seeds"]) == 1 for a in arms) and not ci:
        notes.append("One seed: no ± (add --ci for each run's bootstrap interval over questions).")
    if shared:
        notes.append("All arms: " + ", ".join(f"{k}={v}" for k, v in shared.items()))
    if ceilings:
        notes.append("Teacher ceiling: the base teacher's accuracy with the arm's own context on the base's "
                     "wrong attempts (a reference: on the questions), measured when the toy world was built "
                     "(build.json 'ceilings'); with a fixed base teacher the student at best becomes it.")
    if len({a["k"] for a in arms}) > 1:
        notes.append("WARNING: the runs were evaluated with different k")
    if not markdown:  # prose wraps too, so the whole output fits WIDTH
        notes = [textwrap.fill(note, WIDTH) for note in notes]
    budgets = len({(a["questions_per_step"], a["rollouts_per_step"]) for a in arms}) > 1
    more = (budget_table(arms, markdown, reach) if budgets else []) + transfer_table(arms, markdown)
    return "\n".join(lines + notes + more + toy_table(arms, markdown))


def per_step_table(arms, markdown=False):
    """Avg@k of each arm at every step all its seeds evaluated (step 0 = the base), in %."""
    k = arms[0]["k"]
    steps = sorted({s for a in arms for s in a["curve"]})
    body = [[a["label"], str(len(a["seeds"]))] + [format_cell(a["curve"][s], len(a["seeds"]), 100, markdown)
                                                   if s in a["curve"] else "" for s in steps] for a in arms]
    lines = [f"Avg@{k} (%) at each evaluated step (columns: training step); ± = std over seeds:", ""]
    lines += table_lines(["arm", "seeds"] + [str(s) for s in steps], body, markdown)
    if len({a["rollouts_per_step"] for a in arms}) > 1:
        lines += ["", "Rollouts per step differ (questions × G: " + ", ".join(
            f"{a['label']} {a['rollouts_per_step']}" for a in arms) + "): compare arms at equal steps with care."]
    return "\n".join(lines if markdown else [textwrap.fill(line, WIDTH) for line in lines])


WIDTH = 100  # plain-text tables fit a terminal this wide: wider ones continue in a second block
LABEL_WIDTH = 18  # the arm column wraps its settings onto indented lines beyond this


def table_lines(header, body, markdown, width=WIDTH):
    """Rows as a markdown table, or as aligned plain-text columns. In plain text the first column
    wraps at its spaces, and columns that do not fit `width` continue below, the first column repeated."""
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
            ["| " + " | ".join(row) + " |" for row in body]
    rows = [header] + body
    labels = [textwrap.wrap(r[0], LABEL_WIDTH, subsequent_indent="  ", break_long_words=False) or [""] for r in rows]
    first = max(len(line) for lines in labels for line in lines)
    widths = {i: max(len(r[i]) for r in rows) for i in range(1, len(header))}
    blocks, used = [[]], first
    for i, w in widths.items():  # greedy: as many columns per block as fit
        if blocks[-1] and used + 2 + w > width:
            blocks.append([])
            used = first
        blocks[-1].append(i)
        used += 2 + w
    lines = []
    for block in blocks:
        lines += [""] if lines else []
        for row, label in zip(rows, labels):
            for j, part in enumerate(label):
                cells = [part.ljust(first)] + [(row[i] if j == 0 else "").ljust(widths[i]) for i in block]
                lines.append("  ".join(cells).rstrip())
    return lines


def toy_table(arms, markdown):
    """The toy world's attribution: per-step arithmetic, chaining, answer = own last result and the
    style mix, at the base (step 0), the Avg-best step and the final step (seed means, in %)."""
    arms = [a for a in arms if "toy" in a]
    if not arms:
        return []
    whens = ("base", "best", "final")
    header = ["arm"] + [f"{stat} {when}" for stat in TOY_STATS for when in whens] + ["styles final"]
    body = [[a["label"]] + [f"{100 * a['toy'][w][stat]:.1f}" if stat in a["toy"].get(w, {}) else "n/a"
                            for stat in TOY_STATS for w in whens]
            + [" ".join(f"{k} {100 * v:.0f}" for k, v in sorted(a["toy_styles"].get("final", {}).items(),
                                                                 key=lambda kv: -kv[1]) if v >= 0.005)]
            for a in arms]
    lines = table_lines(header, body, markdown)
    return ["", "Toy world, what moved (toy.trace_stats, % of parsed steps / responses; seed means):", ""] + lines


# ---------------------------------------------------------------------------------------------
# --plot: Avg@k over training per arm, and the training log's reward, KL and length.

MATPLOTLIB = "-r requirements-plot.txt"  # optional: figures (matplotlib); without it, CSV only
TRAIN_CURVES = (("train/reward", "train reward (share right)"), ("train/kl", "KL per distilled token (SD arms)"),
                ("train/response_len", "response length (tokens)"))


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def seed_stats(per_seed):
    """{x: [value per seed]} → [(x, mean, std, min, max, n)], at the x every seed has."""
    xs = sorted(set.intersection(*[set(values) for values in per_seed]))
    out = []
    for x in xs:
        values = [values[x] for values in per_seed]
        out.append((x, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                    min(values), max(values), len(values)))
    return out


def plot_rows(run_dirs):
    """(rows, evaluation setting): the figure's data, one dict per (arm, metric, step): mean, std,
    min and max over seeds.
    Arms are grouped as --compare groups them; metric "avg" is Avg@k from eval.jsonl (steps every
    seed evaluated, step 0 = the base), the others come from metrics.jsonl (steps every seed logged)."""
    groups, _ = group_runs(run_dirs)
    setting = next(iter(groups[0][1][0][2].values()))  # every run shares it (group_runs checks)
    rows = []
    for label, members in groups:
        config = members[0][1]
        rate = config["batch_size"] * config["samples_per_question"]  # rollouts per step: questions × G
        curves = {"avg": [{step: row["avg"] for step, row in evals.items()} for _, _, evals in members]}
        logs = [{m["step"]: m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}
                for run_dir, _, _ in members]
        for key, _ in TRAIN_CURVES:  # the last line of a step wins (a resumed run logs it again)
            curves[key] = [{step: m[key] for step, m in log.items() if m.get(key) is not None} for log in logs]
        for metric, per_seed in curves.items():
            for step, mean, std, low, high, n in seed_stats(per_seed):
                rows.append({"arm": label, "metric": metric, "step": step, "rollouts": step * rate,
                             "mean": mean, "std": std, "min": low, "max": high, "seeds": n})
        ceiling = teacher_ceiling(config)  # a toy world's teacher with this arm's context
        if ceiling is not None:
            rows.append({"arm": label, "metric": "ceiling", "step": 0, "rollouts": 0, "mean": ceiling,
                         "std": 0.0, "min": ceiling, "max": ceiling, "seeds": len(members)})
    return rows, setting


def plot_training(run_dirs, out, x="step"):
    """Write OUT (PNG) and its data as OUT with .csv: Avg@k over training per arm (line: mean over
    seeds; band: min–max over seeds; dashed: the base), and train reward, KL and response length.
    Without matplotlib only the CSV is written. Returns the paths written."""
    rows, setting = plot_rows(run_dirs)
    csv_path = os.path.splitext(out)[0] + ".csv"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plt = pyplot()
    if plt is None:
        print(f"wrote {csv_path}; for the PNG: pip install {MATPLOTLIB}")
        return [csv_path]
    from matplotlib.ticker import MaxNLocator
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    fig = plt.figure(figsize=(11, 7.5))
    grid = fig.add_gridspec(2, len(TRAIN_CURVES), height_ratios=(1.7, 1))
    top = fig.add_subplot(grid[0, :])
    heading = (f"Avg@{setting['k']} (%) on {setting['questions']} test questions × {setting['n']} samples, "
               f"T = {setting['temperature']}")
    panels = [(top, "avg", heading, 100)] + [
        (fig.add_subplot(grid[1, i]), key, title, 1) for i, (key, title) in enumerate(TRAIN_CURVES)]
    for ax, metric, title, scale in panels:
        for arm in arms:
            points = [r for r in rows if r["arm"] == arm and r["metric"] == metric]
            if not points:
                continue  # e.g. GRPO logs no KL
            xs = [p[x] for p in points]
            seeds = max(p["seeds"] for p in points)
            ax.plot(xs, [scale * p["mean"] for p in points], color=colours[arm],
                    label=f"{arm} ({seeds} seed{'s' if seeds != 1 else ''})",
                    marker="o" if metric == "avg" else None, markersize=4, linewidth=1.5 if metric == "avg" else 1)
            if seeds > 1:
                ax.fill_between(xs, [scale * p["min"] for p in points], [scale * p["max"] for p in points],
                                color=colours[arm], alpha=0.2, linewidth=0)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged by these arms", ha="center", va="center", transform=ax.transAxes,
                    fontsize=9, color="0.4")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rollouts are counts
    for r in (r for r in rows if r["metric"] == "ceiling"):  # dotted, in the arm's colour
        top.axhline(100 * r["mean"], color=colours[r["arm"]], linestyle=":", linewidth=1.2,
                    label=f"teacher ceiling of {r['arm']} ({100 * r['mean']:.1f})")
    base = [r["mean"] for r in rows if r["metric"] == "avg" and r["step"] == 0]
    if base:
        top.axhline(100 * statistics.fmean(base), color="0.4", linestyle="--", linewidth=1,
                    label=f"base, step 0 ({100 * statistics.fmean(base):.1f})")
    handles, labels = top.get_legend_handles_labels()  # under the figure: never over a curve
    fig.legend(handles, labels, title="line: mean over seeds; band: min–max over seeds; dotted: the arm's "
               "teacher with its context (build.json)" if any(r["metric"] == "ceiling" for r in rows) else
               "line: mean over seeds; band: min–max over seeds", fontsize=8,
               title_fontsize=8, loc="lower center", ncol=3)
    rates = {r["arm"]: r["rollouts"] // r["step"] for r in rows if r["step"]}
    label = "training step" if x == "step" else "rollouts (steps × questions per step × G)"
    if x == "step" and len(set(rates.values())) > 1:
        label += " (rollouts per step: " + ", ".join(f"{a} {n}" for a, n in rates.items()) + ")"
    top.set_xlabel(label, fontsize=9)
    for ax, *_ in panels[1:]:
        ax.set_xlabel("training step" if x == "step" else "rollouts", fontsize=9)
    fig.tight_layout(rect=(0, 0.03 * (1 + math.ceil(len(labels) / 3)), 1, 1))  # room for the legend
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out} and {csv_path}")
    return [out, csv_path]


# ---------------------------------------------------------------------------------------------
# Per-token advantage A_t: one student forward, one teacher forward per context (batched rows).

KINDS = ("reference", "critique", "critique_quoting", "critique_no_prefix")


def response_logp(model, cfg, prompts, responses, pad_id, device):
    """log π(ŷ_t | prompt, ŷ<t) for each response: a list of (T_i,) tensors. The caller decides
    which model this is (adapter on or off). The LM head runs on `chunk_size` positions at a time,
    so no (B, T, V) tensor is ever held (DESIGN.md, memory rule)."""
    weight = model.get_base_model().get_output_embeddings().weight  # (V, d)
    out = []
    for i in range(0, len(prompts), cfg.micro_batch):
        part = responses[i:i + cfg.micro_batch]
        rows = contexts.build_rows(prompts[i:i + cfg.micro_batch], part, pad_id)
        mask = rows["response_mask"].to(device)  # (B, T), responses right-aligned
        hidden = common.response_hidden(model, rows, mask.shape[1], device)[mask]  # (N, d)
        ids = rows["input_ids"][:, -mask.shape[1]:].to(device)[mask]  # (N,) the tokens ŷ_t
        chunk = selfdistill.chunk_positions(cfg.chunk_size, weight.shape[0])  # chunk_size=0: from the budget
        logp = common.token_log_probs(hidden, weight, ids, chunk, cfg.logit_temperature)  # (N,)
        out += list(logp.cpu().split([len(r) for r in part]))  # row-major: one piece per response
    return out


@torch.no_grad()
def batch_advantages(model, tokenizer, cfg, device, questions, responses, context_texts):
    """{kind: [A (T_i,)]} for context_texts = {kind: [text per response]}. Teacher = the base
    model (adapter off) with the context; student = the model as it is, without context."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    student_prompts = [contexts.student_prompt_ids(tokenizer, q, cfg.prompts, cfg.student_thinking)
                       for q in questions]
    student_logp = response_logp(model, cfg, student_prompts, responses, pad, device)
    out = {}
    for kind, texts in context_texts.items():
        teacher_prompts = [contexts.teacher_prompt_ids(tokenizer, q, c, kind, cfg.prompts,
                                                       cfg.teacher_thinking, cfg.max_context_tokens)
                           for q, c in zip(questions, texts)]
        with model.disable_adapter():  # the teacher: the initial base model, no gradient
            teacher_logp = response_logp(model, cfg, teacher_prompts, responses, pad, device)
        out[kind] = [t - s for t, s in zip(teacher_logp, student_logp)]
    model.train(was_training)
    return out


def token_advantages(model, tokenizer, question, response_ids, context_text, kind, cfg, device):
    """A_t (T,) of one response under one context `kind` (see KINDS)."""
    return batch_advantages(model, tokenizer, cfg, device, [question], [response_ids],
                            {kind: [context_text]})[kind][0]


FOCUS_FLOOR = 0.01  # nats: the least mean |A| on a prefix that a focus ratio divides by


def advantage_summary(A, prefix_mask, wrong_mask, after_mask, prefix_has_step=True):
    """Mean A_t on the correct prefix, on the first wrong step and after it, mean |A| on the prefix
    (`prefix_abs`), and the error-focus ratio |mean A on the wrong step| / max(prefix_abs,
    FOCUS_FLOOR). None where undefined. The prefix statistics need a correct step before the wrong
    one: with step 1 wrong the prefix is that step's tag alone, a forced token with A ≈ 0, and the
    ratio came out near 10^5. The floor is there because a prefix that teacher and student score
    alike (|A| → 0, which is what a good critique does) would send one rollout's ratio to infinity:
    below 0.01 nats (a 1 % probability ratio) I call the prefix untouched, so one rollout's ratio
    is at most 100·|mean A on the wrong step| and a median over rollouts stays readable."""
    def mean(x):
        return x.mean().item() if x.numel() else None
    out = {"prefix": mean(A[prefix_mask]), "wrong": mean(A[wrong_mask]), "after": mean(A[after_mask])}
    out["prefix_abs"] = mean(A[prefix_mask].abs())
    if not prefix_has_step:
        out["prefix"] = out["prefix_abs"] = None
    defined = out["wrong"] is not None and out["prefix_abs"] is not None
    out["focus"] = abs(out["wrong"]) / max(out["prefix_abs"], FOCUS_FLOOR) if defined else None
    return out


def spread(values):
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


# ---------------------------------------------------------------------------------------------
# Rollouts to analyse, their steps, and the contexts (two of them controls).


first_wrong_step = contexts.first_differing_step


def wrong_rollouts(model, tokenizer, cfg, device, records, judge, limit):
    """Up to `limit` rollouts with reward 0 and a locatable first wrong step. A record may carry
    its own `response_ids` (and `critique`); the others get one fresh sample from the model."""
    chosen = []
    for start in range(0, len(records), max(4 * limit, 16)):
        batch = records[start:start + max(4 * limit, 16)]
        fresh = [i for i, r in enumerate(batch) if "response_ids" not in r]
        prompts = [contexts.student_prompt_ids(tokenizer, batch[i]["question"], cfg.prompts,
                                               cfg.student_thinking) for i in fresh]
        sampled = dict(zip(fresh, common.generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature,
                                                  cfg.top_p, cfg.top_k, cfg.generation_batch)[0])) if fresh else {}
        for i, record in enumerate(batch):
            ids = record.get("response_ids") or sampled[i]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if critic.reward(text, record["answer"], selfdistill.exact_answers(cfg)):
                continue
            critique = record.get("critique") or judge([record["question"]], [text],
                                                       [record.get("solution", "")], [record["answer"]])[0]
            wrong = first_wrong_step(text, critique)
            if wrong is not None and critic.validate_critique(text, critique)[0]:
                chosen.append({**record, "response_ids": list(ids), "text": text,
                               "critique": critique, "wrong_step": wrong})
        if len(chosen) >= limit:
            break
    return chosen[:limit]


def analysis_contexts(cfg, item, kinds):
    """The context text of each kind for one rollout: the reference, the critique and the paper's
    two controls (contexts.critique_form). In the toy world the no-prefix control rewrites every
    step in the reference-only surface form (same route and values, another phrasing)."""
    reference_cfg = dataclasses.replace(cfg, arm="reference")
    texts = {"reference": lambda: selfdistill.teacher_context(reference_cfg, item)}
    restyle = selfdistill.toy_restyle(cfg)
    return {kind: texts[kind]() if kind == "reference" else
            contexts.critique_form(kind, item["text"], item["critique"], restyle) for kind in kinds}


def analyze_rollouts(model, tokenizer, cfg, device, items, kinds=KINDS):
    """A_t under every context for each rollout: JSON-ready dicts (tokens, A per kind, step
    boundaries, wrong span, summary per kind). Rollouts whose wrong step cannot be located are dropped."""
    pieces = [contexts.token_pieces(tokenizer, it["response_ids"]) for it in items]
    located = [(it, p, *contexts.step_regions(p, it["wrong_step"])) for it, p in zip(items, pieces)]
    located = [entry for entry in located if entry[3] is not None]
    if not located:
        return []
    texts = [analysis_contexts(cfg, it, kinds) for it, *_ in located]
    A = batch_advantages(model, tokenizer, cfg, device, [it["question"] for it, *_ in located],
                         [it["response_ids"] for it, *_ in located],
                         {kind: [t[kind] for t in texts] for kind in kinds})
    results = []
    for i, (item, tokens, boundaries, masks) in enumerate(located):
        wrong = masks[1].nonzero().flatten().tolist()
        results.append({
            "question": item["question"], "answer": item["answer"], "response": item["text"],
            "tokens": tokens, "step_starts": boundaries,
            "wrong_step": item["wrong_step"] + 1, "wrong_span": [wrong[0], wrong[-1] + 1] if wrong else None,
            "contexts": {kind: {"text": texts[i][kind], "A": [round(a, 4) for a in A[kind][i].tolist()]}
                         for kind in kinds},
            "summary": {kind: advantage_summary(A[kind][i], *masks, prefix_has_step=item["wrong_step"] > 0)
                        for kind in kinds}})
    return results


def summarize_contexts(results, kinds):
    """Per context and statistic: mean, std and n over rollouts; plus the pooled error-focus ratio
    |mean A on the wrong step| / mean of mean |A| on the prefix, both over the rollouts that have a
    correct step before the wrong one. A per-rollout ratio is noisy (see advantage_summary), so
    the pooled ratio is the headline and the per-rollout median stands beside it."""
    out = {}
    for kind in kinds:
        out[kind] = {stat: spread([r["summary"][kind].get(stat) for r in results])
                     for stat in ("prefix", "wrong", "after", "focus", "prefix_abs")}
        with_prefix = [r["summary"][kind] for r in results
                       if r["summary"][kind]["prefix_abs"] is not None and r["summary"][kind]["wrong"] is not None]
        wrong = spread([s["wrong"] for s in with_prefix])["mean"]
        scale = spread([s["prefix_abs"] for s in with_prefix])["mean"]
        ratios = [s["focus"] for s in with_prefix if s["focus"] is not None]
        out[kind]["focus_pooled"] = {
            "mean": abs(wrong) / max(scale, FOCUS_FLOOR) if with_prefix else None,
            "median_per_rollout": statistics.median(ratios) if ratios else None, "n": len(ratios)}
    return out


# ---------------------------------------------------------------------------------------------
# Analysis output: HTML (self-contained), JSON, and Fig. 4-style PNGs when matplotlib exists.

CSS = """body{font-family:sans-serif;margin:2em;max-width:70em}
.r{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ccc;padding:.5em}
.s{border-left:2px solid #222;padding-left:1px}.w{box-shadow:inset 0 -3px 0 #000}
details{margin:.3em 0}pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em}
table{border-collapse:collapse}td,th{padding:.2em .7em;text-align:right;border-bottom:1px solid #ddd}
td{white-space:nowrap}td:first-child,th:first-child{text-align:left}"""
COLOUR_PERCENTILE = 95  # full colour at this percentile of |A_t| over the page; larger values saturate
ALIGN_WINDOW = 40  # the pooled figure: tokens either side of the first wrong step's start


def colour_scale(results, kinds):
    """|A_t| (nats) drawn at full colour: the COLOUR_PERCENTILE-th percentile of |A_t| over every
    token of every rollout and context on the page, so colours use the range the data has (a fixed
    scale left most tokens nearly white); 1.0 if every A_t is 0."""
    values = torch.tensor([abs(a) for r in results for kind in kinds for a in r["contexts"][kind]["A"]])
    scale = torch.quantile(values, COLOUR_PERCENTILE / 100).item() if values.numel() else 0.0
    return scale or 1.0


def token_html(piece, a, is_boundary, is_wrong, scale):
    """One token as a coloured span, escaped: <, >, & and quotes as entities, newlines as ↵."""
    rgb = "215,48,39" if a < 0 else "69,117,180"  # red: the context says change it; blue: keep it
    alpha = min(abs(a) / scale, 1.0)
    classes = " ".join(c for c, on in (("s", is_boundary), ("w", is_wrong)) if on)
    classes = f' class="{classes}"' if classes else ""
    title = html.escape(f"A = {a:+.3f}   {piece!r}", quote=True)
    shown = html.escape(piece, quote=True).replace("\n", "↵<br>")
    return f'<span{classes} style="background:rgba({rgb},{alpha:.2f})" title="{title}">{shown}</span>'


def number(value, signed=True, digits=3):
    return "n/a" if value is None else f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def summary_html(summary):
    """The page's first table: per context, mean ± std over rollouts of mean A_t per region, and
    the error focus (pooled, and the median of the per-rollout ratios)."""
    head = ("<tr><th>context</th><th>rollouts</th><th>with a correct prefix</th><th>A on the correct prefix</th>"
            "<th>A on the first wrong step</th><th>A after it</th><th>error focus, pooled</th>"
            "<th>focus, median per rollout</th></tr>")
    rows = []
    for kind, s in summary.items():
        cells = [f"{number(s[stat]['mean'])} ± {number(s[stat]['std'], False)}"
                 for stat in ("prefix", "wrong", "after")]
        focus = s["focus_pooled"]
        rows.append(f"<tr><td>{html.escape(kind)}</td><td>{s['wrong']['n']}</td><td>{focus['n']}</td><td>"
                    + "</td><td>".join(cells) + f"</td><td>{number(focus['mean'], False, 2)}</td>"
                    f"<td>{number(focus['median_per_rollout'], False, 2)}</td></tr>")
    return (f"<table>{head}{''.join(rows)}</table><p>A in nats, mean ± std over rollouts. The prefix and the "
            f"error focus (|mean A on the wrong step| / mean |A| on the prefix) need a correct step before the "
            f"wrong one, so they are over the rollouts that have one; a per-rollout ratio divides by at least "
            f"{FOCUS_FLOOR:g} nats.</p>")


def render_html(results, kinds, heading, summary=None):
    scale = colour_scale(results, kinds)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(heading)}</h1>",
             summary_html(summary) if summary else "",
             f"<p>A<sub>t</sub> = log π<sub>T</sub>(y<sub>t</sub>|x,c,y<sub>&lt;t</sub>) − log π<sub>θ</sub>"
             f"(y<sub>t</sub>|x,y<sub>&lt;t</sub>): <span style='background:rgba(215,48,39,.8)'>negative"
             f"</span> change it, <span style='background:rgba(69,117,180,.8)'>positive</span> keep it "
             f"(full colour at |A| ≥ {scale:.3g} nats, the {COLOUR_PERCENTILE}th percentile of |A| on this page). "
             f"A bar opens each step tag; the first wrong step is underlined. Hover a token for its value.</p>"]
    for n, r in enumerate(results, start=1):
        parts.append(f"<h2>Rollout {n}: {html.escape(r['question'])} (gold {html.escape(str(r['answer']))}, "
                     f"first wrong step {r['wrong_step']})</h2>")
        wrong = range(*r["wrong_span"]) if r["wrong_span"] else range(0)
        for kind in kinds:
            ctx, s = r["contexts"][kind], r["summary"][kind]
            stats = (f"prefix {number(s['prefix'], digits=2)}, wrong step {number(s['wrong'], digits=2)}, "
                     f"after {number(s['after'], digits=2)}, focus {number(s['focus'], False, 1)}")
            spans = "".join(token_html(p, a, t in r["step_starts"], t in wrong, scale)
                            for t, (p, a) in enumerate(zip(r["tokens"], ctx["A"])))
            parts.append(f"<h3>{kind}</h3><p>{stats}</p><details><summary>context</summary>"
                         f"<pre>{html.escape(ctx['text'])}</pre></details><div class='r'>{spans}</div>")
    return "\n".join(parts + ["</body></html>"])


def aligned_advantages(results, kinds, window=ALIGN_WINDOW):
    """Fig. 4 pooled over rollouts: per context, mean A_t and its standard error at each token offset
    from the first wrong step's start (offset 0 = its first token after the tag), -window..window,
    with n = the rollouts that have a token at that offset."""
    out = {}
    for kind in kinds:
        by_offset = {offset: [] for offset in range(-window, window + 1)}
        for r in (r for r in results if r["wrong_span"]):
            start = r["wrong_span"][0]
            for t, a in enumerate(r["contexts"][kind]["A"]):
                if -window <= t - start <= window:
                    by_offset[t - start].append(a)
        kept = [(o, v) for o, v in by_offset.items() if v]
        out[kind] = {"offset": [o for o, _ in kept], "mean": [statistics.fmean(v) for _, v in kept],
                     "se": [statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None for _, v in kept],
                     "n": [len(v) for _, v in kept]}
    return out


def plot_aligned(aligned, results, path, heading=""):
    """The pooled Fig. 4: mean A_t over rollouts against the offset from the first wrong step, one
    line per context, ± 2 standard errors, where at least a fifth of the rollouts reach."""
    plt = pyplot()
    if plt is None:
        return None
    least = max(2, math.ceil(len(results) / 5))
    lengths = [r["wrong_span"][1] - r["wrong_span"][0] for r in results if r["wrong_span"]]
    if not lengths:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.axvspan(0, statistics.median(lengths), color="red", alpha=0.08,
               label=f"first wrong step (median length {statistics.median(lengths):g} tokens)")
    ax.axhline(0, color="0.6", linewidth=0.8)
    for kind, curve in aligned.items():
        points = [(offset, mean, se) for offset, mean, se, n in
                  zip(curve["offset"], curve["mean"], curve["se"], curve["n"]) if n >= least]
        if not points:
            continue
        offsets, means, errors = zip(*points)
        line, = ax.plot(offsets, means, linewidth=1.4, label=kind)
        ax.fill_between(offsets, [m - 2 * se for m, se in zip(means, errors)],
                        [m + 2 * se for m, se in zip(means, errors)], color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("token offset from the start of the first wrong step")
    ax.set_ylabel("mean A_t (nats)")
    ax.set_title(f"{heading}: {len(results)} wrong rollouts aligned at the first wrong step\n"
                 f"line: mean over rollouts; band: ± 2 standard errors (offsets that ≥ {least} rollouts reach)",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_png(result, kinds, path):
    """Fig. 4's layout: A_t along one rollout, one panel per context, the first error marked."""
    plt = pyplot()
    if plt is None:
        return None  # optional: the HTML and JSON carry the same numbers
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 2.2 * len(kinds)), sharex=True, sharey=True,
                             squeeze=False)  # one y scale: magnitudes compare across contexts
    for ax, kind in zip(axes[:, 0], kinds):
        ax.bar(range(len(result["tokens"])), result["contexts"][kind]["A"], width=1.0, color="0.3")
        for boundary in result["step_starts"]:
            ax.axvline(boundary, color="0.85", linewidth=0.8, zorder=0)
        if result["wrong_span"]:
            ax.axvspan(*result["wrong_span"], color="red", alpha=0.15)  # the first wrong step
        ax.set_ylabel("A_t")
        ax.set_title(kind, fontsize=9)
    axes[-1, 0].set_xlabel("response token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def analysis_config(target, overrides):
    """(cfg, run_dir or None): a run folder's config, or a model folder / "toy" plus key=value."""
    is_run = os.path.isfile(os.path.join(target, "config.yaml"))
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", target) and not os.path.exists(target)
    if not is_run and target != "toy" and not os.path.isdir(target) and not hub_id:
        raise UserError(f"{target} is neither a run folder (no config.yaml) nor a model folder")
    values = common.parse_overrides(selfdistill.Config, selfdistill.CHOICES, overrides)
    if not is_run:  # a model: the derived values a run of it would have (G, length budget)
        return selfdistill.resolve(selfdistill.Config(**{"model": target, **values})), None
    cfg = load_run_config(target, trust_remote_code=values.get("trust_remote_code", False))
    for key, value in values.items():
        setattr(cfg, key, value)
    common.check_consistency(cfg)
    return cfg, target


def analyze(target, overrides=(), step=0, rollouts=8, out=None):
    cfg, run_dir = analysis_config(target, overrides)
    device = common.pick_device(cfg)
    model_path, _, test_path = toy.resolve_paths(cfg)
    records = common.load_jsonl(test_path, need_solution=cfg.model != "toy", normalize=critic.normalize_answer)
    steps = checkpoint_steps(run_dir) if run_dir else {0: None}
    if step not in steps:
        raise UserError(f"no checkpoint for step {step}; available: {sorted(steps)}")
    model, tokenizer = common.load_model(cfg, model_path, device)
    load_adapter(model, steps[step])
    torch.manual_seed(cfg.seed)
    items = wrong_rollouts(model, tokenizer, cfg, device, records, selfdistill.make_judge(cfg, device), rollouts)
    results = analyze_rollouts(model, tokenizer, cfg, device, items)
    if not results:
        raise UserError("found no wrong rollout with a locatable first wrong step to analyse")
    summary = summarize_contexts(results, KINDS)
    aligned = aligned_advantages(results, KINDS)
    # a run's analysis lives in the run; a model's in ./analysis/NAME, so two models never overwrite
    out = out or (os.path.join(run_dir, "analysis") if run_dir else
                  os.path.join("analysis", os.path.basename(os.path.normpath(target))))
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"advantage_step_{step:06d}")
    with open(stem + ".json", "w") as f:
        json.dump({"target": target, "step": step, "summary": summary, "colour_scale": colour_scale(results, KINDS),
                   "aligned": aligned, "rollouts": results}, f)
    with open(stem + ".html", "w") as f:
        f.write(render_html(results, KINDS, f"Per-token advantage: {target}, step {step}", summary))
    pngs = [p for p in (plot_png(results[0], KINDS, stem + ".png"),
                        plot_aligned(aligned, results, stem + "_aligned.png", f"{target}, step {step}")) if p]
    print(f"{len(results)} rollouts; mean ± std over rollouts")
    for kind, stats in summary.items():
        print(f"{kind:>20}: " + "  ".join(
            f"{stat} {s['mean']:+.3f}±{s['std'] or 0:.3f}" if s["mean"] is not None else f"{stat} n/a"
            for stat, s in stats.items() if stat in ("prefix", "wrong", "after")))
        pooled = stats["focus_pooled"]
        if pooled["mean"] is not None:
            print(f"{'':>20}  error focus (pooled) {pooled['mean']:.2f}, per-rollout median "
                  f"{pooled['median_per_rollout']:.2f} (n {pooled['n']})")
    print(f"wrote {stem}.html, {stem}.json" + "".join(f", {p}" for p in pngs)
          + ("" if pngs else f" (for the PNGs: pip install {MATPLOTLIB})"))
    return summary


# ---------------------------------------------------------------------------------------------
# Data preparation: OpenMathReasoning records → our JSONL, with the paper's difficulty filter.

def read_openmath(path):
    """Records with problem, generated_solution, expected_answer from JSONL or parquet."""
    if not os.path.isfile(path):
        raise UserError(f"input file {path} not found")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet
        except ImportError:
            raise UserError("reading parquet needs pyarrow (pip install pyarrow), or give a JSONL file") from None
        rows = pyarrow.parquet.read_table(path).to_pylist()
    else:
        rows = []
        for lineno, line in enumerate(open(path), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    keys = ("problem", "generated_solution", "expected_answer")
    usable = [r for r in rows if isinstance(r, dict) and all(r.get(k) not in (None, "") for k in keys)]
    if not usable:
        raise UserError(f"none of the {len(rows)} records of {path} has problem, generated_solution and "
                        f"expected_answer (the OpenMathReasoning fields)")
    return [{"id": r.get("id", i), "question": r["problem"], "answer": str(r["expected_answer"]),
             "solution": r["generated_solution"]} for i, r in enumerate(usable)], len(rows) - len(usable)


def prepare(input_path, overrides=(), out="data/omr", test_size=30, samples=16, max_correct=4, seed=0):
    """Keep the problems the paper kept: the solver's Avg@16 below 5/16 (at most `max_correct` of
    `samples` right), a wrong rollout in well-formed steps, and a critic that, given it, writes a
    valid critique reaching the expected answer. Writes OUT/train.jsonl, OUT/test.jsonl, OUT/prepare.json."""
    records, skipped = read_openmath(input_path)
    cfg, _ = analysis_config(overrides[0] if overrides else "toy", overrides[1:])
    device = common.pick_device(cfg)
    model, tokenizer = common.load_model(cfg, toy.resolve_paths(cfg)[0], device)
    judge = selfdistill.make_judge(cfg, device)
    torch.manual_seed(seed)
    counts = Counter(input=len(records) + skipped, missing_fields=skipped)
    kept = []
    for record, (answers, correct, *_) in zip(records, sample_answers(
            model, tokenizer, cfg, device, records, samples, cfg.temperature, "solver Avg@16")):
        if sum(correct) > max_correct:
            counts["too_easy"] += 1
            continue
        # a wrong rollout in the step format, critiqued by the critic (greedy: one call suffices)
        prompt = contexts.student_prompt_ids(tokenizer, record["question"], cfg.prompts, cfg.student_thinking)
        ids, _ = common.generate(model, tokenizer, [prompt] * 4, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                 cfg.top_k, cfg.generation_batch)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        wrong = [t for t in texts if critic.reward(t, record["answer"], selfdistill.exact_answers(cfg)) == 0
                 and contexts.STEP_TAG.search(t)]
        if not wrong:
            counts["no_wrong_stepped_rollout"] += 1
            continue
        critique = judge([record["question"]], wrong[:1], [record["solution"]], [record["answer"]])[0]
        if critique is None or not critic.validate_critique(wrong[0], critique, record["answer"])[0]:
            counts["critic_failed"] += 1
            continue
        kept.append(record)
    random.Random(seed).shuffle(kept)
    test, train = kept[:test_size], kept[test_size:]
    os.makedirs(out, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    counts.update(kept=len(kept), train=len(train), test=len(test))
    with open(os.path.join(out, "prepare.json"), "w") as f:
        json.dump({"input": input_path, "seed": seed, "samples": samples, "max_correct": max_correct,
                   "counts": dict(counts)}, f, indent=1)
    print(", ".join(f"{k} {v}" for k, v in counts.items()) + f"; wrote {out}/train.jsonl, test.jsonl")
    return dict(counts)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate selfdistill runs: metrics per checkpoint, the comparison table across "
                    "runs, the per-token advantage analysis.", epilog=__doc__[__doc__.index("Commands:"):],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run folder(s); with --analyze: a run, a model "
                        "folder or 'toy', then optional key=value config overrides")
    parser.add_argument("--compare", action="store_true", help="paper-style table of the runs")
    parser.add_argument("--markdown", action="store_true", help="--compare as a markdown table")
    parser.add_argument("--per-step", action="store_true", help="--compare: Avg@k of each arm at every "
                        "evaluated step instead")
    parser.add_argument("--ci", action="store_true", help="--compare: add each run's 95%% bootstrap CIs")
    parser.add_argument("--plot", action="store_true", help="figure of the runs: Avg@k over training per "
                        "arm, train reward, KL and length (PNG with matplotlib; always a CSV)")
    parser.add_argument("--reach", type=float, default=50.0, help="--compare: the Avg@k (%%) whose "
                        "rollouts-to-reach the budget table shows (default %(default)s)")
    parser.add_argument("--x", choices=("step", "rollouts"), default="step", help="--plot: x axis")
    parser.add_argument("--analyze", action="store_true", help="per-token advantage analysis")
    parser.add_argument("--prepare", action="store_true", help="convert + filter OpenMathReasoning "
                        "records: eval.py --prepare INPUT.jsonl|parquet [MODEL] [key=value ...]")
    parser.add_argument("--test-size", type=int, default=30, help="--prepare: test problems")
    parser.add_argument("--seed", type=int, default=0, help="--prepare: seed of sampling and split")
    parser.add_argument("--samples", type=int, help="samples per question (default: eval_samples)")
    parser.add_argument("--questions", type=int, help="test questions (default: eval_questions)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the run's)")
    parser.add_argument("--k", type=int, help="k of the @k metrics (default: samples)")
    parser.add_argument("--step", type=int, default=0, help="--analyze: checkpoint step (0 = base)")
    parser.add_argument("--rollouts", type=int, default=8, help="--analyze: wrong rollouts to show")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the "
                        "model folder (never taken from a run's config.yaml)")
    parser.add_argument("--out", help="--analyze: output folder (default RUN/analysis or ./analysis/"
                        "NAME); --plot: the PNG (default analysis/training.png)")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    common.default_signals()  # Ctrl-C: one line (user_errors), even when the trainer passes it on too
    with common.user_errors():
        for flag in ("samples", "questions", "k"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise UserError(f"--{flag} must be at least 1")
        if args.temperature is not None and not args.temperature > 0:
            raise UserError("--temperature must be positive (evaluation samples)")
        if (args.per_step or args.ci) and not args.compare:
            raise UserError("--per-step and --ci go with --compare")
        if not 0 < args.reach <= 100:
            raise UserError(f"--reach must be a score in (0, 100] (%), got {args.reach}")
        if args.compare and args.per_step:
            print(per_step_table(compare_runs(args.paths)[0], markdown=args.markdown))
        elif args.compare:
            print(comparison_table(*compare_runs(args.paths), markdown=args.markdown, ci=args.ci,
                                   reach=args.reach / 100))
        elif args.plot:
            plot_training(args.paths, args.out or os.path.join("analysis", "training.png"), args.x)
        elif args.prepare:
            prepare(args.paths[0], args.paths[1:], args.out or "data/omr", args.test_size, seed=args.seed)
        elif args.analyze:
            analyze(args.paths[0], args.paths[1:], args.step, args.rollouts, args.out)
        else:
            for run_dir in args.paths:
                evaluate_run(run_dir, args.samples, args.questions, args.temperature, args.k,
                             trust_remote_code=args.trust_remote_code)
            common.leave_group()  # under torchrun


if __name__ == "__main__":
    main()
