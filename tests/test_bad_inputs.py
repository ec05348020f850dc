"""Protects the user-error contract of the three scripts and the configs: every mistake below ends
in one line on stderr, `error: ...`, exit code 2, no traceback, and says what to change; or it is
a counted skip (a critique that failed is counted in `train/critique_invalid` and the run goes on).
Never a traceback, never a silent default. It extends test_config.py, test_train.py,
test_critic.py and test_eval.py without repeating their cases.

Most checks run in-process (`selfdistill.main([...])` / `eval.main([...])` with capsys); one runs
`selfdistill.py` as a subprocess to see the real stderr and exit code. Where a mistake must be
caught before a model loads, `common.load_model` (or `sampler.generate`, before training starts)
is replaced by a tripwire.

| mistake | how it is handled |
|---|---|
| `--config` names a directory | exit 2: config file DIR not found (subprocess) |
| the YAML file given without `--config` | exit 2: expected key=value, got 'FILE' |
| a YAML key with no value (`lr:`) | exit 2: config key 'lr' wants a number, got None |
| Hydra-style nested YAML section (`optim: {lr: 1}`) | exit 2: unknown config key 'optim' |
| the same key twice in one YAML file | exit 2: config key 'K' is given twice (line N) |
| `critic=hf` without `critic_model` | exit 2: critic=hf needs critic_model |
| `lr=-1`, `weight_decay=-0.1` | exit 2: must be positive / at least 0 |
| `grad_clip=-1` (meaning "off") | exit 2: must be at least 0 (0 = off) |
| `checkpoint_every=0` (meaning "only at the end") | exit 2: must be at least 1 |
| `max_steps=-1` | exit 2: must be at least 0 (0 = off) |
| `epochs=0` | exit 2: epochs must be positive (or set max_steps) |
| `lora_dropout=1.5` | exit 2: lora_dropout must lie in [0, 1) |
| `top_p=0`, `top_p=1.5` | exit 2: top_p must lie in (0, 1] |
| `top_k=-1` | exit 2: must be at least 0 (0 = off) |
| `support=topk topk=0` | exit 2: topk must be at least 1 with support=topk |
| `support=topk` with topk ≥ the vocabulary | exit 2: that is support=full; set support=full or a smaller topk |
| `toy_order` / `toy_phrasing` with a non-toy model | exit 2: they apply to model=toy only |
| `device=cuda` without CUDA | exit 2: no CUDA device is available; use device=cpu |
| `device=gpu` | exit 2: device must be auto, cpu, mps, cuda or cuda:N |
| train_file is a directory | exit 2: dataset file DIR not found |
| train_file is a binary file (a parquet given as JSONL) | exit 2: FILE is not UTF-8 text |
| a JSON array on one line instead of JSONL | exit 2: FILE:1: each line needs a non-empty 'question' and 'answer' |
| a UTF-8 BOM (a file saved by Notepad) | exit 2: FILE:1: not valid JSON (Unexpected UTF-8 BOM ...); reading it would be fine too |
| a gold answer that is empty once normalised (`$ $`, `\boxed{}`) | exit 2: FILE:N: answer is empty once LaTeX and spaces are stripped |
| test_file missing while eval_at_end is on | exit 2 before training: dataset file not found |
| `model=~/...` written in YAML (no shell to expand `~`) | exit 2: cannot load a tokenizer from '~/...' |
| a model folder with a tokenizer but no weights | exit 2: cannot load a causal LM from 'DIR' |
| lora_targets that match no module, or none at all | exit 2: lora_targets=... do not match the model's modules |
| one typo among several lora_targets (`q_prj,v_proj`) | exit 2: lora_targets: q_prj match no module |
| an HF critic folder that does not exist | exit 2: cannot load the critic 'DIR': ... |
| an HF critic without a chat template | exit 2: cannot load the critic 'DIR': ... has no chat template |
| the critic server refuses the key at start (401 / 403) | exit 2: critic at URL refused the API key in $VAR (HTTP 401) |
| the critic server does not serve critic_model | exit 2: critic at URL does not serve 'M' |
| the critic times out / answers HTTP 400 / text without step tags / not JSON | counted skip: train/critique_invalid, the run goes on |
| the critic refuses the key in mid-run (401 on requests) | exit 2: critic at URL refused the API key (resume later from the last checkpoint) |
| resuming a run with a changed setting | exit 2: run 'R' exists with KEY=OLD (now NEW) |
| a start that failed before any checkpoint, rerun fixed | accepted: a run with no checkpoint has nothing to resume |
| `eval.py` on a run with no checkpoints | evaluates step 0 and says: RUN has no checkpoints yet |
| `compare.py` on a folder that is not a run | exit 2: DIR has no checkpoints and no config.yaml |
| `eval.py` on a checkpoint folder instead of its run | exit 2: DIR ... not a selfdistill run folder |
| `eval.py --k` larger than `--samples` | exit 2: k = K must lie in 1..samples (N) |
| `eval.py --samples 0`, `--k 0`, `--temperature 0`, `--questions -1` | exit 2: --FLAG must be at least 1 / positive |
| `compare.py` given the same run twice (overlapping globs) | exit 2: RUN is given twice |
| `analyze.py` on a path that is neither run nor model | exit 2: PATH is neither a run folder nor a model folder |
| `prepare.py` on a missing input | exit 2: input file PATH not found |
| `prepare.py` on records without the OpenMathReasoning fields | exit 2: none of the records has problem, generated_solution and expected_answer |
| a run's config.yaml with a key this version does not know | exit 2: .../config.yaml: unknown config key 'K' |
"""
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import analyze
from plumbing import common
import compare
import critic
import eval as ev
import prepare
from plumbing import sampler
import selfdistill
from plumbing.common import UserError
from conftest import Tripwire, one_line_error, run_main, run_settings, trip
from selfdistill import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Helpers


