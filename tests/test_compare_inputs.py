"""compare.py's inputs: the rows it reads, the runs it is given, --out, and each run's config.yaml.

Protects: one validator for eval.jsonl rows, shared by every reader (the tables, --per-step, --plot,
eval.py's reuse of a base row): a row that is no object, lacks keys, has a step as text / decimal /
negative / bool, a NaN, inf or out-of-range metric, or a bad ci, split, base_key or toy is skipped,
one warning per file counting them, never shown as a number; metrics.jsonl lines likewise for
--plot (the CSV holds no nan/inf); a damaged row of a step evaluation would reuse is evaluated again.
One run reached by two paths (a link, a trailing /, ./) or given twice is one `error:` line, as are
--plot --out that is no figure file, --out without --plot, runs evaluated with other settings, and a
run's config.yaml that is not YAML, a list, not UTF-8, empty, without an arm, with an unknown key, a
wrong type, a bad choice, a NaN or a key twice (naming the file)."""
import json
import os
import sys

import pytest
import yaml

import compare
import eval as ev
from plumbing import runfolder
from plumbing.common import UserError
from conftest import one_line_error, run_main, trip
from test_compare import train_log, write_run
from test_eval_inputs import make_run, tiny_run
from test_run_folder import write_config


# ---------------------------------------------------------------------------------------------
# eval.jsonl and metrics.jsonl rows: one validator for every reader


def counted_skip(err, count, fragment=""):
    warnings = [line for line in err.splitlines() if "malformed row" in line]
    assert len(warnings) == 1 and f": {count} malformed row" in warnings[0] and fragment in warnings[0], err
    assert "Traceback" not in err


def good_row(step, avg=0.5):
    row = {"step": step, "n": 4, "k": 4, "questions": 10, "temperature": 1.0, "avg": avg, "pass": avg,
           "maj": avg, "length": 30.0, "unparseable": 0.0, "truncated": 0.0}
    row["ci"] = {m: [row[m], row[m]] for m in ev.METRICS}
    return row


def append_line(run_dir, name, text):
    with open(os.path.join(run_dir, name), "a") as f:
        f.write(text + "\n")


def changed(**values):
    row = good_row(2, 0.9)
    for key, value in values.items():
        if value is KeyError:
            del row[key]
        else:
            row[key] = value
    return json.dumps(row)


NAN, INF = float("nan"), float("inf")


