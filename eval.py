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

Outputs: RUN/eval.jsonl, one line per (step, setting): step, n, k, questions, temperature, avg,
pass, maj, length (tokens, EOS excluded), unparseable, truncated, ci {metric: [lo, hi]}; rates are
fractions. Step 0 also has base_key (and reused_from when copied). In the toy world each row has
`toy`: toy.trace_stats of all samples (per-step arithmetic, chaining, answer = own last result,
style mix and per-style accuracy), which --compare shows in a second table. --analyze writes advantage_step_S.{html,json}[,png] to RUN/analysis/ (or ./analysis/).

Commands:
    python eval.py runs/critique-s0 [--samples 12] [--questions 30] [--temperature 1.1] [--k 12]
    python eval.py --compare runs/grpo-s* runs/critique-s* [--markdown]
    python eval.py --analyze runs/critique-s0 [--step 40] [--rollouts 8] [--out DIR]
    python eval.py --analyze toy                        # the toy base model, no run needed
    python eval.py --analyze path/to/model test_file=test.jsonl critic=http critic_url=... critic_model=...
    python eval.py --prepare omr.jsonl Qwen/Qwen3-1.7B critic=http critic_url=... critic_model=Qwen/QwQ-32B --out data/omr
"""
import argparse
import bisect
import dataclasses
import html
import json
import math
import os
import random
import re
import statistics
import sys
from collections import Counter

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
    """A key that is equal for two answers exactly when critic.answers_match calls them equal."""
    if answer is None:
        return None
    text = critic.normalize_answer(answer)
    number = critic.to_number(text)
    if number is not None:
        return ("number", number)
    return ("text", text) if text else None


def majority_correct(answers, gold):
    """1.0 when the most voted answer is unique and correct; a tie counts as wrong (strict)."""
    votes = Counter(key for key in map(answer_key, answers) if key is not None)
    ranked = votes.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[1][1] == ranked[0][1]):
        return 0.0
    return float(ranked[0][0] == answer_key(gold))


def maj_at_k(answers, gold, k):
    """Maj@k from n ≥ k answers: the mean over disjoint blocks of k (one block when n = k)."""
    blocks = [answers[i:i + k] for i in range(0, len(answers) - k + 1, k)]
    return sum(majority_correct(b, gold) for b in blocks) / len(blocks)


def question_scores(answers, correct, lengths, truncated, gold, k):
    """Every metric for one question's n samples."""
    n = len(answers)
    return {"avg": sum(correct) / n, "pass": pass_at_k(n, sum(correct), k),
            "maj": maj_at_k(answers, gold, k), "length": sum(lengths) / n,
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
    from safetensors.torch import load_file
    if checkpoint is None:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.zero_()  # B = 0 makes the update s·BA exactly zero
        return
    set_peft_model_state_dict(model, load_file(os.path.join(checkpoint, "adapter_model.safetensors")))


def checkpoint_steps(run_dir):
    """{step: checkpoint folder}, with step 0 = the base model (no folder)."""
    steps = {0: None}
    for path in common.checkpoint_dirs(run_dir):
        steps[int(os.path.basename(path).split("_")[1])] = path
    return steps


def sample_answers(model, tokenizer, cfg, device, records, n, temperature, desc):
    """n samples per question → per-question scores (with the model's adapter as it is now)."""
    from tqdm import tqdm
    prompts = [contexts.student_prompt_ids(tokenizer, r["question"], cfg.prompts, cfg.student_thinking)
               for r in records for _ in range(n)]
    responses, truncated = [], []
    for i in tqdm(range(0, len(prompts), cfg.generation_batch), desc=desc, leave=False,
                  disable=not common.progress_bars()):
        ids, cut = common.generate(model, tokenizer, prompts[i:i + cfg.generation_batch], cfg.max_new_tokens,
                                   temperature, cfg.top_p, cfg.top_k, cfg.generation_batch)
        responses, truncated = responses + ids, truncated + cut
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    lengths = [len(r) - (not cut) for r, cut in zip(responses, truncated)]  # EOS not counted
    per_question = []
    for q, record in enumerate(records):
        part = slice(q * n, (q + 1) * n)
        answers = [critic.extract_answer(t) for t in texts[part]]
        correct = [critic.answers_match(a, record["answer"]) for a in answers]
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
        return evaluate_steps(run_dir, cfg, samples, questions, temperature, k, model, tokenizer, device)
    finally:
        if lock:
            lock.release()


def evaluate_steps(run_dir, cfg, samples, questions, temperature, k, model, tokenizer, device):
    n = samples or cfg.eval_samples
    k = k or n
    if not 1 <= k <= n:
        raise UserError(f"k = {k} must lie in 1..samples ({n})")
    temperature = temperature or cfg.temperature
    model_path, _, test_path = toy.resolve_paths(cfg)
    records = common.load_jsonl(test_path, normalize=critic.normalize_answer)
    records = records[:questions or cfg.eval_questions or len(records)]
    setting = {"n": n, "k": k, "questions": len(records), "temperature": temperature}
    path = os.path.join(run_dir, "eval.jsonl")
    done = {row["step"] for row in read_jsonl(path) if all(row.get(f) == v for f, v in setting.items())}
    rank, world = common.init_ranks(device)
    todo = common.from_rank0({s: c for s, c in checkpoint_steps(run_dir).items() if s not in done})
    if len(checkpoint_steps(run_dir)) == 1 and rank == 0:
        print(f"{run_dir} has no checkpoints yet: step 0 (the base model) only")
    key = base_key(cfg, model_path, test_path, setting)
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
            load_adapter(model, checkpoint)
        except (*common.DAMAGED, SafetensorError) as e:
            print(f"warning: skipping the damaged checkpoint {checkpoint} ({type(e).__name__})", file=sys.stderr)
            continue
        torch.manual_seed(cfg.seed + (rank << 32))  # the same random numbers at every step (docstring, 2)
        scored = common.gather(sample_answers(model, tokenizer, cfg, device, common.share(records, rank, world),
                                              n, temperature, f"step {step}"))  # every question, in order
        if rank > 0:
            continue
        row = {"step": step, **setting, **summarize([question_scores(*s[:5], k) for s in scored])}
        if world > 1:
            row["processes"] = world
        if cfg.model == "toy":
            row["toy"] = toy_instruments(scored)
        if step == 0:
            row["base_key"] = key
        common.append_jsonl(path, row)
    common.barrier()  # every row written before any process reads them
    rows = sorted((r for r in read_jsonl(path) if all(r.get(f) == v for f, v in setting.items())),
                  key=lambda r: r["step"])
    if rank == 0:
        print_summary(rows, run_dir)
    return rows


def print_summary(rows, run_dir):
    if not rows:
        return
    k = rows[0]["k"]
    print(f"{run_dir}: {rows[0]['questions']} questions × {rows[0]['n']} samples, T = "
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
    rows = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    if not rows:
        raise UserError(f"{run_dir} has no eval.jsonl yet; run: python eval.py {run_dir}")
    setting = {f: rows[-1][f] for f in EVAL_SETTING}
    return config, {r["step"]: r for r in rows if all(r[f] == v for f, v in setting.items())}, setting


EVAL_SETTING = ("n", "k", "questions", "temperature")  # runs compared must share these


def non_default(config):
    """Settings that differ from the defaults of its arm (derived defaults included)."""
    defaults = dataclasses.asdict(selfdistill.resolve(selfdistill.Config(arm=config["arm"], model=config["model"])))
    return {key: value for key, value in config.items()
            if key not in SAME_ARM_IGNORES and key != "arm" and value != defaults.get(key)}


def pool_arm(runs):
    """Best step of the seed-mean curve and the final step, mean ± std over seeds (CI for one)."""
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
    out["avg_by_step"] = {step: at("avg", step) for step in steps}
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


def equal_rollouts(arms):
    """Sets each arm's avg "equal": Avg@k at the evaluated step whose rollouts (steps × questions
    per step × G) come closest to the smallest final budget of any arm (ties: the earlier step).
    GRPO's G = 8 samples 8× more per step than the self-distillation arms."""
    budget = min(max(a["avg_by_step"]) * a["rollouts_per_step"] for a in arms)
    for a in arms:
        step = min(a["avg_by_step"], key=lambda s: (abs(s * a["rollouts_per_step"] - budget), s))
        a["avg"]["equal"] = {**a["avg_by_step"][step], "budget": budget}


def compare_runs(run_dirs):
    """Arms (runs equal up to SAME_ARM_IGNORES), each pooled: a list of dicts, plus common notes."""
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
        arms.setdefault(key, []).append((config, rows))
    extras = [non_default(runs[0][0]) for runs in arms.values()]
    shared = {k: v for k, v in extras[0].items() if all(e.get(k, object()) == v for e in extras)}
    result = []
    for runs, extra in zip(arms.values(), extras):
        label = " ".join([runs[0][0]["arm"]] + [f"{k}={v}" for k, v in extra.items() if k not in shared])
        k = next(iter(runs[0][1].values()))["k"]
        result.append({"label": label, "seeds": sorted(c["seed"] for c, _ in runs), "k": k,
                       "rollouts_per_step": runs[0][0]["batch_size"] * runs[0][0]["samples_per_question"],
                       **pool_arm(runs)})
    if len({a["rollouts_per_step"] for a in result}) > 1:
        equal_rollouts(result)
    return result, shared


def format_cell(entry, seeds, scale):
    value, spread = scale * entry["value"], entry["spread"]
    if seeds > 1:
        return f"{value:.2f} ± {scale * spread:.2f} (step {entry['step']})"
    return f"{value:.2f} [{scale * spread[0]:.1f}, {scale * spread[1]:.1f}] (step {entry['step']})"


def comparison_table(arms, shared, markdown=False):
    k = arms[0]["k"]
    # arms that sample more per step (GRPO) also get a column at the others' rollout budget
    budget = arms[0]["avg"]["equal"]["budget"] if "equal" in arms[0]["avg"] else None
    header = ["arm", "seeds"] + [f"{name}@{k} {when}" for _, name in TABLE_METRICS
                                 for when in ("best", "final")] + ["len at best Avg", "len final"]
    header += [f"Avg@{k} at ≈{budget} rollouts"] if budget is not None else []
    body = [[a["label"], str(len(a["seeds"]))] + [format_cell(a[m][when], len(a["seeds"]), 100)
                                                   for m, _ in TABLE_METRICS for when in ("best", "final")]
            + [format_cell(a["length"][w], len(a["seeds"]), 1) for w in ("best", "final")]
            + ([format_cell(a["avg"]["equal"], len(a["seeds"]), 100)] if budget is not None else [])
            for a in arms]
    lines = table_lines(header, body, markdown)
    notes = ["", "Values in %, length in tokens; ± = std over seeds, [lo, hi] = "
             "95% bootstrap CI (one seed). 'best' picks a checkpoint on the test set and flatters."]
    if shared:
        notes.append("All arms: " + ", ".join(f"{k}={v}" for k, v in shared.items()))
    if budget is not None:
        notes.append("Rollouts per step differ between arms (questions × G: " + ", ".join(
            f"{a['label']} {a['rollouts_per_step']}" for a in arms) + f"); the last column is each "
            f"arm at the evaluated step closest to {budget} rollouts, the smallest final budget.")
    if len({a["k"] for a in arms}) > 1:
        notes.append("WARNING: the runs were evaluated with different k")
    return "\n".join(lines + notes + toy_table(arms, markdown))


def table_lines(header, body, markdown):
    """Rows as a markdown table, or as aligned plain-text columns."""
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
            ["| " + " | ".join(row) + " |" for row in body]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + body]


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
    return ["", "Toy world, what moved (toy.trace_stats, % of parsed steps / responses; seed means):"] + lines


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
        logp = common.token_log_probs(hidden, weight, ids, cfg.chunk_size, cfg.logit_temperature)  # (N,)
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


def advantage_summary(A, prefix_mask, wrong_mask, after_mask):
    """Mean A_t on the correct prefix, on the first wrong step and after it, and the error-focus
    ratio |mean A on the wrong step| / mean |A| on the prefix (None where undefined)."""
    def mean(x):
        return x.mean().item() if x.numel() else None
    out = {"prefix": mean(A[prefix_mask]), "wrong": mean(A[wrong_mask]), "after": mean(A[after_mask])}
    out["prefix_abs"] = scale = mean(A[prefix_mask].abs())
    out["focus"] = abs(out["wrong"]) / scale if out["wrong"] is not None and scale else None
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
            if critic.reward(text, record["answer"]):
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
            "summary": {kind: advantage_summary(A[kind][i], *masks) for kind in kinds}})
    return results


