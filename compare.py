"""Comparing runs: the paper-style tables (best value per metric and the step it came from, seeds
of one arm pooled) and the training curves, from the runs' eval.jsonl and metrics.jsonl. Nothing
here loads a model: it reads what eval.py and the trainer wrote.

Choices the paper leaves open (ours):
 1. The best step is that of the seed-averaged curve (not each seed's own best, which flatters
    more), shown beside the final step. Length has no "best": it is shown at the Avg@k-best step.
    Step 0 (the base model) is never a candidate.
 2. Spreads: the tables show mean ± std over seeds (one seed: its bootstrap CI, with --ci);
    --plot draws the seed mean with a min–max band (with three seeds, the honest range) and stars
    each arm's best checkpoint; `--x rollouts` is a log axis (the arms' rollouts per step differ 8-30x).
 3. Budgets: when arms draw different rollouts per step, the budget table puts each arm at equal
    questions (the most any arm saw, the paper's axis) and at equal rollouts (the fewest any arm
    drew), at the evaluated step closest to the budget; `--reach` sets the score whose rollouts-
    to-reach it shows (first evaluated step at or above it, so resolution is one checkpoint).
 4. On a toy world each self-distillation arm's teacher ceiling (build.json `ceilings`: the base
    teacher's accuracy with the arm's own context) is shown beside it, and the transfer split's
    Avg@k at step 0 and the last step in its own table.

Arms: runs equal in everything but the seed, the name and the settings that change how a run
executes (selfdistill.OPERATIONAL) are the seeds of one arm; an arm is labelled by its name and the
settings in which it differs from the other arms given (its world included), or by --label. A run
given twice, or a copy of a run (the same settings and seed), is refused: it is not a second seed.

Outputs: the tables on stdout (--markdown for markdown); --plot writes FIG.png (or .pdf, .svg; with
matplotlib) and FIG.csv, the figure's numbers. Malformed rows of eval.jsonl and metrics.jsonl are
skipped with one warning per file (eval.read_rows), never shown.

Commands:
    python compare.py runs/grpo-s* runs/critique-s* [--markdown] [--ci] [--per-step] [--reach 50]
    python compare.py --plot runs/grpo-s* runs/critique-s* [--out analysis/training.png] [--x rollouts]
    python compare.py runs/grpo-small-s* runs/critique-s* --label 'runs/grpo-small-*=grpo, rollout-matched'
"""
import argparse
import csv
import dataclasses
import fnmatch
import json
import os
import statistics
import sys
import textwrap

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds, nothing written yet): exit 130, no traceback
    import signal
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

from plumbing import common
from plumbing import curves
from plumbing import options
import selfdistill
from toyworld import world
from plumbing.common import UserError
from eval import METRICS, finite, in_split, load_run_config, read_rows, whole

# The seeds of one arm differ in these only: the seed, the run's name and folder, and the settings that
# change how a run executes, not what it computes (selfdistill.OPERATIONAL: threads, logging, ...).
SAME_ARM_IGNORES = ("seed", "run", "out_dir", *selfdistill.OPERATIONAL)
TABLE_METRICS = (("pass", "Pass"), ("maj", "Maj"), ("avg", "Avg"))
TOY_STATS = ("step_arith", "step_chain", "answer_own")  # toy.trace_stats, shown by the last table


def load_compared_run(run_dir):
    """(config dict, {step: row}) using the latest evaluation setting of the run (and the latest
    test file's contents: rows of a test file since changed are left out)."""
    cfg = load_run_config(run_dir)  # the same checks and errors as evaluation
    config = {**dataclasses.asdict(cfg), **options.read_yaml_config(os.path.join(run_dir, "config.yaml"))}
    rows = [r for r in without_bad_toy_blocks(os.path.join(run_dir, "eval.jsonl")) if in_split(r)]
    if not rows:
        raise UserError(f"{run_dir} has no eval.jsonl rows yet (none usable); run: python eval.py {run_dir}")
    if all(r["step"] == 0 for r in rows):  # the base alone: no checkpoint of this run to show
        raise UserError(f"{run_dir} is evaluated at step 0 (the base model) only, at no checkpoint of its own; "
                        f"evaluate its checkpoints (python eval.py {run_dir}) or leave it out")
    setting = {f: rows[-1][f] for f in EVAL_SETTING}
    test = rows[-1].get("test")
    return config, {r["step"]: r for r in rows if all(r[f] == v for f, v in setting.items())
                    and r.get("test", test) == test}, setting