settings = functools.partial(run_settings, max_new_tokens=6, max_steps=1)


def error_line(argv, capsys, script=selfdistill):
    """Run the program on argv: the mistake ends as conftest.one_line_error says, and its `error: ...`
    line is the last thing on stderr (a progress bar may come before it once training has started);
    returns the line."""
    code, out, err = run_main(argv, capsys, script)
    one_line_error(code, err)
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert err.rstrip("\n").endswith(line), err[-2000:]
    return line


def config_error(argv):
    with pytest.raises(UserError) as e:
        load_config(argv)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# Config files and the command line


def test_config_pointing_at_a_directory_is_one_line_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "selfdistill.py", "--config", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"error: config file {tmp_path} not found\n"


@pytest.mark.parametrize("yaml_text, argv_extra, fragment", [
    (None, ["configs/smoke.yaml"], "expected key=value, got 'configs/smoke.yaml'"),  # forgot --config
    ("lr:\n", [], "config key 'lr' wants a number, got None"),
    ("optim:\n  lr: 0.001\n", [], "unknown config key 'optim'"),  # Hydra-style sections
    (None, ["critic=hf"], "critic=hf needs critic_model"),
], ids=["yaml-without---config", "key-without-value", "nested-section", "hf-critic-without-model"])
def test_config_mistakes_are_one_line(yaml_text, argv_extra, fragment, tmp_path):
    argv = list(argv_extra)
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = ["--config", str(tmp_path / "c.yaml")] + argv
    assert fragment in config_error(argv)


def test_a_key_given_twice_in_yaml_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.001\nbatch_size: 8\nlr: 0.01\n")
    assert "'lr'" in config_error(["--config", str(tmp_path / "c.yaml")])


@pytest.mark.parametrize("argv, key", [
    (["lr=-1"], "lr"),                              # AdamW: ValueError traceback at start
    (["weight_decay=-0.1"], "weight_decay"),        # AdamW: ValueError traceback at start
    (["grad_clip=-1"], "grad_clip"),                # clip_grad_norm_(max_norm=-1) negates the gradient
    (["checkpoint_every=0"], "checkpoint_every"),   # ZeroDivisionError after the first step
    (["max_steps=-1"], "max_steps"),                # range(0, -1): no step, exit 0
    (["epochs=0"], "epochs"),                       # max(1, ...): one step anyway
    (["lora_dropout=1.5"], "lora_dropout"),         # exit 2, but blamed on lora_targets
    (["top_p=0"], "top_p"),                         # greedy sampling, silently
    (["top_p=1.5"], "top_p"),                       # no nucleus, silently
    (["top_k=-1"], "top_k"),                        # ValueError traceback at the first generate
    (["support=topk", "topk=0"], "topk"),           # empty support: loss 0, nothing trains
    (["model=/some/chat/model", "toy_order=chain"], "toy_order"),  # toy-only knob, ignored
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_out_of_range_settings_are_one_line_errors(argv, key):
    assert key in config_error(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tiny_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path, device="cuda")],
                          capsys)
    assert line == "error: device=cuda but no CUDA device is available; use device=cpu"


