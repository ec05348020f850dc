"""eval.py's inputs: what it is pointed at, its flags, the run's config, the base an adapter needs,
and test questions past the model's context.

Protects: a run with no checkpoints evaluates step 0 and says so; a folder that is no run (or a
checkpoint folder) and a run config.yaml with an unknown key or a temperature below the floor are one
`error:` line; --k beyond --samples or the run's eval_samples, and --samples, --k, --temperature,
--questions out of range, are refused before anything loads; a finished run with a setting its arm
ignored is still read; a base step's row is reused only for the same weights and test file (the
base_key follows the weights, not the path); an adapter on a base with other weights (or a base
replaced in place) is one line in eval.py and analyze.py, a moved base a warning, a copy silent; a
test question past the context is counted and skipped, a test set that never fits is one line.

The run makers here (make_run, tiny_run, made_run) are shared with other files' tests."""
import contextlib
import json
import os
import shutil

import pytest
import torch
import yaml

import analyze
import compare
import eval as ev
import selfdistill
from plumbing import common
from plumbing import runfolder
from plumbing.common import UserError
from conftest import error_line, make_char_tokenizer, make_tiny_model, one_line_error, put, run_main, trip


# ---------------------------------------------------------------------------------------------
# Run makers: a run's folder as training writes it, without training


def make_run(root, model_dir, data, name="run", **config):
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    # a resolved config, as training writes it (G and the other derived values filled in)
    cfg = {**vars(selfdistill.resolve(selfdistill.Config(
        model=model_dir, train_file=data, test_file=data, prompts="instruct", run=name, out_dir=str(root),
        eval_samples=2, max_new_tokens=4))), **config}
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    return run_dir


def tiny_run(root, model_dir, test_file, name="run"):
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    cfg = vars(selfdistill.resolve(selfdistill.Config(
        model=model_dir, train_file=test_file, test_file=test_file, prompts="instruct", run=name,
        out_dir=str(root), eval_samples=2, eval_questions=2, max_new_tokens=4, threads=1)))
    yaml.safe_dump(cfg, open(os.path.join(run_dir, "config.yaml"), "w"))
    return run_dir


def made_run(tmp_path, model_dir, data, name="r", checkpoint=False, **extra):
    values = dict(model=model_dir, train_file=data, test_file=data, prompts="instruct", run=name,
                  out_dir=str(tmp_path / "runs"), eval_samples=1, eval_questions=2, max_new_tokens=4, threads=1)
    cfg = selfdistill.resolve(selfdistill.Config(**{**values, **extra}))
    run_dir = runfolder.prepare_run_dir(cfg, data or None, model_dir)
    if checkpoint:
        step = os.path.join(run_dir, "checkpoints", "step_000001")
        os.makedirs(step)
        put(os.path.join(step, "adapter_config.json"), json.dumps({"base_model_name_or_path": os.path.abspath(model_dir)}))
    return run_dir


# ---------------------------------------------------------------------------------------------
# What eval.py is pointed at, and its flags