EVAL_SETTING = ("n", "k", "questions", "temperature")  # runs compared must share these


def without_bad_toy_blocks(path):
    """eval.read_rows, with each row's toy-world block (toy.trace_stats) dropped where it lacks a key
    the toy table reads: the row's scores stay, the file gets one warning that counts them."""
    rows, bad = read_rows(path), []
    for row in rows:
        toy = row.get("toy")
        if toy is not None and not (all(key in toy for key in TOY_STATS) and isinstance(toy.get("styles"), dict)):
            bad.append(row["step"])
            del row["toy"]
    if bad:
        print(f"warning: {path}: {len(bad)} row{'s' * (len(bad) > 1)} with an incomplete toy block (step "
              f"{bad[0]} first): left out of the toy table", file=sys.stderr)
    return rows


def transfer_rows(run_dir, setting):
    """{step: row} of the toy world's transfer split evaluated with the test rows' n, k and T."""
    return {r["step"]: r for r in read_rows(os.path.join(run_dir, "eval.jsonl")) if in_split(r, "transfer")
            and all(r.get(f) == setting[f] for f in EVAL_SETTING if f != "questions")}


def non_default(config):
    """Settings that differ from the defaults of its arm: the values the model derives (prompt set,
    length budget) at that model's, the model itself (the world) at the Config's default."""
    defaults = dataclasses.asdict(selfdistill.resolve(selfdistill.Config(arm=config["arm"], model=config["model"])))
    defaults["model"] = selfdistill.Config.model
    return {key: value for key, value in config.items()
            if key not in SAME_ARM_IGNORES and key != "arm" and value != defaults.get(key)}


def pool_arm(runs):
    """Best step of the seed-mean curve and the final step, mean ± std over seeds (CI for one);
    the Avg@k curve at every step all seeds evaluated (step 0 too); each seed's base row."""
    steps = set.intersection(*[{s for s in rows if s > 0} for _, rows in runs])  # never step 0: the base
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


def group_runs(run_dirs, names=()):
    """Runs equal up to SAME_ARM_IGNORES are the seeds of one arm: ([(label, [(run_dir, config,
    {step: eval row})])], the non-default settings all arms share). The tables and --plot group alike.
    A run given twice, or two runs of one arm with one seed (a copy is not a second seed), is refused;
    two runs with the same scores at every checkpoint are warned about. `names`: [(GLOB, NAME)] from
    --label."""
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
        twin = next((other for other, c, _ in arms.get(key, []) if c["seed"] == config["seed"]), None)
        if twin:
            raise UserError(f"{run_dir} and {twin} are one experiment (the same settings and seed {config['seed']}): "
                            f"a copy of a run is not a second seed; give each seed once")
        arms.setdefault(key, []).append((run_dir, config, rows))
        scores = json.dumps({step: [row[m] for m in METRICS] for step, row in rows.items() if step > 0})
        if scores in seen:  # sampled numbers never repeat to the last digit: a copy with its config edited
            print(f"warning: {run_dir} has the very evaluation rows of {seen[scores]} at every checkpoint: "
                  f"a copy of it, or settings that changed nothing?", file=sys.stderr)
        seen[scores] = run_dir
    extras = [non_default(runs[0][1]) for runs in arms.values()]
    shared = {k: v for k, v in extras[0].items() if all(e.get(k, object()) == v for e in extras)}
    labels = arm_labels([runs[0][1] for runs in arms.values()], extras, shared)
    labels = named(labels, [[run_dir for run_dir, _, _ in runs] for runs in arms.values()], names)
    return list(zip(labels, arms.values())), shared


