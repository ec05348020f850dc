"""Protects the rest of issue 23, "Reliability III": the readers of a run's logs, stale reuse, the
secondary programs' inputs and flags, and interrupts. Every case ends in one of three outcomes: exit
2 with one `error: ...` line and no traceback; a counted skip with one warning; or a recovery.

| input | how it is handled |
|---|---|
| an eval.jsonl row that is no object, lacks keys, has a step as text / decimal / negative / bool, a NaN, inf or out-of-range metric, a bad ci, split, base_key or toy | skipped by every reader (eval.read_rows), one warning per file counting them; never shown as a number |
| such rows in --per-step, --plot, and metrics.jsonl lines that are no object, lack a whole step, or hold NaN/inf curves | the same counted skip; the CSV holds no nan/inf |
| a damaged eval.jsonl row of a step that evaluation would reuse | the step is evaluated again (recovery), warned once |
| a metrics.jsonl line without a whole step when a resume trims the log | kept as it was (no crash, no lost line) |
| one run reached by two paths (a link, a trailing /, ./) | exit 2: given twice; it counts once |
| --plot --out: a folder, no or an odd extension, a parent that is a file; --out without --plot | exit 2 |
| a run's config.yaml: not YAML, a list, not UTF-8, empty, an unknown key, a wrong type, a bad choice, NaN, no arm | exit 2 naming the file |
| the base model rebuilt under the same path / copied to another path | another base_key / the same one |
| the test file changed between two evaluations | its rows are not reused nor mixed (the `test` digest) |
| the train file or the base model changed before a resume; inputs.json damaged | exit 2: use another --run |
| an adapter evaluated on another base: other weights / the same weights moved / a base gone unchecked | exit 2 / warning / warning |
| prepare.py: input not UTF-8; a number, list, bool or decimal as a field; no object; problems longer than the context; the rule critic on non-toy data; --test-size -2 | exit 2 / counted skips (prepare.json) |
| analyze.py: a truncated, missing or garbage checkpoint; --rollouts 0 / -1 | exit 2 naming it |
| eval.py --temperature inf, nan, 1e-300, 1e-4, -1; --samples -3; --k beyond eval_samples | exit 2 before a model loads |
| Ctrl-C in compare.py, analyze.py, prepare.py | exit 130, one line |
| under torchrun, a collective failing because another process died | exit 2, one line (ranks.peer_failure); other RuntimeErrors still raise |

Everything runs in-process (`main(argv)` with capsys); the few evaluations use the tiny model with
two samples of four tokens."""
import json
import math
import os
import shutil
import sys

import pytest
import torch
import yaml

import analyze
from plumbing import common
import compare
import eval as ev
import prepare
from plumbing import ranks
from plumbing import runfolder
import selfdistill
from plumbing.common import UserError
from conftest import one_line_error, run_main, trip
from test_compare import train_log, write_run


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


# ---------------------------------------------------------------------------------------------
# 1. One row validator for eval.jsonl, shared by every reader


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


@pytest.mark.parametrize("line", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_malformed_eval_row_is_skipped_and_counted_by_the_tables(line, tmp_path, capsys):
    """The bad row claims step 2 with Avg 0.9: the table must show the good step 2 (0.3), counted once."""
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    append_line(run, "eval.jsonl", line)
    code, out, err = run_main([run], capsys, compare)
    assert code == 0, err
    counted_skip(err, 1, "line 3")
    assert "30.0" in out and "90.0" not in out and "nan" not in out.lower() and "inf" not in out.lower()


def test_many_malformed_rows_are_one_warning_naming_the_first(tmp_path, capsys):
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    for line in ("[]", changed(step="2"), changed(avg=NAN)):
        append_line(run, "eval.jsonl", line)
    code, out, err = run_main([run, "--per-step"], capsys, compare)
    assert code == 0
    counted_skip(err, 3, "line 3: not a JSON object")


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


def test_an_run_whose_every_row_is_malformed_is_one_line(tmp_path, capsys):
    run = write_run(tmp_path, "critique-s0", "critique", 0, {})
    append_line(run, "eval.jsonl", changed(avg=INF))
    code, _, err = run_main([run], capsys, compare)
    one_line_error(code, err, "no eval.jsonl rows yet (none usable)")


BAD_METRICS = {"a list": "[]", "no step": '{"train/reward": 0.5}', "step as text": '{"step": "3", "train/reward": 0.5}',
               "step zero": '{"step": 0, "train/reward": 0.5}', "reward NaN": '{"step": 3, "train/reward": NaN}',
               "kl inf": '{"step": 3, "train/reward": 0.5, "train/kl": Infinity}',
               "length as text": '{"step": 3, "train/response_len": "long"}'}


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


def test_plot_skips_malformed_eval_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)}, train_log([0.1, 0.3]))
    append_line(run, "eval.jsonl", changed(step=6, avg=INF))
    code, _, err = run_main(["--plot", run, "--out", str(tmp_path / "f.png")], capsys, compare)
    assert code == 0
    counted_skip(err, 1, "eval.jsonl")
    assert "inf" not in (tmp_path / "f.csv").read_text().lower()