def summarize_contexts(results, kinds):
    """Per context and statistic: mean, std and n over rollouts; plus the pooled error-focus ratio
    |mean over rollouts of A on the wrong step| / mean over rollouts of mean |A| on the prefix. A
    per-rollout ratio explodes when a prefix's |A| is near 0, so its mean is not a usable summary;
    its median is given beside the pooled ratio."""
    out = {}
    for kind in kinds:
        out[kind] = {stat: spread([r["summary"][kind].get(stat) for r in results])
                     for stat in ("prefix", "wrong", "after", "focus", "prefix_abs")}
        wrong, scale = out[kind]["wrong"]["mean"], out[kind]["prefix_abs"]["mean"]
        ratios = [r["summary"][kind]["focus"] for r in results if r["summary"][kind]["focus"] is not None]
        out[kind]["focus_pooled"] = {
            "mean": abs(wrong) / scale if wrong is not None and scale else None,
            "median_per_rollout": statistics.median(ratios) if ratios else None, "n": len(ratios)}
    return out


# ---------------------------------------------------------------------------------------------
# Analysis output: HTML (self-contained), JSON, and a Fig. 4-style PNG when matplotlib exists.

CSS = """body{font-family:sans-serif;margin:2em;max-width:70em}
.r{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ccc;padding:.5em}
.s{border-left:2px solid #222;padding-left:1px}.w{box-shadow:inset 0 -3px 0 #000}
details{margin:.3em 0}pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em}"""
COLOUR_SCALE = 5.0  # |A_t| (nats) at full colour; larger values saturate