def test_unknown_device_name(tiny_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path, device="gpu")],
                          capsys)
    assert "device" in line and "cpu" in line


def test_topk_not_smaller_than_the_vocabulary(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    # The tiny model's vocabulary has 102 tokens. Proposed: an error once V is known (after the
    # model loads), because topk >= V is exactly support=full and almost always a slip (an extra
    # zero, or topk meant as top_k). token_divergence itself keeps clamping (a pure function).
    trip(monkeypatch, sampler, "generate")  # the error must come before training starts
    line = error_line(["--context", "reference", *settings(tiny_model_dir, data, tmp_path,
                                                               support="topk", topk=100000)], capsys)
    assert "topk" in line and "102" in line and "support=full" in line


# ---------------------------------------------------------------------------------------------
# Data files


@pytest.mark.parametrize("content, fragment", [
    (None, "not found"),                                                      # a directory
    ('[{"question": "1+1", "answer": 2}]\n', ":1: each line needs"),          # a JSON array
], ids=["directory", "json-array"])
def test_dataset_mistakes_are_one_line_errors(content, fragment, tmp_path):
    path = tmp_path / "d.jsonl"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        common.load_jsonl(str(path))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_byte_order_mark_is_read_or_named(tmp_path):
    """A file saved with a BOM (Windows editors): today one line naming line 1; reading it with
    utf-8-sig would be fine too. Never a traceback, never a silently dropped first record."""
    path = tmp_path / "d.jsonl"
    path.write_text('\ufeff{"question": "1+1", "answer": 2}\n{"question": "2+2", "answer": 4}\n',
                    encoding="utf-8")
    try:
        records = common.load_jsonl(str(path))
    except UserError as e:
        assert ":1: not valid JSON" in str(e) and "\n" not in str(e)
    else:
        assert [r["question"] for r in records] == ["1+1", "2+2"]


def test_a_binary_dataset_file_is_one_line(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1\x15\x04\x15\xa0\x01\xff\xfe\x00\x00 binary")
    with pytest.raises(UserError, match="train.parquet"):
        common.load_jsonl(str(path))


@pytest.mark.parametrize("answer", ["$ $", "\\boxed{}"])
def test_an_answer_that_cannot_be_matched_is_an_error(answer, tiny_model_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n"
                    + json.dumps({"question": "2+2", "answer": answer}) + "\n")
    with pytest.raises(UserError, match=":2: answer .* is empty once LaTeX and spaces are stripped"):
        common.load_jsonl(str(path), normalize=critic.normalize_answer)
    common.load_jsonl(str(path))  # without the normaliser the file is read: training passes it
    trip(monkeypatch, common, "load_model")
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, str(path), tmp_path)], capsys)
    assert f"{path}:2: answer" in line and "is empty once LaTeX and spaces are stripped" in line


def test_a_missing_test_file_is_found_before_training(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    trip(monkeypatch, common, "load_model")
    missing = tmp_path / "tset.jsonl"
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path, eval_at_end=True,
                                                          test_file=missing)], capsys)
    assert str(missing) in line and "not found" in line


# ---------------------------------------------------------------------------------------------
# Models and LoRA


def test_tilde_model_path_in_yaml_is_one_line(data, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(f"model: ~/models/chat\ntrain_file: {data}\ntest_file: {data}\n")
    line = error_line(["--context", "grpo", "--config", str(tmp_path / "c.yaml"),
                           f"out_dir={tmp_path}"], capsys)
    assert line.startswith("error: cannot load a tokenizer from '~/models/chat'")


def test_model_folder_without_weights_is_one_line(tiny_model_dir, data, tmp_path, capsys):
    folder = tmp_path / "tokenizer_only"
    folder.mkdir()
    for name in os.listdir(tiny_model_dir):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(tiny_model_dir, name), folder)
    line = error_line(["--context", "grpo", *settings(str(folder), data, tmp_path)], capsys)
    assert line.startswith(f"error: cannot load a causal LM from '{folder}'")


@pytest.mark.parametrize("targets", ["qproj,vproj", ","], ids=["no-name-matches", "no-name-at-all"])
def test_lora_targets_that_match_nothing(targets, tiny_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path,
                                                          lora_targets=targets)], capsys)
    assert line.startswith("error: lora_targets") and all(t in line for t in targets.split(",") if t)