def test_reuse_of_a_base_row_skips_a_malformed_sibling_row(tmp_path, capsys):
    key = {"model": "m", "seed": 0}
    sibling = write_run(tmp_path, "a", "critique", 0, {})
    append_line(sibling, "eval.jsonl", json.dumps({**good_row(0), "avg": NAN, "base_key": key}))
    ours = write_run(tmp_path, "b", "critique", 0, {})
    assert ev.reusable_base_row(ours, key) is None
    counted_skip(capsys.readouterr().err, 1, "avg")
    append_line(sibling, "eval.jsonl", json.dumps({**good_row(0), "base_key": key}))
    assert ev.reusable_base_row(ours, key)["reused_from"] == "a"


def test_a_resume_keeps_metrics_lines_without_a_whole_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = ['{"step": 1}', "[1]", '{"step": "2"}', '{"step": 3}', '{"step": 2.5}']
    open(path, "w").write("\n".join(lines) + "\n")
    runfolder.keep_lines_up_to(path, 2)  # crashed on a list or a text step before
    assert [json.dumps(r) for r in runfolder.read_jsonl(path)] == ['{"step": 1}', "[1]", '{"step": "2"}', '{"step": 2.5}']


# ---------------------------------------------------------------------------------------------
# 2. compare.py: paths, --out, config.yaml


