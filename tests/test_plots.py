"""eval.py's outputs a researcher looks at: --plot, --compare --per-step, the --compare table and
the --analyze page and figures, on run folders written by hand (no training).

Protects: --plot writes its data as CSV (seed mean, min, max per arm and step, from eval.jsonl and
metrics.jsonl) and, without matplotlib, only the CSV plus a one-line install hint; with matplotlib a
PNG; the per-step table's numbers against hand-computed means and stds; --compare's base row (a
base shared by two arms counts once) and unparseable column; plain-text tables at most 100 columns
wide; the error focus n/a where the prefix has no correct step, and its floor; the page's colour
scale taken from the data; the pooled Fig. 4 alignment; where --analyze writes for a model."""
import csv
import json
import os
import sys

import pytest
import yaml

import common
import eval as ev
import selfdistill
import analyze
import compare


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
        code, stdout, _ = common_main(["--plot", *runs, "--out", str(out), "--x", x], capsys)
        assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
        assert (tmp_path / f"{x}.csv").exists() and "wrote" in stdout


def common_main(argv, capsys):
    """eval.main(argv) in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        ev.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# --compare --per-step and the --compare table


def test_per_step_table_hand_computed(runs, capsys):
    code, out, _ = common_main(["--compare", "--per-step", *runs], capsys)
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


# ---------------------------------------------------------------------------------------------
# --analyze: error focus, colour scale, pooled alignment, output folder


def test_focus_is_na_without_a_correct_step_and_floored():
    import torch
    A = torch.tensor([1e-6, -0.5, -0.3, 0.0])
    prefix = torch.tensor([1, 0, 0, 0], dtype=torch.bool)  # the wrong step's tag alone
    wrong = torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    after = ~(prefix | wrong)
    alone = analyze.advantage_summary(A, prefix, wrong, after, prefix_has_step=False)
    assert alone["prefix"] is None and alone["prefix_abs"] is None and alone["focus"] is None
    assert alone["wrong"] == pytest.approx(-0.4)
    # a correct prefix that teacher and student score alike: the ratio divides by the floor
    floored = analyze.advantage_summary(A, prefix, wrong, after)
    assert floored["focus"] == pytest.approx(0.4 / analyze.FOCUS_FLOOR) and floored["focus"] < 1e3
    results = [{"summary": {"critique": alone}}, {"summary": {"critique": {**floored, "prefix_abs": 0.2,
                                                                           "focus": 0.4 / 0.2}}}]
    pooled = analyze.summarize_contexts(results, ["critique"])["critique"]
    assert pooled["focus_pooled"] == {"mean": pytest.approx(2.0), "median_per_rollout": pytest.approx(2.0), "n": 1}
    assert pooled["wrong"]["n"] == 2 and pooled["prefix"]["n"] == 1
    page = analyze.render_html([fake_result([0.1, -0.5, -0.3, 0.0], alone)], ["critique"], "t", {"critique": pooled})
    assert "prefix n/a, wrong step -0.40, after +0.00, focus n/a" in page
    assert "<td>critique</td><td>2</td><td>1</td>" in page  # rollouts, and those with a correct prefix


def fake_result(A, summary, wrong_span=(1, 3)):
    return {"question": "q", "answer": "1", "tokens": ["<step_1>", " 1", "+1", "=3"][:len(A)], "step_starts": [0],
            "wrong_step": 1, "wrong_span": list(wrong_span), "contexts": {"critique": {"text": "c", "A": A}},
            "summary": {"critique": summary}}


def test_colour_scale_is_the_95th_percentile_of_the_data():
    import torch
    values = [i / 10 for i in range(-20, 21)]  # |A| = 0 … 2
    result = fake_result(values, {"prefix": None, "wrong": None, "after": None, "focus": None})
    result["tokens"] = [f"t{i}" for i in range(len(values))]
    scale = analyze.colour_scale([result], ["critique"])
    assert scale == pytest.approx(torch.quantile(torch.tensor([abs(v) for v in values]), 0.95).item())
    assert scale == pytest.approx(1.9)
    page = analyze.render_html([result], ["critique"], "t")
    assert "full colour at |A| ≥ 1.9 nats, the 95th percentile" in page
    assert 'rgba(215,48,39,1.00)" title="A = -2.000' in page  # beyond the scale: saturated
    assert 'rgba(69,117,180,0.50)" title="A = +0.950' not in page  # (0.95 is not a value here)
    assert 'rgba(215,48,39,0.53)" title="A = -1.000' in page  # 1.0 / 1.9
    zero = fake_result([0.0, 0.0], {"prefix": None, "wrong": None, "after": None, "focus": None})
    assert analyze.colour_scale([zero], ["critique"]) == 1.0


def test_aligned_advantages_by_hand(tmp_path):
    one = fake_result([0.0, -1.0, -3.0, 0.5], {}, wrong_span=(1, 3))
    two = fake_result([0.2, 0.0, -1.0], {}, wrong_span=(2, 3))
    curve = analyze.aligned_advantages([one, two], ["critique"], window=2)["critique"]
    # offsets: one at -1..2 (0.0, -1.0, -3.0, 0.5), two at -2..0 (0.2, 0.0, -1.0)
    assert curve["offset"] == [-2, -1, 0, 1, 2] and curve["n"] == [1, 2, 2, 1, 1]
    assert curve["mean"] == pytest.approx([0.2, 0.0, -1.0, -3.0, 0.5])
    assert curve["se"][0] is None and curve["se"][1] == pytest.approx(0.0)
    pytest.importorskip("matplotlib")
    path = analyze.plot_aligned({"critique": curve}, [one, two], str(tmp_path / "a.png"), "t")
    assert path and open(path, "rb").read(4) == b"\x89PNG"


def test_analyze_of_a_model_writes_under_analysis_name(tmp_path, tiny_model_dir, monkeypatch):
    """A model (not a run) is analysed into ./analysis/<its folder name>/: the HTML page opens with
    the summary table, the JSON carries the colour scale and the pooled curve, and with matplotlib
    the pooled Fig. 4 PNG is written beside the per-rollout one."""
    toy = pytest.importorskip("toy")
    problems = [("2+7+5", "<step_1> 2+7=9 <step_2> 9+5=15 <answer> 15"),
                ("6-2+3", "<step_1> 6-2=5 <step_2> 5+3=8 <answer> 8")]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"question": q, "answer": str(eval(q)),
                                             "solution": toy.reference_solution(q)}) + "\n" for q, _ in problems))

    def scripted(model, tokenizer, prompts, *args, **kwargs):
        texts = [t for _, t in problems][:len(prompts)]
        return [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts], [False] * len(texts)

    monkeypatch.setattr(common, "generate", scripted)
    monkeypatch.chdir(tmp_path)
    analyze.analyze(tiny_model_dir, [f"test_file={test_file}", "threads=1"], rollouts=2)
    out = tmp_path / "analysis" / os.path.basename(tiny_model_dir)
    saved = json.loads((out / "advantage_step_000000.json").read_text())
    assert [r["wrong_step"] for r in saved["rollouts"]] == [2, 1]
    critique = saved["summary"]["critique"]
    assert critique["prefix"]["n"] == 1 and critique["wrong"]["n"] == 2  # step 1 wrong: no prefix
    assert saved["rollouts"][1]["summary"]["critique"]["focus"] is None
    assert saved["colour_scale"] > 0 and set(saved["aligned"]) == set(analyze.KINDS)
    page = (out / "advantage_step_000000.html").read_text()
    assert page.index("<table>") < page.index("<h2>") and "error focus, pooled" in page
    if common.pyplot() is not None:
        assert (out / "advantage_step_000000_aligned.png").exists()


def test_compare_options_need_compare(runs, capsys):
    code, _, err = common_main(["--per-step", runs[0]], capsys)  # not an evaluation of the run
    assert code == 2 and err.startswith("error: --per-step and --ci go with --compare")