def test_a_lora_target_with_a_typo_among_valid_ones(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    trip(monkeypatch, sampler, "generate")  # the error must come before training starts
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path,
                                                          lora_targets="q_prj,v_proj")], capsys)
    assert "q_prj" in line


# ---------------------------------------------------------------------------------------------
# Critics


def test_hf_critic_folder_that_does_not_exist(tiny_model_dir, data, tmp_path, capsys):
    missing = tmp_path / "no_such_critic"
    line = error_line(["--context", "critique", *settings(tiny_model_dir, data, tmp_path, critic="hf",
                                                              critic_model=missing)], capsys)
    assert line.startswith(f"error: cannot load the critic '{missing}'")


def test_hf_critic_without_chat_template(tiny_model_dir, no_template_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "critique", *settings(tiny_model_dir, data, tmp_path, critic="hf",
                                                              critic_model=no_template_model_dir)], capsys)
    assert "has no chat template" in line


def http_settings(server, model_dir, data, out_dir, **extra):
    values = dict(critic="http", critic_url=server.url, critic_model="critic-model",
                  critic_api_key_env="CRITIC_KEY_FOR_TESTS", critic_timeout=0.5, critic_retries=0)
    return settings(model_dir, data, out_dir, **{**values, **extra})


@pytest.mark.parametrize("code", ["401", "403"])
def test_critic_refusing_the_key_at_start(code, critic_server, tiny_model_dir, data, tmp_path, capsys):
    critic_server.models = code
    line = error_line(["--context", "critique", *http_settings(critic_server, tiny_model_dir, data,
                                                                   tmp_path)], capsys)
    assert line == (f"error: critic at {critic_server.url} refused the API key in $CRITIC_KEY_FOR_TESTS "
                    f"(HTTP {code})")


def test_critic_that_does_not_serve_the_model(critic_server, tiny_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "critique", *http_settings(
        critic_server, tiny_model_dir, data, tmp_path, critic_model="Qwen/QwQ-32B")], capsys)
    assert line == f"error: critic at {critic_server.url} does not serve 'Qwen/QwQ-32B' (it serves critic-model)"


@pytest.mark.parametrize("replies, logged", [
    ("slow", True), ("400", True), ("not_json", True), ("no_step_tags", False)])
def test_failed_critiques_are_counted_and_the_run_goes_on(replies, logged, critic_server, tiny_model_dir,
                                                         data, tmp_path, capsys, caplog):
    critic_server.replies = replies
    code, out, err = run_main(["--context", "critique", "--run", "c", *http_settings(
        critic_server, tiny_model_dir, data, tmp_path, max_steps=2)], capsys)
    assert code == 0 and "Traceback" not in err, err[-2000:]
    run_dir = tmp_path / "c"
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/critique_invalid"] for m in metrics] == [4, 4]  # every sample of both steps
    assert [m["train/zero_signal"] for m in metrics] == [1.0, 1.0]
    assert "invalid 4" in out
    samples = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and not any(s["valid"] for s in samples)
    assert (run_dir / "checkpoints" / "step_000002").is_dir()
    failures = [r for r in caplog.records if "critic request failed" in r.getMessage()]
    assert len(failures) == (8 if logged else 0)


def test_critic_refusing_the_key_in_mid_run_stops(critic_server, tiny_model_dir, data, tmp_path, capsys):
    critic_server.models = "404"  # no /models listing: the start-up check cannot see the refusal
    critic_server.replies = "401"
    line = error_line(["--context", "critique", "--run", "c", *http_settings(
        critic_server, tiny_model_dir, data, tmp_path, max_steps=2)], capsys)
    assert "refused the API key in $CRITIC_KEY_FOR_TESTS (HTTP 401)" in line


# ---------------------------------------------------------------------------------------------
# Run folders: resuming


