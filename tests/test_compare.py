"""compare.py: the tables and the figure a researcher reads, on run folders written by hand (no
training).

Protects: --plot draws Avg, Pass and Maj@k with each arm's best checkpoint starred (never step 0),
a log rollouts axis, each ceiling named at its line and an arm drawn over an identical one named
in the legend, and writes its data as CSV (seed mean, min, max per arm and step, from eval.jsonl and
metrics.jsonl) and, without matplotlib, only the CSV plus a one-line install hint; with matplotlib a
PNG; the per-step table's numbers against hand-computed means and stds; the table's base row (a
base shared by two arms counts once) and unparseable column; plain-text tables at most 100 columns
wide; --per-step and --ci refused with --plot; seeds pooled into mean ± std with the best step and
the final value; arms labelled by the settings they differ in; the toy world's attribution table;
both budget axes; the transfer probe; a run without eval.jsonl is a one-line error."""
import csv
import json
import os
import sys

import pytest
import yaml

from plumbing import common
import compare
from plumbing import curves
import eval as ev
import selfdistill
from toyworld import folders
from plumbing.common import UserError


def write_run(root, name, arm, seed, evals, metrics=(), **config):
    """A run folder: a resolved config.yaml, eval.jsonl from {step: (avg, unparseable)} and
    metrics.jsonl from a list of dicts. Pass@k and Maj@k follow from avg; step 0 gets a base_key
    that depends on the seed only, as when every arm starts from the same base."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    cfg = selfdistill.resolve(selfdistill.Config(arm=arm, seed=seed, run=name, **config))
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(vars(cfg), f)
    with open(os.path.join(run_dir, "eval.jsonl"), "w") as f:
        for step, (avg, unparseable) in evals.items():
            row = {"step": step, "n": 4, "k": 4, "questions": 10, "temperature": 1.0, "avg": avg,
                   "pass": min(1.0, 2 * avg), "maj": avg / 2, "length": 30.0 + step, "unparseable": unparseable,
                   "truncated": 0.0}
            row["ci"] = {m: [row[m] - 0.05, row[m] + 0.05] for m in ev.METRICS}
            if step == 0:
                row["base_key"] = {"model": "toy", "seed": seed}
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    return run_dir


def train_log(rewards, kl=True):
    return [{"step": i + 1, "train/reward": r, "train/response_len": 30 + i,
             **({"train/kl": 0.1 / (i + 1)} if kl else {})} for i, r in enumerate(rewards)]


@pytest.fixture
def runs(tmp_path):
    """critique, two seeds (step 4 evaluated by seed 0 only); grpo, one seed, 8 rollouts per
    question and no KL in its log."""
    return [write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.10, 0.0), 2: (0.30, 0.02), 4: (0.6, 0.0)},
                      train_log([0.1, 0.3])),
            write_run(tmp_path, "critique-s1", "critique", 1, {0: (0.20, 0.0), 2: (0.50, 0.06)},
                      train_log([0.2, 0.5, 0.9])),
            write_run(tmp_path, "grpo-s0", "grpo", 0, {0: (0.10, 0.0), 2: (0.40, 0.10)},
                      train_log([0.25, 0.45], kl=False))]


# ---------------------------------------------------------------------------------------------
# --plot


def read_csv(path):
    with open(path) as f:
        return {(r["arm"], r["metric"], int(r["step"])): r for r in csv.DictReader(f)}


def test_plot_without_matplotlib_writes_the_csv_and_a_hint(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "figs" / "training.png"
    assert compare.plot_training(runs, str(out)) == [str(tmp_path / "figs" / "training.csv")]
    assert not out.exists()
    assert capsys.readouterr().out.strip().endswith(f"pip install {common.MATPLOTLIB}")
    rows = read_csv(tmp_path / "figs" / "training.csv")
    # Avg@k at the steps both seeds evaluated: step 4 (seed 0 only) is left out
    assert {s for a, m, s in rows if (a, m) == ("critique", "avg")} == {0, 2}
    step2 = rows[("critique", "avg", 2)]
    assert float(step2["mean"]) == pytest.approx(0.4) and float(step2["min"]) == pytest.approx(0.3)
    assert float(step2["max"]) == pytest.approx(0.5) and float(step2["std"]) == pytest.approx(0.1414, abs=1e-4)
    assert step2["seeds"] == "2" and step2["rollouts"] == "64"  # 2 steps × 32 questions × G 1
    assert rows[("grpo", "avg", 2)]["rollouts"] == "512"  # G = 8
    # the training log: steps every seed logged; GRPO logs no KL
    assert float(rows[("critique", "train/reward", 2)]["mean"]) == pytest.approx(0.4)
    assert ("critique", "train/reward", 3) not in rows
    assert ("critique", "train/kl", 1) in rows and not any(m == "train/kl" for a, m, _ in rows if a == "grpo")


def test_plot_png_with_matplotlib(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for x in ("step", "rollouts"):
        out = tmp_path / f"{x}.png"
        code, stdout, _ = compare_main(["--plot", *runs, "--out", str(out), "--x", x], capsys)
        assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
        assert (tmp_path / f"{x}.csv").exists() and "wrote" in stdout


def test_one_arm_plot_names_the_arm_and_the_model_and_says_one_seed(runs, tmp_path, monkeypatch, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    seen = {}

    def savefig(fig, *args, **kwargs):  # read the figure's texts as they are saved
        seen["title"] = fig._suptitle.get_text() if fig._suptitle else None
        seen["legend"] = [t.get_text() for legend in fig.legends for t in legend.get_texts()]

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    compare_main(["--plot", runs[2], "--out", str(tmp_path / "one.png")], capsys)
    assert seen["title"] == "grpo on the toy world"
    assert "grpo (1 seed)" in seen["legend"]
    compare_main(["--plot", *runs, "--out", str(tmp_path / "all.png")], capsys)
    assert seen["title"] is None  # several arms: the legend names them


def test_plot_shows_the_papers_three_metrics_the_best_checkpoint_and_named_ceilings(runs, tmp_path, monkeypatch,
                                                                                     capsys):
    """Avg, Pass and Maj panels; a star on each arm's best checkpoint (never step 0, even where the
    base scores highest); a log rollouts axis; each ceiling named at its dotted line."""
    plt = pytest.importorskip("matplotlib.pyplot")
    seen = {}
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: seen.update(axes=fig.axes))
    compare_main(["--plot", *runs, "--out", str(tmp_path / "r.png"), "--x", "rollouts"], capsys)
    avg = seen["axes"][0]
    assert [ax.get_title() for ax in seen["axes"][:3]] == ["Avg@4 (%)", "Pass@4 (%)", "Maj@4 (%)"]
    assert {ax.get_xscale() for ax in seen["axes"]} == {"log"}
    stars = sorted((line.get_xdata()[0], round(line.get_ydata()[0], 6)) for line in avg.lines if line.get_marker() == "*")
    assert stars == [(64, 40.0), (512, 40.0)]  # critique, grpo: step 2
    ceilings = json.load(open(os.path.join(folders.WORLD, "build.json")))["ceilings"]
    assert f"critique teacher {100 * ceilings['critique']:.1f}" in [t.get_text() for t in avg.texts]
    falling = write_run(tmp_path, "falling", "critique", 0, {0: (0.9, 0.0), 10: (0.3, 0.0), 20: (0.2, 0.0)})
    compare_main(["--plot", falling, "--out", str(tmp_path / "f.png")], capsys)
    avg = seen["axes"][0]
    assert [(line.get_xdata()[0], round(line.get_ydata()[0], 6)) for line in avg.lines
            if line.get_marker() == "*"] == [(10, 30.0)]
    assert avg.get_xscale() == "linear"
    # an arm drawn exactly over another says so in the legend (its markers are hollow and larger)
    rows = [{"arm": arm, "metric": "avg", "step": s, "mean": m} for arm in ("a", "b", "c")
            for s, m in ((0, 0.1), (10, 0.5 if arm != "c" else 0.6))]
    assert curves.identical_arms(rows, ["a", "b", "c"]) == {"b": "; Avg curve = a's"}


def compare_main(argv, capsys):
    """compare.main(argv) in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        compare.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# --per-step and the table