def arm_labels(configs, extras, shared):
    """Each arm's name and the settings in which it differs from the other arms (at a value other
    than its default); where two labels would still be equal (a setting whose default depends on
    the model), every setting in which those arms differ."""
    def label(config, keys):
        return " ".join([config["arm"]] + [f"{k}={config[k]}" for k in config if k in keys])
    varying = {k for k in configs[0] if k not in SAME_ARM_IGNORES
               and len({json.dumps(c.get(k)) for c in configs}) > 1}
    labels = [label(c, {k for k in extra if k not in shared}) for c, extra in zip(configs, extras)]
    return [label(c, varying) if labels.count(text) > 1 else text for c, text in zip(configs, labels)]


def named(labels, members, names):
    """--label GLOB=NAME: an arm whose run folders a GLOB matches (the path as given, or its last
    folder's name) is called NAME; a GLOB that matches no run, or two arms given one NAME, is an error."""
    labels = list(labels)
    for pattern, name in names:
        hits = [i for i, runs in enumerate(members) if any(
            fnmatch.fnmatchcase(os.path.normpath(run), os.path.normpath(pattern))
            or fnmatch.fnmatchcase(os.path.basename(os.path.normpath(run)), pattern) for run in runs)]
        if not hits:
            raise UserError(f"--label {pattern}={name}: {pattern} matches none of the runs given")
        if len(hits) > 1:
            raise UserError(f"--label {pattern}={name}: {pattern} matches runs of {len(hits)} arms ("
                            + "; ".join(labels[i] for i in hits) + "); one name per arm")
        labels[hits[0]] = name
    if len(set(labels)) < len(labels):
        raise UserError("two arms would have the same label (" + next(x for x in labels if labels.count(x) > 1)
                        + "); give each arm its own --label")
    return labels


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


def train_seconds(run_dir):
    """(seconds, critic seconds) of a run's training: its metrics.jsonl's time/step and time/critic
    summed over steps (the last line of a step wins: a resumed run logs it again); None when absent."""
    log = {m["step"]: m for m in read_rows(os.path.join(run_dir, "metrics.jsonl"), metrics_problem)}
    if not log or not all(finite(m.get("time/step")) for m in log.values()):
        return None
    return (sum(m["time/step"] for m in log.values()),
            sum(m["time/critic"] for m in log.values() if finite(m.get("time/critic"))))


def critic_stats(run_dir, rollouts_per_step):
    """(share of rollouts dropped, {reason: share}, critic seconds per step) over a run's training
    (metrics.jsonl: train/critique_invalid, train/dropped/REASON, time/critic); None when absent."""
    log = {m["step"]: m for m in read_rows(os.path.join(run_dir, "metrics.jsonl"), metrics_problem)}
    if not log or not all(finite(m.get("train/critique_invalid")) for m in log.values()):
        return None
    total = len(log) * rollouts_per_step
    reasons = {}
    for m in log.values():
        for key, value in m.items():
            if key.startswith("train/dropped/") and finite(value):
                reasons[key.split("/", 2)[2]] = reasons.get(key.split("/", 2)[2], 0) + value / total
    return (sum(m["train/critique_invalid"] for m in log.values()) / total, reasons,
            statistics.fmean(m.get("time/critic", 0.0) for m in log.values()))