def test_resuming_with_a_changed_setting_is_refused(data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    argv = ["--context", "reference", "--run", "r", f"train_file={data}", f"test_file={data}",
            f"out_dir={tmp_path}", "model=some/model"]
    with pytest.raises(Tripwire):  # the first start gets as far as loading the model
        selfdistill.main(argv + ["lr=0.001"])
    os.makedirs(tmp_path / "r" / "checkpoints" / "step_000010")  # ... and trained to a checkpoint
    line = error_line(argv + ["lr=0.01"], capsys)
    assert line == ("error: run 'r' exists with lr=0.001 (now 0.01); resume with the same settings or "
                    "choose another --run")
    with pytest.raises(Tripwire):  # eval_at_end may change between a run and its resume
        selfdistill.main(argv + ["lr=0.001", "eval_at_end=false"])


def test_a_failed_start_can_be_rerun_with_corrected_settings(tiny_model_dir, data, tmp_path, capsys,
                                                             monkeypatch):
    argv = ["--context", "critique", "--run", "r", *settings(tiny_model_dir, data, tmp_path)]
    error_line(argv + ["critic=hf", f"critic_model={tmp_path / 'typo'}"], capsys)
    trip(monkeypatch, common, "load_model")
    with pytest.raises(Tripwire):  # no checkpoint exists: nothing to resume, so nothing to refuse
        selfdistill.main(argv + ["critic=rule"])


# ---------------------------------------------------------------------------------------------
# eval.py


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


def fake_evaluation(monkeypatch):
    """Evaluate without a model: every sample answers '2' (right for 1+1 only)."""
    monkeypatch.setattr(common, "load_model", lambda cfg, path, device: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(ev, "student_at", lambda model, checkpoint: contextlib.nullcontext())  # no adapter

    def sample_answers(model, tokenizer, cfg, device, records, n, temperature, desc):
        return [(["2"] * n, [r["answer"] == "2"] * n, [3] * n, [False] * n, r["answer"], ["<answer> 2"] * n)
                for r in records]
    monkeypatch.setattr(ev, "sample_answers", sample_answers)


def test_eval_on_a_run_without_checkpoints_says_so(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    fake_evaluation(monkeypatch)
    code, out, err = run_main([make_run(tmp_path, tiny_model_dir, data)], capsys, script=ev)
    assert code in (0, 2) and "Traceback" not in err
    assert "no checkpoint" in (out + err).lower()


def test_eval_on_folders_that_are_not_runs(tiny_model_dir, data, tmp_path, capsys):
    line = error_line([str(tmp_path)], capsys, script=compare)
    assert line == f"error: {tmp_path} has no checkpoints and no config.yaml: not a selfdistill run folder"
    checkpoint = os.path.join(make_run(tmp_path, tiny_model_dir, data), "checkpoints", "step_000010")
    os.makedirs(checkpoint)
    line = error_line([checkpoint], capsys, script=ev)
    assert line.startswith(f"error: {checkpoint} has") and "not a selfdistill run folder" in line


def test_eval_k_larger_than_samples(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    run_dir = make_run(tmp_path, tiny_model_dir, data)
    line = error_line([run_dir, "--samples", "4", "--k", "8"], capsys, script=ev)
    assert line == "error: k = 8 must lie in 1..samples (4)"


@pytest.mark.parametrize("flags", [["--samples", "0"], ["--k", "0"], ["--temperature", "0"],
                                   ["--questions", "-1"]], ids=lambda f: " ".join(f))
def test_eval_flags_out_of_range(flags, tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    line = error_line([make_run(tmp_path, tiny_model_dir, data), *flags], capsys, script=ev)
    assert flags[0].lstrip("-") in line


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


def test_analyze_on_a_path_that_is_neither_run_nor_model(tmp_path, capsys):
    missing = tmp_path / "runs" / "critque-s0"
    line = error_line([str(missing)], capsys, script=analyze)
    assert line == f"error: {missing} is neither a run folder (no config.yaml) nor a model folder"


def test_prepare_on_a_missing_input(tmp_path, capsys):
    line = error_line([str(tmp_path / "omr.jsonl")], capsys, script=prepare)
    assert line == f"error: input file {tmp_path / 'omr.jsonl'} not found"


def test_prepare_on_records_without_the_openmath_fields(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    line = error_line([data, tiny_model_dir, f"train_file={data}", f"test_file={data}",
                           "--out", str(tmp_path / "out")], capsys, script=prepare)
    assert "expected_answer" in line


def test_run_config_with_an_unknown_key(tiny_model_dir, data, tmp_path, capsys):
    run_dir = make_run(tmp_path, tiny_model_dir, data, future_option=1)
    line = error_line([run_dir], capsys, script=ev)
    assert line.startswith(f"error: {run_dir}/config.yaml: unknown config key 'future_option'")