def token_html(piece, a, is_boundary, is_wrong):
    """One token as a coloured span, escaped: <, >, & and quotes as entities, newlines as ↵."""
    rgb = "215,48,39" if a < 0 else "69,117,180"  # red: the context says change it; blue: keep it
    alpha = min(abs(a) / COLOUR_SCALE, 1.0)
    classes = " ".join(c for c, on in (("s", is_boundary), ("w", is_wrong)) if on)
    classes = f' class="{classes}"' if classes else ""
    title = html.escape(f"A = {a:+.3f}   {piece!r}", quote=True)
    shown = html.escape(piece, quote=True).replace("\n", "↵<br>")
    return f'<span{classes} style="background:rgba({rgb},{alpha:.2f})" title="{title}">{shown}</span>'


def render_html(results, kinds, heading):
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(heading)}</h1>",
             f"<p>A<sub>t</sub> = log π<sub>T</sub>(y<sub>t</sub>|x,c,y<sub>&lt;t</sub>) − log π<sub>θ</sub>"
             f"(y<sub>t</sub>|x,y<sub>&lt;t</sub>): <span style='background:rgba(215,48,39,.8)'>negative"
             f"</span> change it, <span style='background:rgba(69,117,180,.8)'>positive</span> keep it "
             f"(full colour at |A| ≥ {COLOUR_SCALE:g}). A bar opens each step tag; the first wrong step "
             f"is underlined. Hover a token for its value.</p>"]
    for n, r in enumerate(results, start=1):
        parts.append(f"<h2>Rollout {n}: {html.escape(r['question'])} (gold {html.escape(str(r['answer']))}, "
                     f"first wrong step {r['wrong_step']})</h2>")
        wrong = range(*r["wrong_span"]) if r["wrong_span"] else range(0)
        for kind in kinds:
            ctx, s = r["contexts"][kind], r["summary"][kind]
            stats = ", ".join(f"{k} {v:+.2f}" if v is not None else f"{k} n/a" for k, v in s.items())
            spans = "".join(token_html(p, a, t in r["step_starts"], t in wrong)
                            for t, (p, a) in enumerate(zip(r["tokens"], ctx["A"])))
            parts.append(f"<h3>{kind}</h3><p>{stats}</p><details><summary>context</summary>"
                         f"<pre>{html.escape(ctx['text'])}</pre></details><div class='r'>{spans}</div>")
    return "\n".join(parts + ["</body></html>"])