def critic_table(arms, markdown=False):
    """The critique arms' critics side by side: who critiqued (the rule program or a model), what
    validation let through, the share of rollouts dropped (by reason) and the critic's seconds."""
    arms = [a for a in arms if a.get("critic")]
    if not arms:
        return []
    header = ["arm", "critic", "validation", "dropped %", "dropped by reason (%)", "critic s/step", "train s"]
    body = [[a["label"], a["critic"]["name"], a["critic"]["validation"], f"{100 * a['critic']['dropped']:.1f}",
             ", ".join(f"{r} {100 * v:.1f}" for r, v in sorted(a["critic"]["reasons"].items(), key=lambda x: -x[1]))
             or "—", f"{a['critic']['seconds']:.2f}",
             "—" if a["seconds"] is None else f"{a['seconds'][0]:.0f}"] for a in arms]
    note = ("The critics: rollouts whose critique was dropped (critique_validation) over the whole run, the "
            "critic's seconds per step and the run's training seconds (time/step summed), seed means:")
    return ["", *([note] if markdown else textwrap.wrap(note, WIDTH)), ""] + table_lines(header, body, markdown)


def compare_runs(run_dirs, names=()):
    """Arms (runs equal up to SAME_ARM_IGNORES), each pooled: a list of dicts, plus common notes."""
    groups, shared = group_runs(run_dirs, names)
    result = []
    for label, members in groups:
        runs = [(config, rows) for _, config, rows in members]
        config = runs[0][0]
        k = next(iter(runs[0][1].values()))["k"]
        seconds = [train_seconds(run_dir) for run_dir, _, _ in members]
        judged = [critic_stats(run_dir, config["batch_size"] * config["samples_per_question"])
                  for run_dir, _, _ in members] if config["arm"].startswith("critique") else [None]
        result.append({"label": label, "seeds": sorted(c["seed"] for c, _ in runs), "k": k, "model": config["model"],
                       "questions_per_step": config["batch_size"],
                       "rollouts_per_step": config["batch_size"] * config["samples_per_question"],
                       "ceiling": world.teacher_ceiling(config), "transfer": pool_transfer(members),
                       "seconds": None if None in seconds else [statistics.fmean(x) for x in zip(*seconds)],
                       "critic": None if None in judged else {
                           "name": config.get("critic_model") or config.get("critic", "rule"),
                           "validation": config.get("critique_validation", "full"),
                           "dropped": statistics.fmean(j[0] for j in judged),
                           "reasons": {r: statistics.fmean(j[1].get(r, 0.0) for j in judged)
                                       for r in {r for j in judged for r in j[1]}},
                           "seconds": statistics.fmean(j[2] for j in judged)},
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
              f"Avg@{k} at {Q} questions", f"Avg@{k} at {R} rollouts", f"rollouts to Avg@{k} ≥ {100 * reach:g}",
              "train s (critic s)"]
    body = [[a["label"], str(a["questions_per_step"]), str(a["rollouts_per_step"]),
             str(finals[a["label"]] * a["questions_per_step"]), str(finals[a["label"]] * a["rollouts_per_step"]),
             cell(a["avg"]["final"], a), cell(at_budget(a, Q, a["questions_per_step"]), a),
             cell(at_budget(a, R, a["rollouts_per_step"]), a),
             "—" if (n := rollouts_to_reach(a, reach)) is None else str(n),
             "—" if a["seconds"] is None else f"{a['seconds'][0]:.0f} ({a['seconds'][1]:.0f})"] for a in arms]
    note = ("Budgets: questions seen and rollouts drawn (step × questions per step × G), Avg@k in % ± std "
            "over seeds; each arm at the evaluated step (in parentheses) closest to the budget, a dash where "
            "it never got there; train s: the whole run's training wall-clock (the critic's share in "
            "parentheses), seed mean, from metrics.jsonl's time/step and time/critic; evaluation not included:")
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
    arm (same base_key) counts once; rows without a base_key (older logs) count per run, pooled per
    model (world)."""
    groups = {}  # base_key without the seed -> ({base_key: row}, arm labels)
    for a in arms:
        for index, row in enumerate(a["base"]):
            key = row.get("base_key") or {"row": f"{a['label']}/{index}", "model": a["model"]}  # its world
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
    critics = len({json.dumps(a["critic"] and [a["critic"]["name"], a["critic"]["validation"]]) for a in arms}) > 1
    more = (budget_table(arms, markdown, reach) if budgets else []) + transfer_table(arms, markdown) \
        + (critic_table(arms, markdown) if critics else [])
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
# --plot: Avg@k, Pass@k and Maj@k over training per arm, the evaluation's length, and the training
# log's reward, KL, length, invalid critiques and entropy.

def seed_stats(per_seed):
    """{x: [value per seed]} → [(x, mean, std, min, max, n)], at the x every seed has."""
    xs = sorted(set.intersection(*[set(values) for values in per_seed]))
    out = []
    for x in xs:
        values = [values[x] for values in per_seed]
        out.append((x, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                    min(values), max(values), len(values)))
    return out


def metrics_problem(row):
    """Why a metrics.jsonl line cannot be drawn (eval.read_rows skips it, counted), or None."""
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    if not whole(row.get("step"), 1):
        return f"step {row.get('step')!r} is not a whole number >= 1"
    bad = [key for key, _ in curves.TRAIN_CURVES if row.get(key) is not None and not finite(row[key])]
    return f"{', '.join(bad)} not a finite number" if bad else None


def plot_rows(run_dirs, names=()):
    """(rows, evaluation setting): the figure's data, one dict per (arm, metric, step): mean, std,
    min and max over seeds.
    Arms are grouped as the tables group them; metrics avg, pass, maj and length come from eval.jsonl
    (steps every seed evaluated, step 0 = the base), the train/ ones from metrics.jsonl (steps every
    seed logged); "ceiling" is a toy world's teacher with the arm's context."""
    groups, _ = group_runs(run_dirs, names)
    setting = next(iter(groups[0][1][0][2].values()))  # every run shares it (group_runs checks)
    model = groups[0][1][0][1]["model"]  # for a one-arm figure's title
    setting = {**setting, "model": "the toy world" if model == "toy" else "/".join(model.rstrip("/").split("/")[-2:])}
    rows = []
    for label, members in groups:
        config = members[0][1]
        rate = config["batch_size"] * config["samples_per_question"]  # rollouts per step: questions × G
        series = {metric: [{step: row[metric] for step, row in evals.items()} for _, _, evals in members]
                  for metric in ("avg", "pass", "maj", "length")}
        logs = [{m["step"]: m for m in read_rows(os.path.join(run_dir, "metrics.jsonl"), metrics_problem)}
                for run_dir, _, _ in members]
        for key, _ in curves.TRAIN_CURVES:  # the last line of a step wins (a resumed run logs it again)
            if key == "train/critique_invalid" and not config["arm"].startswith("critique"):
                continue  # always 0 where no critique is asked for
            series[key] = [{step: m[key] for step, m in log.items() if m.get(key) is not None} for log in logs]
        for metric, per_seed in series.items():
            for step, mean, std, low, high, n in seed_stats(per_seed):
                rows.append({"arm": label, "metric": metric, "step": step, "rollouts": step * rate,
                             "mean": mean, "std": std, "min": low, "max": high, "seeds": n})
        ceiling = world.teacher_ceiling(config)  # a toy world's teacher with this arm's context
        if ceiling is not None:
            rows.append({"arm": label, "metric": "ceiling", "step": 0, "rollouts": 0, "mean": ceiling,
                         "std": 0.0, "min": ceiling, "max": ceiling, "seeds": len(members)})
    return rows, setting


def plot_training(run_dirs, out, x="step", names=()):
    """Write the figure OUT (plumbing/curves.draw_training: Avg, Pass, Maj and the training log's
    panels) and its data as OUT with .csv. Without matplotlib only the CSV is written. Returns the
    paths written."""
    rows, setting = plot_rows(run_dirs, names)
    csv_path = os.path.splitext(out)[0] + ".csv"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if curves.draw_training(rows, setting, out, x) is None:
        print(f"wrote {csv_path}; for the PNG: pip install {common.MATPLOTLIB}")
        return [csv_path]
    print(f"wrote {out} and {csv_path}")
    return [out, csv_path]


FIGURE_TYPES = (".png", ".pdf", ".svg")  # what --out may end in: matplotlib picks the format by it


def check_figure_path(out):
    """--out names a figure file (its CSV goes beside it) in a folder that is, or can be, one."""
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # the first folder on the way that exists must be a folder
        parent = os.path.dirname(parent)
    if os.path.isdir(out) or out.endswith(os.sep):
        raise UserError(f"--out {out} is a folder; give the figure's file, e.g. {os.path.join(out, 'training.png')}")
    if os.path.splitext(out)[1].lower() not in FIGURE_TYPES:
        raise UserError(f"--out {out} must end in {', '.join(FIGURE_TYPES)} (the figure's format)")
    if not os.path.isdir(parent):
        raise UserError(f"--out {out}: {parent} is a file, not a folder")


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = options.Parser(
        description="Compare selfdistill runs: the paper-style tables, or with --plot the training curves.",
        epilog=__doc__[__doc__.index("Commands:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run folders, each evaluated (python eval.py RUN)")
    parser.add_argument("--markdown", action="store_true", help="the tables in markdown")
    parser.add_argument("--per-step", action="store_true", help="Avg@k of each arm at every evaluated "
                        "step instead")
    parser.add_argument("--ci", action="store_true", help="add each run's 95%% bootstrap CIs")
    parser.add_argument("--reach", type=float, help="the Avg@k (%%) whose rollouts-to-reach the budget "
                        "table shows (default 50)")
    parser.add_argument("--plot", action="store_true", help="figure of the runs instead: Avg@k, Pass@k and "
                        "Maj@k over training per arm (best checkpoint starred), eval length, train reward, KL, "
                        "length, invalid critiques and entropy (PNG with matplotlib; always a CSV)")
    parser.add_argument("--x", choices=("step", "rollouts"), help="--plot: x axis (default step)")
    parser.add_argument("--out", help="--plot: the PNG (default analysis/training.png)")
    parser.add_argument("--label", action="append", default=[], metavar="GLOB=NAME", help="call the arm "
                        "whose run folders GLOB matches NAME (e.g. 'runs/grpo-small-*=grpo, rollout-matched'); "
                        "repeatable")
    args = parser.parse_intermixed_args(argv)
    common.default_signals()  # Ctrl-C: one line (user_errors)
    with common.user_errors():
        check_flags(args)
        names = [tuple(item.split("=", 1)) for item in args.label]
        if args.plot:
            out = args.out or os.path.join("analysis", "training.png")
            check_figure_path(out)
            plot_training(args.paths, out, args.x or "step", names)
        elif args.per_step:
            print(per_step_table(compare_runs(args.paths, names)[0], markdown=args.markdown))
        else:
            reach = 50.0 if args.reach is None else args.reach
            print(comparison_table(*compare_runs(args.paths, names), markdown=args.markdown, ci=args.ci,
                                   reach=reach / 100))


def check_flags(args):
    """An option the chosen output would ignore is an error, not silence."""
    table_only = {"--per-step": args.per_step, "--ci": args.ci, "--markdown": args.markdown,
                  "--reach": args.reach is not None}
    for given, used in ((table_only if args.plot else {"--out": args.out, "--x": args.x},
                         "the tables, not with --plot" if args.plot else "--plot (the tables are printed)"),
                        ({"--ci": args.ci, "--reach": args.reach is not None} if args.per_step else {},
                         "the comparison table, not with --per-step")):
        given = [flag for flag, value in given.items() if value]
        if given:
            raise UserError(f"{' and '.join(given)} go{'es' * (len(given) == 1)} with {used}")
    if args.reach is not None and not 0 < args.reach <= 100:
        raise UserError(f"--reach must be a score in (0, 100] (%), got {args.reach}")
    for item in args.label:
        pattern, sep, name = item.partition("=")
        if not (sep and pattern and name.strip()):
            raise UserError(f"--label wants GLOB=NAME (e.g. 'runs/grpo-s*=grpo'), got '{item}'")


if __name__ == "__main__":
    main()