@pytest.mark.parametrize("alias", ["link", "slash", "dot"])
def test_one_run_by_two_paths_counts_once(alias, tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    monkeypatch.chdir(tmp_path)
    other = {"link": str(tmp_path / "alias"), "slash": run + "/", "dot": "./critique-s0"}[alias]
    if alias == "link":
        os.symlink(run, other)
    code, _, err = run_main([run, other], capsys, compare)
    one_line_error(code, err, "is given twice")


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


def test_out_without_plot_is_one_line(tmp_path, capsys):
    run = write_run(tmp_path, "critique-s0", "critique", 0, {0: (0.1, 0.0), 2: (0.3, 0.0)})
    code, _, err = run_main([run, "--out", str(tmp_path / "t.png")], capsys, compare)
    one_line_error(code, err, "--out goes with --plot")


BAD_CONFIGS = {
    "not YAML": ("arm: [critique\n", "is not valid YAML"), "a list": ("- arm\n- critique\n", "must be a mapping"),
    "not UTF-8": (b"arm: \xff\xfe\n", "is not UTF-8"), "empty": ("", "has no arm or model"),
    "no arm": (None, "has no arm"), "unknown key": ({"lrr": 1}, "unknown config key 'lrr'"),
    "wrong type": ({"batch_size": "four"}, "batch_size"), "bad choice": ({"arm": "critic"}, "arm"),
    "NaN": ({"lr": NAN}, "'lr' must be a finite number"), "key twice": ("arm: grpo\narm: critique\n", "twice"),
}


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


# ---------------------------------------------------------------------------------------------
# 3. Stale reuse: contents, not paths


def test_the_base_key_follows_the_weights_not_the_path(tiny_model_dir, data, tmp_path):
    cfg = selfdistill.Config(model=tiny_model_dir)
    setting = {"n": 2, "k": 2, "questions": 3, "temperature": 1.0}
    cpu = torch.device("cpu")
    key = ev.base_key(cfg, tiny_model_dir, data, setting, cpu)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert ev.base_key(cfg, str(copy), data, setting, cpu) == key  # the same base under two paths
    weights = copy / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # rebuilt under the same path: one bit of a weight differs
    weights.write_bytes(bytes(blob))
    assert ev.base_key(cfg, str(copy), data, setting, cpu)["model"] != key["model"]
    assert key["device"] == "cpu" and key["dtype"] == cfg.dtype


def tiny_run(root, model_dir, test_file, name="run"):
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    cfg = vars(selfdistill.resolve(selfdistill.Config(
        model=model_dir, train_file=test_file, test_file=test_file, prompts="instruct", run=name,
        out_dir=str(root), eval_samples=2, eval_questions=2, max_new_tokens=4, threads=1)))
    yaml.safe_dump(cfg, open(os.path.join(run_dir, "config.yaml"), "w"))
    return run_dir


def test_rows_of_a_changed_test_file_are_not_reused_nor_mixed(tiny_model_dir, data, tmp_path, capsys):
    test_file = tmp_path / "test.jsonl"
    shutil.copy(data, test_file)
    run = tiny_run(tmp_path, tiny_model_dir, str(test_file))
    first = ev.evaluate_run(run)
    lines = test_file.read_text().splitlines()
    test_file.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # other questions first, same count
    second = ev.evaluate_run(run)
    assert len(first) == len(second) == 1 and first[0]["test"] != second[0]["test"]
    assert len(runfolder.read_jsonl(os.path.join(run, "eval.jsonl"))) == 2  # evaluated again, not reused
    assert ev.evaluate_run(run) == second  # and now reused


def test_a_malformed_row_of_a_done_step_is_evaluated_again(tiny_model_dir, data, tmp_path, capsys):
    run = tiny_run(tmp_path, tiny_model_dir, data)
    row = ev.evaluate_run(run)[0]
    open(os.path.join(run, "eval.jsonl"), "w").write(json.dumps({**row, "avg": NAN}) + "\n")
    capsys.readouterr()
    again = ev.evaluate_run(run)
    assert [r["avg"] for r in again] == [row["avg"]]  # recovered: the same numbers
    counted_skip(capsys.readouterr().err, 1, "avg")


def started_run(tmp_path, train, model):
    cfg = selfdistill.Config(run="r", out_dir=str(tmp_path))
    runfolder.prepare_run_dir(cfg, train, model)  # the first start
    os.makedirs(tmp_path / "r" / "checkpoints" / "step_000001")  # something to resume
    return cfg


def test_a_changed_train_file_is_noticed_on_resume(tiny_model_dir, data, tmp_path, capsys):
    train = shutil.copy(data, tmp_path / "train.jsonl")
    cfg = started_run(tmp_path, train, tiny_model_dir)
    runfolder.prepare_run_dir(cfg, train, tiny_model_dir)  # unchanged: resumes
    with open(train, "a") as f:
        f.write('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(UserError, match="other contents of its train file .* use another --run"):
        runfolder.prepare_run_dir(cfg, train, tiny_model_dir)


def test_a_changed_base_is_noticed_on_resume(tiny_model_dir, data, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    cfg = started_run(tmp_path, data, str(model))
    (model / "config.json").write_text((model / "config.json").read_text().replace("1024", "1023"))
    with pytest.raises(UserError, match="other contents of its model folder"):
        runfolder.prepare_run_dir(cfg, data, str(model))


@pytest.mark.parametrize("damage", ["[1, 2]", "{not json"])
def test_a_damaged_inputs_json_is_one_line(damage, data, tiny_model_dir, tmp_path):
    cfg = started_run(tmp_path, data, tiny_model_dir)
    (tmp_path / "r" / "inputs.json").write_text(damage)
    with pytest.raises(UserError, match="inputs.json is damaged"):
        runfolder.prepare_run_dir(cfg, data, tiny_model_dir)


def adapter_naming(tmp_path, base):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    os.makedirs(checkpoint)
    (checkpoint / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    return str(checkpoint)


def test_an_adapter_on_a_base_with_other_weights_is_one_line(tiny_model_dir, tmp_path):
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    (other / "config.json").write_text((other / "config.json").read_text().replace("1024", "1000"))
    checkpoint = adapter_naming(tmp_path, other)
    with pytest.raises(UserError, match="holds other weights"):
        ev.check_adapter_base(checkpoint, tiny_model_dir, str(tmp_path / "run"))


def test_an_adapter_whose_base_moved_is_a_warning(tiny_model_dir, tmp_path, capsys):
    checkpoint = adapter_naming(tmp_path, tmp_path / "gone")
    run_dir = str(tmp_path / "run")
    ev.check_adapter_base(checkpoint, tiny_model_dir, run_dir)  # no inputs.json: cannot be checked
    assert "cannot be checked" in capsys.readouterr().err
    open(os.path.join(run_dir, "inputs.json"), "w").write(json.dumps({"model": runfolder.model_digest(tiny_model_dir)}))
    ev.check_adapter_base(checkpoint, tiny_model_dir, run_dir)  # the digest recorded at the start matches
    assert "moved" in capsys.readouterr().err
    open(os.path.join(run_dir, "inputs.json"), "w").write(json.dumps({"model": "0123456789abcdef"}))
    with pytest.raises(UserError, match="holds other weights"):
        ev.check_adapter_base(checkpoint, tiny_model_dir, run_dir)


def test_an_adapter_on_a_copy_of_its_base_is_silent(tiny_model_dir, tmp_path, capsys):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    ev.check_adapter_base(adapter_naming(tmp_path, tiny_model_dir), str(copy), str(tmp_path / "run"))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# 4. The secondary programs' inputs and flags


def omr(problem="What is 2+3?", solution="<step_1> 2+3=5 <answer> 5", answer="5"):
    return {"problem": problem, "generated_solution": solution, "expected_answer": answer}


BAD_RECORDS = {"problem a number": omr(problem=5), "problem a list": omr(problem=["2+3"]),
               "solution a list": omr(solution=["x"]), "answer a list": omr(answer=[5]),
               "answer an object": omr(answer={"v": 5}), "answer true": omr(answer=True),
               "answer a decimal": omr(answer=0.5), "answer only spaces": omr(answer="  "),
               "problem only spaces": omr(problem="   "), "not an object": [1, 2]}


@pytest.mark.parametrize("record", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_prepare_counts_records_with_fields_that_are_not_text(record, tmp_path, capsys):
    path = tmp_path / "omr.jsonl"
    path.write_text(json.dumps(omr()) + "\n" + json.dumps(record) + "\n" + json.dumps(omr(answer=7)) + "\n")
    records, skipped = prepare.read_openmath(str(path))
    assert len(records) == 2 and sum(skipped.values()) == 1 and records[1]["answer"] == "7"
    err = capsys.readouterr().err
    assert "1 records skipped" in err and "Traceback" not in err


def test_prepare_on_input_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "omr.jsonl"
    path.write_bytes(json.dumps(omr()).encode() + b"\n\xff\xfe\x00garbage\n")
    code, _, err = run_main([str(path)], capsys, prepare)
    one_line_error(code, err, "is not UTF-8")


def test_prepare_with_the_rule_critic_on_non_toy_data(tmp_path, capsys, monkeypatch):
    path = tmp_path / "omr.jsonl"
    path.write_text(json.dumps(omr()) + "\n")
    trip(monkeypatch, common, "load_model")  # refused before the model loads
    code, _, err = run_main([str(path), "toy", "critic=rule", "--out", str(tmp_path / "out")], capsys, prepare)
    one_line_error(code, err, "critic=rule critiques toy arithmetic chains only")


@pytest.mark.parametrize("size", ["-2", "-1"])
def test_prepare_test_size_below_zero(size, tmp_path, capsys):
    path = tmp_path / "omr.jsonl"
    path.write_text(json.dumps(omr()) + "\n")
    code, _, err = run_main([str(path), "--test-size", size], capsys, prepare)
    one_line_error(code, err, "--test-size must be at least 0")


def test_prepare_counts_problems_longer_than_the_context(tiny_model_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "omr.jsonl"
    toy = lambda a, b: omr(problem=f"{a}+{b}", solution=f"<step_1> {a}+{b}={a + b} <answer> {a + b}", answer=str(a + b))
    path.write_text("\n".join(json.dumps(r) for r in [toy(1, 2), omr(problem="1+" * 2000 + "1"), toy(3, 4)]) + "\n")
    seen = {}

    def all_right(model, tokenizer, cfg, device, records, n, *args):  # every problem too easy: nothing sampled
        seen["records"] = seen.get("records", 0) + len(records)
        return [(["x"] * n, [True] * n, [1] * n, [False] * n, r["answer"], ["x"] * n) for r in records]
    monkeypatch.setattr(prepare, "sample_answers", all_right)
    code, _, _ = run_main([str(path), tiny_model_dir, "prompts=instruct", "max_new_tokens=8", "critic=hf",
                           f"critic_model={tiny_model_dir}", "--out", str(tmp_path / "out")], capsys, prepare)
    counts = json.loads((tmp_path / "out" / "prepare.json").read_text())["counts"]
    assert code == 0 and counts["too_long"] == 1 and seen["records"] == 2 and counts["too_easy"] == 2


@pytest.fixture
def analysed_run(tiny_model_dir, data, tmp_path):
    run = tiny_run(tmp_path, tiny_model_dir, data)
    cfg = ev.load_run_config(run)
    model, tokenizer = common.load_model(cfg, tiny_model_dir, torch.device("cpu"))
    model.save_pretrained(os.path.join(run, "checkpoints", "step_000002"))
    return run, os.path.join(run, "checkpoints", "step_000002", "adapter_model.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage"])
def test_analyze_on_a_damaged_checkpoint_names_it(damage, analysed_run, capsys, monkeypatch):
    run, weights = analysed_run
    if damage == "missing":
        os.remove(weights)
    else:
        blob = open(weights, "rb").read()
        open(weights, "wb").write(blob[:len(blob) // 2] if damage == "truncated" else b"\x00garbage" * 50)
    trip(monkeypatch, analyze, "wrong_rollouts")  # refused before any sampling
    code, _, err = run_main([run, "--step", "2"], capsys, analyze)
    one_line_error(code, err, "step_000002 is damaged")


@pytest.mark.parametrize("rollouts", ["0", "-1"])
def test_analyze_rollouts_below_one(rollouts, capsys, monkeypatch):
    trip(monkeypatch, analyze, "target_config")
    code, _, err = run_main(["toy", "--rollouts", rollouts], capsys, analyze)
    one_line_error(code, err, "--rollouts must be at least 1")


@pytest.mark.parametrize("flags", [["--temperature", "inf"], ["--temperature", "nan"], ["--temperature", "1e-300"],
                                   ["--temperature", "1e-4"], ["--temperature", "-1"], ["--samples", "-3"]],
                         ids=lambda f: " ".join(f))
def test_eval_flags_refused_before_anything_loads(flags, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, ev, "evaluate_run")
    code, _, err = run_main([str(tmp_path), *flags], capsys, ev)
    one_line_error(code, err, "must be")


def test_eval_k_beyond_the_runs_eval_samples(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    run = tiny_run(tmp_path, tiny_model_dir, data)  # eval_samples=2
    code, _, err = run_main([run, "--k", "3"], capsys, ev)
    one_line_error(code, err, "k = 3 must lie in 1..samples (2)")


def test_a_config_temperature_below_the_floor_is_never_written(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    run = tiny_run(tmp_path, tiny_model_dir, data)
    config = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    yaml.safe_dump({**config, "temperature": 1e-300}, open(os.path.join(run, "config.yaml"), "w"))
    code, _, err = run_main([run], capsys, ev)
    one_line_error(code, err, "'temperature' must be at least 0.001")  # the config check, as training
    assert not os.path.exists(os.path.join(run, "eval.jsonl"))


# ---------------------------------------------------------------------------------------------
# 5. Interrupts


@pytest.mark.parametrize("program, argv, where", [
    (compare, ["runs/x"], (compare, "compare_runs")),
    (analyze, ["toy"], (analyze, "analyze")),
    (prepare, ["omr.jsonl"], (prepare, "prepare")),
], ids=["compare", "analyze", "prepare"])
def test_ctrl_c_in_the_secondary_programs_is_one_line(program, argv, where, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(*where, interrupted)
    code, _, err = run_main(argv, capsys, program)
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_dead_peer_under_torchrun_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:
        with common.user_errors():
            raise RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                               "peer [127.0.0.1]:50317. This is typically caused by a remote worker crashing.")
    err = capsys.readouterr().err
    one_line_error(stop.value.code, err, "another process of this torchrun group stopped (Connection closed by peer")


def test_other_runtime_errors_still_raise(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="a bug"):
        with common.user_errors():
            raise RuntimeError("a bug")
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, no peer can have died
    assert not ranks.peer_failure(RuntimeError("Connection closed by peer"))