BAD_ROWS = {
    "a list": "[1, 2]", "a number": "3", "a string": '"step 2"', "null": "null",
    "no step": changed(step=KeyError), "no avg": changed(avg=KeyError), "no ci": changed(ci=KeyError),
    "no n": changed(n=KeyError), "step as text": changed(step="2"), "step as decimal": changed(step=2.0),
    "negative step": changed(step=-2), "step true": changed(step=True), "n zero": changed(n=0),
    "k as text": changed(k="4"), "questions negative": changed(questions=-1),
    "temperature NaN": changed(temperature=NAN), "temperature inf": changed(temperature=INF),
    "temperature zero": changed(temperature=0), "avg NaN": changed(avg=NAN), "avg inf": changed(avg=INF),
    "avg -inf": changed(avg=-INF), "avg as text": changed(avg="0.9"), "avg null": changed(avg=None),
    "avg above 1": changed(avg=1.5), "avg negative": changed(avg=-0.1), "length inf": changed(length=INF),
    "length negative": changed(length=-3.0), "pass NaN": changed(**{"pass": NAN}), "maj true": changed(maj=True),
    "ci a list": changed(ci=[0, 1]), "ci one bound": changed(ci={m: [0.1] for m in ev.METRICS}),
    "ci NaN": changed(ci={m: [NAN, 0.5] for m in ev.METRICS}), "split a number": changed(split=3),
    "base_key text": changed(base_key="toy"), "toy a list": changed(toy=[1]),
    "toy rate NaN": changed(toy={"step_arith": NAN, "styles": {}}),
    "toy styles inf": changed(toy={"step_arith": 0.5, "styles": {"a": INF}}),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("line", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_malformed_eval_row_is_skipped_and_counted_by_the_tables(line, tmp_path, capsys):
    """The bad row claims step 2 with Avg 0.9: the table must show the good step 2 (0.3), counted once."""
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    append_line(run, "eval.jsonl", line)
    code, out, err = run_main([run], capsys, compare)
    assert code == 0, err
    counted_skip(err, 1, "line 3")
    assert "30.0" in out and "90.0" not in out and "nan" not in out.lower() and "inf" not in out.lower()


@pytest.mark.bad_input
def test_many_malformed_rows_are_one_warning_naming_the_first(tmp_path, capsys):
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    for line in ("[]", changed(step="2"), changed(avg=NAN)):
        append_line(run, "eval.jsonl", line)
    code, out, err = run_main([run, "--per-step"], capsys, compare)
    assert code == 0
    counted_skip(err, 3, "line 3: not a JSON object")


@pytest.mark.bad_input
def test_a_nan_row_of_one_seed_does_not_crash_the_stdev(tmp_path, capsys):
    """statistics.stdev over seeds met a NaN (or a row of another type) before: now the row is skipped,
    and the step that only one seed still has drops out of the pooled curve."""
    runs = [write_run(tmp_path, f"critique-s{s}", "critique", s, {0: (0.1, 0.0), 2: (0.3 + s / 10, 0.0), 4: (0.5, 0.0)})
            for s in (0, 1)]
    lines = open(os.path.join(runs[1], "eval.jsonl")).read().splitlines()
    lines[2] = changed(step=4, avg=NAN)
    open(os.path.join(runs[1], "eval.jsonl"), "w").write("\n".join(lines) + "\n")
    code, out, err = run_main(runs + ["--per-step"], capsys, compare)
    assert code == 0 and "nan" not in out.lower()
    counted_skip(err, 1, "avg not a valid value")


@pytest.mark.bad_input
def test_an_run_whose_every_row_is_malformed_is_one_line(tmp_path, capsys):
    run = write_run(tmp_path, "critique-s0", "critique", 0, {})
    append_line(run, "eval.jsonl", changed(avg=INF))
    code, _, err = run_main([run], capsys, compare)
    one_line_error(code, err, "no eval.jsonl rows yet (none usable)")


BAD_METRICS = {"a list": "[]", "no step": '{"train/reward": 0.5}', "step as text": '{"step": "3", "train/reward": 0.5}',
               "step zero": '{"step": 0, "train/reward": 0.5}', "reward NaN": '{"step": 3, "train/reward": NaN}',
               "kl inf": '{"step": 3, "train/reward": 0.5, "train/kl": Infinity}',
               "length as text": '{"step": 3, "train/response_len": "long"}'}


@pytest.mark.bad_input
@pytest.mark.parametrize("line", BAD_METRICS.values(), ids=BAD_METRICS.keys())
def test_plot_skips_malformed_metrics_lines(line, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the CSV only: fast
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)}, train_log([0.1, 0.3]))
    append_line(run, "metrics.jsonl", line)
    out = tmp_path / "fig" / "training.png"
    code, _, err = run_main(["--plot", run, "--out", str(out)], capsys, compare)
    assert code == 0, err
    counted_skip(err, 1, "metrics.jsonl")
    text = (tmp_path / "fig" / "training.csv").read_text().lower()
    assert "nan" not in text and "inf" not in text and ",3," not in text


@pytest.mark.bad_input
def test_plot_skips_malformed_eval_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)}, train_log([0.1, 0.3]))
    append_line(run, "eval.jsonl", changed(step=6, avg=INF))
    code, _, err = run_main(["--plot", run, "--out", str(tmp_path / "f.png")], capsys, compare)
    assert code == 0
    counted_skip(err, 1, "eval.jsonl")
    assert "inf" not in (tmp_path / "f.csv").read_text().lower()


@pytest.mark.bad_input
def test_reuse_of_a_base_row_skips_a_malformed_sibling_row(tmp_path, capsys):
    key = {"model": "m", "seed": 0}
    sibling = write_run(tmp_path, "a", "critique", 0, {})
    append_line(sibling, "eval.jsonl", json.dumps({**good_row(0), "avg": NAN, "base_key": key}))
    ours = write_run(tmp_path, "b", "critique", 0, {})
    assert ev.reusable_base_row(ours, key) is None
    counted_skip(capsys.readouterr().err, 1, "avg")
    append_line(sibling, "eval.jsonl", json.dumps({**good_row(0), "base_key": key}))
    assert ev.reusable_base_row(ours, key)["reused_from"] == "a"


@pytest.mark.bad_input
def test_a_malformed_row_of_a_done_step_is_evaluated_again(tiny_model_dir, data, tmp_path, capsys):
    run = tiny_run(tmp_path, tiny_model_dir, data)
    row = ev.evaluate_run(run)[0]
    open(os.path.join(run, "eval.jsonl"), "w").write(json.dumps({**row, "avg": NAN}) + "\n")
    capsys.readouterr()
    again = ev.evaluate_run(run)
    assert [r["avg"] for r in again] == [row["avg"]]  # recovered: the same numbers
    counted_skip(capsys.readouterr().err, 1, "avg")


# ---------------------------------------------------------------------------------------------
# The runs given: twice, evaluated differently


