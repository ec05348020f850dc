"""prepare.py on OpenMathReasoning JSONL a user can get wrong: a missing input, records without the
OpenMathReasoning fields, input that is not UTF-8, the rule critic on non-toy data and --test-size
below 0 are one `error: ...` line with exit code 2; records whose fields are not text (a number,
list, bool, decimal, only spaces, no object) and problems longer than the context are counted
skips. (Shard folders read through `datasets`, and the argument mistakes on them, are in
test_prepare.py.)"""
import json

import pytest

import prepare
from plumbing import common
from conftest import error_line, one_line_error, run_main, trip


@pytest.mark.bad_input
def test_prepare_on_a_missing_input(tmp_path, capsys):
    line = error_line([str(tmp_path / "omr.jsonl")], capsys, script=prepare)
    assert line == f"error: input file {tmp_path / 'omr.jsonl'} not found"


@pytest.mark.bad_input
def test_prepare_on_records_without_the_openmath_fields(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    line = error_line([data, tiny_model_dir, f"train_file={data}", f"test_file={data}",
                           "--out", str(tmp_path / "out")], capsys, script=prepare)
    assert "expected_answer" in line


def omr(problem="What is 2+3?", solution="<step_1> 2+3=5 <answer> 5", answer="5"):
    return {"problem": problem, "generated_solution": solution, "expected_answer": answer}


BAD_RECORDS = {"problem a number": omr(problem=5), "problem a list": omr(problem=["2+3"]),
               "solution a list": omr(solution=["x"]), "answer a list": omr(answer=[5]),
               "answer an object": omr(answer={"v": 5}), "answer true": omr(answer=True),
               "answer a decimal": omr(answer=0.5), "answer only spaces": omr(answer="  "),
               "problem only spaces": omr(problem="   "), "not an object": [1, 2]}


@pytest.mark.bad_input
@pytest.mark.parametrize("record", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_prepare_counts_records_with_fields_that_are_not_text(record, tmp_path, capsys):
    path = tmp_path / "omr.jsonl"
    path.write_text(json.dumps(omr()) + "\n" + json.dumps(record) + "\n" + json.dumps(omr(answer=7)) + "\n")
    records, skipped = prepare.read_openmath(str(path))
    assert len(records) == 2 and sum(skipped.values()) == 1 and records[1]["answer"] == "7"
    err = capsys.readouterr().err
    assert "1 records skipped" in err and "Traceback" not in err


@pytest.mark.bad_input
def test_prepare_on_input_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "omr.jsonl"
    path.write_bytes(json.dumps(omr()).encode() + b"\n\xff\xfe\x00garbage\n")
    code, _, err = run_main([str(path)], capsys, prepare)
    one_line_error(code, err, "is not UTF-8")


@pytest.mark.bad_input
def test_prepare_with_the_rule_critic_on_non_toy_data(tmp_path, capsys, monkeypatch):
    path = tmp_path / "omr.jsonl"
    path.write_text(json.dumps(omr()) + "\n")
    trip(monkeypatch, common, "load_model")  # refused before the model loads
    code, _, err = run_main([str(path), "toy", "critic=rule", "--out", str(tmp_path / "out")], capsys, prepare)
    one_line_error(code, err, "critic=rule critiques toy arithmetic chains only")


@pytest.mark.bad_input
@pytest.mark.parametrize("size", ["-2", "-1"])
def test_prepare_test_size_below_zero(size, tmp_path, capsys):
    path = tmp_path / "omr.jsonl"
    path.write_text(json.dumps(omr()) + "\n")
    code, _, err = run_main([str(path), "--test-size", size], capsys, prepare)
    one_line_error(code, err, "--test-size must be at least 0")


@pytest.mark.bad_input
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