def plot_png(result, kinds, path):
    """Fig. 4's layout: A_t along one rollout, one panel per context, the first error marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    out = out or os.path.join(run_dir or ".", "analysis")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"advantage_step_{step:06d}")
    with open(stem + ".json", "w") as f:
        json.dump({"target": target, "step": step, "summary": summary, "rollouts": results}, f)
    with open(stem + ".html", "w") as f:
        f.write(render_html(results, KINDS, f"Per-token advantage: {target}, step {step}"))
    png = plot_png(results[0], KINDS, stem + ".png")
    print(f"{len(results)} rollouts; mean ± std over rollouts")
    for kind, stats in summary.items():
        print(f"{kind:>20}: " + "  ".join(
            f"{stat} {s['mean']:+.3f}±{s['std'] or 0:.3f}" if s["mean"] is not None else f"{stat} n/a"
            for stat, s in stats.items() if stat in ("prefix", "wrong", "after")))
        pooled = stats["focus_pooled"]
        if pooled["mean"] is not None:
            print(f"{'':>20}  error focus (pooled) {pooled['mean']:.2f}, per-rollout median "
                  f"{pooled['median_per_rollout']:.2f}")
    print(f"wrote {stem}.html, {stem}.json" + (f", {png}" if png else " (no matplotlib: no PNG)"))
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
        wrong = [t for t in texts if critic.reward(t, record["answer"]) == 0 and contexts.STEP_TAG.search(t)]
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
    parser.add_argument("--out", help="--analyze: output folder (default RUN/analysis or ./analysis)")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    with common.user_errors():
        for flag in ("samples", "questions", "k"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise UserError(f"--{flag} must be at least 1")
        if args.temperature is not None and not args.temperature > 0:
            raise UserError("--temperature must be positive (evaluation samples)")
        if args.compare:
            print(comparison_table(*compare_runs(args.paths), markdown=args.markdown))
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