@pytest.mark.bad_input
@pytest.mark.parametrize("alias", ["link", "slash", "dot"])
def test_one_run_by_two_paths_counts_once(alias, tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    monkeypatch.chdir(tmp_path)
    other = {"link": str(tmp_path / "alias"), "slash": run + "/", "dot": "./critique-s0"}[alias]
    if alias == "link":
        os.symlink(run, other)
    code, _, err = run_main([run, other], capsys, compare)
    one_line_error(code, err, "is given twice")


@pytest.mark.bad_input
def test_compare_the_same_run_twice(tiny_model_dir, data, tmp_path):
    run_dir = make_run(tmp_path, tiny_model_dir, data)
    row = {"step": 10, "n": 2, "k": 2, "questions": 12, "temperature": 1.0, "avg": 0.5, "pass": 0.5,
           "maj": 0.5, "length": 3.0, "unparseable": 0.0, "truncated": 0.0,
           "ci": {m: [0.4, 0.6] for m in ev.METRICS}}
    with open(os.path.join(run_dir, "eval.jsonl"), "w") as f:
        f.write(json.dumps(row) + "\n")
    try:
        arms, _ = compare.compare_runs([run_dir, run_dir])  # e.g. runs/critique-s* runs/critique-s0
    except UserError as e:
        assert "twice" in str(e)
    else:
        assert arms[0]["seeds"] == [0]


@pytest.mark.bad_input
def test_compare_refuses_runs_evaluated_differently(tmp_path, capsys):
    for name, n in (("a", 12), ("b", 4)):
        run_dir = write_config(tmp_path / name)
        for step in (0, 1):  # the base and a checkpoint (a run at step 0 only is refused for that)
            row = {"step": step, "n": n, "k": n, "questions": 10, "temperature": 1.0,
                   **{m: 0.5 for m in ev.METRICS}, "ci": {m: [0.4, 0.6] for m in ev.METRICS}}
            runfolder.append_jsonl(os.path.join(run_dir, "eval.jsonl"), row)
    code, _, err = run_main([str(tmp_path / "a"), str(tmp_path / "b")], capsys, script=compare)
    one_line_error(code, err, "evaluated with other settings")


# ---------------------------------------------------------------------------------------------
# --plot --out


@pytest.mark.bad_input
@pytest.mark.parametrize("out, fragment", [
    ("figs", "is a folder"), ("figs/", "is a folder"), ("training", "must end in .png"),
    ("training.txt", "must end in .png"), ("training.png.bak", "must end in .png"),
    ("afile/training.png", "is a file, not a folder"), ("afile/deeper/training.png", "is a file, not a folder"),
])
def test_plot_out_that_is_no_figure_file(out, fragment, tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    monkeypatch.chdir(tmp_path)
    os.makedirs("figs")
    open("afile", "w").close()
    trip(monkeypatch, compare, "plot_rows")  # refused before any run is read
    code, _, err = run_main(["--plot", run, "--out", out], capsys, compare)
    one_line_error(code, err, fragment)


@pytest.mark.parametrize("out", ["t.pdf", "t.svg", "new/sub/t.PNG"])
def test_plot_out_in_each_figure_format(out, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["--plot", run, "--out", out], capsys, compare)
    assert code == 0 and os.path.isfile(os.path.splitext(out)[0] + ".csv"), err


@pytest.mark.bad_input
def test_out_without_plot_is_one_line(tmp_path, capsys):
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    code, _, err = run_main([run, "--out", str(tmp_path / "t.png")], capsys, compare)
    one_line_error(code, err, "--out goes with --plot")


# ---------------------------------------------------------------------------------------------
# A run's config.yaml


BAD_CONFIGS = {
    "not YAML": ("arm: [critique\n", "is not valid YAML"), "a list": ("- arm\n- critique\n", "must be a mapping"),
    "not UTF-8": (b"arm: \xff\xfe\n", "is not UTF-8"), "empty": ("", "has no arm or model"),
    "no arm": (None, "has no arm"), "unknown key": ({"lrr": 1}, "unknown config key 'lrr'"),
    "wrong type": ({"batch_size": "four"}, "batch_size"), "bad choice": ({"arm": "critic"}, "arm"),
    "NaN": ({"lr": NAN}, "'lr' must be a finite number"), "key twice": ("arm: grpo\narm: critique\n", "twice"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("content, fragment", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_a_malformed_config_yaml_is_one_line_naming_it(content, fragment, tmp_path, capsys):
    good = write_run(tmp_path, "grpo-s0", "grpo", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    path = os.path.join(run, "config.yaml")
    config = yaml.safe_load(open(path))
    if content is None:
        del config["arm"]
    if isinstance(content, dict):
        config.update(content)
    text = yaml.safe_dump(config) if content is None or isinstance(content, dict) else content
    open(path, "wb").write(text if isinstance(text, bytes) else text.encode())
    code, _, err = run_main([good, run], capsys, compare)
    one_line_error(code, err, fragment)
    assert path in err or "critique-s0" in err