def test_per_step_table_hand_computed(runs, capsys):
    code, out, _ = compare_main(["--per-step", *runs], capsys)
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("arm"))
    assert header.split() == ["arm", "seeds", "0", "2"]
    # critique: step 0 (0.1 + 0.2) / 2, std 0.0707; step 2 (0.3 + 0.5) / 2, std 0.1414
    critique = next(line for line in lines if line.startswith("critique"))
    assert critique.split() == ["critique", "2", "15.0±7.1", "40.0±14.1"]
    assert next(line for line in lines if line.startswith("grpo")).split() == ["grpo", "1", "10.0", "40.0"]
    markdown = compare.per_step_table(compare.compare_runs(runs)[0], markdown=True)
    assert "| critique | 2 | 15.0 ± 7.1 | 40.0 ± 14.1 |" in markdown.splitlines()


def test_compare_has_a_base_row_and_an_unparseable_column(runs):
    arms, shared = compare.compare_runs(runs)
    lines = compare.comparison_table(arms, shared, markdown=True).splitlines()
    assert lines[2] == "| arm | seeds | step | Pass@4 | Maj@4 | Avg@4 | len | unparsed | teacher ceiling |"
    # the base of seed 0 is shared by critique-s0 and grpo-s0 (equal base_key): it counts once,
    # so the base row pools seeds 0 and 1: Avg (0.1 + 0.2) / 2
    assert lines[4] == "| base (step 0) | 2 | 0 | 30.0 ± 14.1 | 7.5 ± 3.5 | 15.0 ± 7.1 | 30.0 ± 0.0 | 0.0 ± 0.0 |  |"
    # unparseable at the final step (2): critique (0.02 + 0.06) / 2
    assert lines[5].startswith("| critique | 2 | 2 |") and "| 4.0 ± 2.8 |" in lines[5]
    assert lines[6].startswith("| grpo | 1 | 2 |") and "| 10.0 |" in lines[6] and lines[6].endswith("| — |")