def fake_evaluation(monkeypatch):
    """Evaluate without a model: every sample answers '2' (right for 1+1 only)."""
    monkeypatch.setattr(common, "load_model", lambda cfg, path, device: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(ev, "student_at", lambda model, checkpoint: contextlib.nullcontext())  # no adapter

    def sample_answers(model, tokenizer, cfg, device, records, n, temperature, desc):
        return [(["2"] * n, [r["answer"] == "2"] * n, [3] * n, [False] * n, r["answer"], ["<answer> 2"] * n)
                for r in records]
    monkeypatch.setattr(ev, "sample_answers", sample_answers)


@pytest.mark.bad_input
def test_eval_on_a_run_without_checkpoints_says_so(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    fake_evaluation(monkeypatch)
    code, out, err = run_main([make_run(tmp_path, tiny_model_dir, data)], capsys, script=ev)
    assert code in (0, 2) and "Traceback" not in err
    assert "no checkpoint" in (out + err).lower()


@pytest.mark.bad_input
def test_eval_on_folders_that_are_not_runs(tiny_model_dir, data, tmp_path, capsys):
    line = error_line([str(tmp_path)], capsys, script=compare)
    assert line == f"error: {tmp_path} has no checkpoints and no config.yaml: not a selfdistill run folder"
    checkpoint = os.path.join(make_run(tmp_path, tiny_model_dir, data), "checkpoints", "step_000010")
    os.makedirs(checkpoint)
    line = error_line([checkpoint], capsys, script=ev)
    assert line.startswith(f"error: {checkpoint} has") and "not a selfdistill run folder" in line


@pytest.mark.bad_input
def test_run_config_with_an_unknown_key(tiny_model_dir, data, tmp_path, capsys):
    run_dir = make_run(tmp_path, tiny_model_dir, data, future_option=1)
    line = error_line([run_dir], capsys, script=ev)
    assert line.startswith(f"error: {run_dir}/config.yaml: unknown config key 'future_option'")


@pytest.mark.bad_input
def test_a_config_temperature_below_the_floor_is_never_written(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    run = tiny_run(tmp_path, tiny_model_dir, data)
    config = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    yaml.safe_dump({**config, "temperature": 1e-300}, open(os.path.join(run, "config.yaml"), "w"))
    code, _, err = run_main([run], capsys, ev)
    one_line_error(code, err, "'temperature' must be at least 0.001")  # the config check, as training
    assert not os.path.exists(os.path.join(run, "eval.jsonl"))


@pytest.mark.bad_input
def test_a_finished_run_with_a_setting_its_arm_ignored_is_still_read(tmp_path, capsys):
    """Runs made before the rule (grpo_norm on a critique arm did nothing) stay readable."""
    run_dir = str(tmp_path / "r")
    os.makedirs(run_dir)
    cfg = vars(selfdistill.resolve(selfdistill.Config(run="r", arm="critique", grpo_norm="constant")))
    put(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg))
    assert ev.load_run_config(run_dir).grpo_norm == "constant"


@pytest.mark.bad_input
def test_eval_k_larger_than_samples(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    run_dir = make_run(tmp_path, tiny_model_dir, data)
    line = error_line([run_dir, "--samples", "4", "--k", "8"], capsys, script=ev)
    assert line == "error: k = 8 must lie in 1..samples (4)"


@pytest.mark.bad_input
def test_eval_k_beyond_the_runs_eval_samples(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    run = tiny_run(tmp_path, tiny_model_dir, data)  # eval_samples=2
    code, _, err = run_main([run, "--k", "3"], capsys, ev)
    one_line_error(code, err, "k = 3 must lie in 1..samples (2)")


@pytest.mark.bad_input
@pytest.mark.parametrize("flags", [["--samples", "0"], ["--k", "0"], ["--temperature", "0"],
                                   ["--questions", "-1"]], ids=lambda f: " ".join(f))
def test_eval_flags_out_of_range(flags, tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    line = error_line([make_run(tmp_path, tiny_model_dir, data), *flags], capsys, script=ev)
    assert flags[0].lstrip("-") in line


@pytest.mark.bad_input
@pytest.mark.parametrize("flags", [["--temperature", "inf"], ["--temperature", "nan"], ["--temperature", "1e-300"],
                                   ["--temperature", "1e-4"], ["--temperature", "-1"], ["--samples", "-3"]],
                         ids=lambda f: " ".join(f))
def test_eval_flags_refused_before_anything_loads(flags, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, ev, "evaluate_run")
    code, _, err = run_main([str(tmp_path), *flags], capsys, ev)
    one_line_error(code, err, "must be")


# ---------------------------------------------------------------------------------------------
# Reuse follows contents, not paths


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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


# ---------------------------------------------------------------------------------------------
# The adapter's base is compared by contents in every program that loads a checkpoint


def adapter_naming(tmp_path, base):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    os.makedirs(checkpoint)
    (checkpoint / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    return str(checkpoint)


@pytest.mark.bad_input
def test_an_adapter_on_a_base_with_other_weights_is_one_line(tiny_model_dir, tmp_path):
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    (other / "config.json").write_text((other / "config.json").read_text().replace("1024", "1000"))
    checkpoint = adapter_naming(tmp_path, other)
    with pytest.raises(UserError, match="holds other weights"):
        ev.check_adapter_base(checkpoint, tiny_model_dir, str(tmp_path / "run"))


@pytest.mark.bad_input
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


@pytest.fixture
def base_copy(tiny_model_dir, tmp_path):
    path = str(tmp_path / "base")
    shutil.copytree(tiny_model_dir, path)
    return path


def replace_weights(path):
    make_tiny_model(make_char_tokenizer(), seed=7).save_pretrained(path)


def edit_model_config(path):
    config = json.load(open(os.path.join(path, "config.json")))
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    put(os.path.join(path, "config.json"), json.dumps(config))


@pytest.mark.bad_input
@pytest.mark.parametrize("change", [replace_weights, edit_model_config], ids=["weights", "config"])
def test_eval_refuses_a_base_replaced_in_place(change, base_copy, data, tmp_path, capsys):
    run_dir = made_run(tmp_path, base_copy, data, checkpoint=True)
    change(base_copy)
    code, _, err = run_main([run_dir], capsys, script=ev)
    one_line_error(code, err, "whose files have changed since the run started")


@pytest.mark.bad_input
@pytest.mark.parametrize("change", [replace_weights, edit_model_config], ids=["weights", "config"])
def test_analyze_refuses_a_base_replaced_in_place(change, base_copy, data, tmp_path, capsys):
    run_dir = made_run(tmp_path, base_copy, data, checkpoint=True)
    change(base_copy)
    code, _, err = run_main([run_dir, "--step", "1"], capsys, script=analyze)
    one_line_error(code, err, "whose files have changed since the run started")


def test_an_unchanged_base_under_its_own_path_passes(base_copy, data, tmp_path):
    run_dir = made_run(tmp_path, base_copy, data, checkpoint=True)
    ev.check_adapter_base(os.path.join(run_dir, "checkpoints", "step_000001"), base_copy, run_dir)


# ---------------------------------------------------------------------------------------------
# Test questions past the model's context


@pytest.mark.bad_input
def test_a_test_question_past_the_context_is_counted_and_skipped(tiny_model_dir, tmp_path, capsys):
    path = str(tmp_path / "test.jsonl")
    put(path, "".join(json.dumps({"id": f"q{i}", "question": q, "answer": "2"}) + "\n"
                      for i, q in enumerate(["1+1", "9" * 2000, "2+0", "8" * 1500])))
    run_dir = made_run(tmp_path, tiny_model_dir, path, eval_questions=0)
    code, out, err = run_main([run_dir], capsys, script=ev)
    assert code in (0, None) and "Traceback" not in err, err
    assert "2 of 4 questions (first: id q1) do not fit the model's context of 1024 tokens" in err
    [row] = runfolder.read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    assert row["questions"] == 2


@pytest.mark.bad_input
def test_a_test_set_that_never_fits_is_one_line(tiny_model_dir, tmp_path, capsys):
    path = str(tmp_path / "test.jsonl")
    put(path, json.dumps({"question": "7" * 3000, "answer": "7"}) + "\n")
    run_dir = made_run(tmp_path, tiny_model_dir, path)
    code, _, err = run_main([run_dir], capsys, script=ev)
    one_line_error(code, err, "fits the model's context of 1024 tokens")