def test_bases_of_different_models_get_a_row_each(tmp_path):
    runs = [write_run(tmp_path, "a", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)}),
            write_run(tmp_path, "b", "critique", 0, {0: (0.5, 0.0), 2: (0.6, 0.0)}, lr=1e-3)]
    with open(os.path.join(runs[1], "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows[0]["base_key"]["model"] = "another"
    with open(os.path.join(runs[1], "eval.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    lines = compare.comparison_table(*compare.compare_runs(runs), markdown=True).splitlines()
    assert lines[4].startswith("| base of critique | 1 | 0 |") and "| 10.0 |" in lines[4]
    assert lines[5].startswith("| base of critique lr=0.001 | 1 | 0 |") and "| 50.0 |" in lines[5]
    assert not any("base (step 0)" in line for line in lines)


def test_plain_tables_fit_100_columns(tmp_path):
    steps = range(0, 110, 10)
    long = {"toy_order": "chain", "toy_phrasing": "same"}
    runs = [write_run(tmp_path, f"{arm}-{name}-s{seed}", arm, seed,
                      {s: (0.1 + 0.8 * s / 100 - 0.01 * seed, 0.123) for s in steps}, **extra)
            for seed in (0, 1, 2) for arm, name, extra in
            (("grpo", "", {}), ("reference", "aligned", long), ("critique_no_prefix", "", {}))]
    arms, shared = compare.compare_runs(runs)
    outputs = [compare.comparison_table(arms, shared, ci=True), compare.comparison_table(arms, shared), compare.per_step_table(arms)]
    for text in outputs:
        assert max(len(line) for line in text.splitlines()) <= 100
    per_step = outputs[2]
    headers = [line.split() for line in per_step.splitlines() if line.startswith("arm")]
    assert len(headers) == 2  # 11 steps do not fit one block: the rest continue below
    assert sum((h[2:] if h[1] == "seeds" else h[1:] for h in headers), []) == [str(s) for s in steps]
    # the long label wraps onto indented lines; no setting is lost
    lines = per_step.splitlines()
    assert sum(line.startswith("reference  ") for line in lines) == 2  # once per block
    assert lines.count("  toy_order=chain") == 2 and lines.count("  toy_phrasing=same") == 2
    assert "[85.0, 95.0]" in outputs[0]  # --ci: seed 0's final Avg 0.9, its interval ± 0.05


def test_table_options_are_refused_with_plot(runs, capsys):
    code, _, err = compare_main(["--plot", "--per-step", runs[0]], capsys)  # a table's option
    assert code == 2 and err.startswith("error: --per-step goes with the tables, not with --plot")


# ---------------------------------------------------------------------------------------------
# Pooling seeds, labels, budgets and the transfer probe (runs written by hand)

def fake_run(root, name, seed, values, **config):
    """A run folder with config.yaml and eval.jsonl; values: {step: avg} (other metrics derived)."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    # a resolved config, as training writes it
    cfg = vars(selfdistill.resolve(selfdistill.Config(**{"arm": "critique", "seed": seed, "run": name, **config})))
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(run_dir, "eval.jsonl"), "w") as f:
        for step, avg in values.items():
            row = {"step": step, "n": 4, "k": 4, "questions": 10, "temperature": 1.0, "avg": avg,
                   "pass": min(1.0, 2 * avg), "maj": avg / 2, "length": 10 * step, "unparseable": 0,
                   "truncated": 0}
            row["ci"] = {m: [row[m] - 0.1, row[m] + 0.1] for m in ev.METRICS}
            f.write(json.dumps(row) + "\n")
    return run_dir


def test_compare_pools_seeds(tmp_path):
    runs = [fake_run(tmp_path, "c0", 0, {0: 0.1, 10: 0.3, 20: 0.5, 30: 0.4}),
            fake_run(tmp_path, "c1", 1, {0: 0.1, 10: 0.5, 20: 0.5, 30: 0.2}),
            fake_run(tmp_path, "r0", 0, {0: 0.1, 10: 0.2, 20: 0.1}, arm="reference", lr=1e-3)]
    arms, shared = compare.compare_runs(runs)
    critique, reference = arms
    assert critique["label"] == "critique" and critique["seeds"] == [0, 1]
    assert reference["label"] == "reference lr=0.001" and shared == {}
    best, final = critique["avg"]["best"], critique["avg"]["final"]
    assert best["step"] == 20 and best["value"] == pytest.approx(0.5) and best["spread"] == pytest.approx(0)
    assert final["step"] == 30 and final["value"] == pytest.approx(0.3)
    assert final["spread"] == pytest.approx(0.14142, abs=1e-4)  # std of (0.4, 0.2), n - 1
    assert critique["length"]["best"]["step"] == 20  # length is shown at the Avg-best step
    assert reference["avg"]["best"]["spread"] == pytest.approx([0.1, 0.3])  # one seed: the CI
    table = compare.comparison_table(arms, shared, markdown=True)
    lines = table.splitlines()
    assert lines[2] == "| arm | seeds | step | Pass@4 | Maj@4 | Avg@4 | len | unparsed | teacher ceiling |"
    # the final checkpoint, mean ± std over seeds (one seed: the value; its CI is behind --ci),
    # beside it the toy world's teacher with the arm's context (build.json)
    ceilings = json.load(open(os.path.join(folders.WORLD, "build.json")))["ceilings"]
    assert (f"| critique | 2 | 30 | 60.0 ± 28.3 | 15.0 ± 7.1 | 30.0 ± 14.1 | 300.0 ± 0.0 | 0.0 ± 0.0 | "
            f"{100 * ceilings['critique']:.1f} |") in lines
    assert f"| reference lr=0.001 | 1 | 20 | 20.0 | 5.0 | 10.0 | 200.0 | 0.0 | {100 * ceilings['reference']:.1f} |" in lines
    # the best checkpoint of the seed-mean curve, with its step
    assert "| critique | 100.0 ± 0.0 (20) | 25.0 ± 0.0 (20) | 50.0 ± 0.0 (20) | 200.0 ± 0.0 (20) |" in lines
    assert "| reference lr=0.001 | 40.0 (10) | 10.0 (10) | 20.0 (10) | 100.0 (10) |" in lines


def test_compare_labels_runs_that_differ_in_length_budget_apart(tmp_path, capsys):
    """A toy run at its world's budget is the default; one at another budget says so (quietly)."""
    runs = [fake_run(tmp_path, "a", 0, {0: 0.1, 10: 0.3}),
            fake_run(tmp_path, "b", 0, {0: 0.1, 10: 0.35}, max_new_tokens=folders.budget() + 8)]
    capsys.readouterr()
    labels = [arm["label"] for arm in compare.compare_runs(runs)[0]]
    assert labels == ["critique", f"critique max_new_tokens={folders.budget() + 8}"]
    assert "warning" not in capsys.readouterr().err


def test_toy_table_shows_what_moved(tmp_path):
    """compare.py's last table: per-step arithmetic etc. at the base, the best and the final step."""
    run = fake_run(tmp_path, "t", 0, {0: 0.1, 10: 0.3, 20: 0.2})
    rows = [json.loads(line) for line in open(os.path.join(run, "eval.jsonl"))]
    with open(os.path.join(run, "eval.jsonl"), "w") as f:
        for row, arith in zip(rows, (0.5, 0.9, 0.8)):
            row["toy"] = {"step_arith": arith, "step_chain": 1.0, "answer_own": 0.99,
                          "styles": {"plain": 1.0}, "style_accuracy": {"plain": row["avg"]}}
            f.write(json.dumps(row) + "\n")
    arms, shared = compare.compare_runs([run])
    assert arms[0]["toy"]["base"]["step_arith"] == 0.5 and arms[0]["toy"]["best"]["step_arith"] == 0.9
    assert arms[0]["toy"]["final"]["step_arith"] == 0.8
    table = compare.comparison_table(arms, shared, markdown=True)
    assert "| step_arith base | step_arith best | step_arith final |" in table
    assert "| critique | 50.0 | 90.0 | 80.0 |" in table and "plain 100" in table


def test_compare_needs_eval_jsonl(tmp_path):
    run_dir = fake_run(tmp_path, "a", 0, {})
    with pytest.raises(UserError, match="no eval.jsonl"):
        compare.compare_runs([run_dir])


def test_compare_shows_both_budget_axes(tmp_path):
    """Arms with other budgets get the budget table: each arm at equal questions (the most any arm
    saw), at equal rollouts (the fewest any arm drew) and the rollouts it needed to reach a score."""
    # critique: 32 questions × 1 a step, 30 steps = 960 rollouts; grpo: 32 × 8 = 256 a step, so
    # step 4 (1,024) is the closest to 960; the rollout-matched grpo: 4 × 8 = 32 a step, 30 steps
    # = 960 rollouts but only 120 questions, so it never reaches equal questions (960)
    runs = [fake_run(tmp_path, "c0", 0, {0: 0.1, 10: 0.3, 20: 0.5, 30: 0.4}),
            fake_run(tmp_path, "g0", 0, {0: 0.1, 2: 0.15, 4: 0.2, 30: 0.6}, arm="grpo",
                     samples_per_question=8),
            fake_run(tmp_path, "m0", 0, {0: 0.1, 10: 0.2, 20: 0.25, 30: 0.3}, arm="grpo",
                     samples_per_question=8, batch_size=4, max_steps=30)]
    arms, shared = compare.compare_runs(runs)
    table = compare.comparison_table(arms, shared, markdown=True, reach=0.45)
    assert ("| arm | questions/step | rollouts/step | questions | rollouts | Avg@4 final | Avg@4 at 960 "
            "questions | Avg@4 at 960 rollouts | rollouts to Avg@4 ≥ 45 |") in table
    assert "| critique | 32 | 32 | 960 | 960 | 40.0 (30) | 40.0 (30) | 40.0 (30) | 640 |" in table
    assert "| grpo | 32 | 256 | 960 | 7680 | 60.0 (30) | 60.0 (30) | 20.0 (4) | 7680 |" in table
    assert "| grpo batch_size=4 max_steps=30 | 4 | 32 | 120 | 960 | 30.0 (30) | — | 30.0 (30) | — |" in table
    assert compare.rollouts_to_reach(arms[0], 0.5) == 640 and compare.rollouts_to_reach(arms[2], 0.9) is None
    same = compare.comparison_table(*compare.compare_runs(runs[:1]), markdown=True)
    assert "rollouts/step" not in same  # equal budgets: no budget table
    grpo_only = compare.comparison_table(*compare.compare_runs(runs[1:2]), markdown=True)
    assert "teacher ceiling" not in grpo_only  # GRPO has no teacher


def test_compare_shows_the_transfer_probe(tmp_path):
    """Transfer rows (split "transfer") stay out of the test table and get their own, base and final."""
    run = fake_run(tmp_path, "t", 0, {0: 0.1, 10: 0.3, 20: 0.5})
    with open(os.path.join(run, "eval.jsonl"), "a") as f:
        for step, avg in ((0, 0.05), (20, 0.07)):
            row = {"step": step, "n": 4, "k": 4, "questions": 7, "temperature": 1.0, "avg": avg, "pass": avg,
                   "maj": avg, "length": 1, "unparseable": 0, "truncated": 0, "split": "transfer",
                   "ci": {m: [0, 1] for m in ev.METRICS}}
            f.write(json.dumps(row) + "\n")
    arms, shared = compare.compare_runs([run])
    assert arms[0]["avg"]["final"]["value"] == 0.5 and arms[0]["avg"]["final"]["step"] == 20
    assert arms[0]["transfer"]["base"]["value"] == 0.05 and arms[0]["transfer"]["final"]["value"] == 0.07
    table = compare.comparison_table(arms, shared, markdown=True)
    assert "Transfer probe (7 problems" in table and "| critique | 5.0 | 7.0 (20) | 50.0 (20) |" in table
