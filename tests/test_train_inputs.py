"""What a training start refuses: a device the machine lacks, a topk past the vocabulary, data files
that are no JSONL of questions and answers (a folder, a JSON array, a binary file, gold answers that
cannot be matched or are not text), a missing test file, model folders that cannot load, LoRA targets
that match nothing, own data with the rule critic and an HF critic that cannot load. Each ends in
one `error: ...` line and exit code 2, before a step runs (where it can: before the model loads);
a byte order mark is read or named, integer and string answers stay accepted."""
import functools
import json
import os
import shutil

import pytest
import torch

import critic
from plumbing import common
from plumbing import sampler
from plumbing.common import UserError
from conftest import error_line, one_line_error, run_main, run_settings, trip

settings = functools.partial(run_settings, max_new_tokens=6, max_steps=1)


# ---------------------------------------------------------------------------------------------
# The machine and the model's vocabulary


@pytest.mark.bad_input
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tiny_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path, device="cuda")],
                          capsys)
    assert line == "error: device=cuda but no CUDA device is available; use device=cpu"


@pytest.mark.bad_input
@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_device_mps_without_mps_is_one_line(tiny_model_dir, data, tmp_path, capsys):
    code, _, err = run_main([f"model={tiny_model_dir}", f"train_file={data}", f"test_file={data}", "device=mps",
                             "prompts=instruct", f"out_dir={tmp_path}", "threads=1"], capsys)
    one_line_error(code, err, "device=mps but no Apple GPU (MPS) is available")


@pytest.mark.bad_input
def test_unknown_device_name(tiny_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path, device="gpu")],
                          capsys)
    assert "device" in line and "cpu" in line


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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


@pytest.mark.bad_input
def test_a_binary_dataset_file_is_one_line(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1\x15\x04\x15\xa0\x01\xff\xfe\x00\x00 binary")
    with pytest.raises(UserError, match="train.parquet"):
        common.load_jsonl(str(path))


@pytest.mark.bad_input
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


@pytest.mark.bad_input
@pytest.mark.parametrize("answer, kind", [([1, 2], "a list"), ({"value": 3}, "an object"), (True, "true/false"),
                                          (0.5, "a decimal number")])
def test_a_gold_answer_that_is_not_text_or_an_integer(answer, kind, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n"
                    + json.dumps({"question": "2+2", "answer": answer}) + "\n")
    with pytest.raises(UserError) as e:
        common.load_jsonl(str(path), normalize=critic.normalize_answer)
    assert str(e.value).startswith(f"{path}:2: 'answer' is {kind} (") and "\n" not in str(e.value)


def test_integer_and_string_answers_stay_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": "q", "answer": a}) + "\n" for a in (7, -3, "7", "\\frac{1}{2}")))
    assert [r["answer"] for r in common.load_jsonl(str(path), normalize=critic.normalize_answer)] == \
        ["7", "-3", "7", "\\frac{1}{2}"]


@pytest.mark.bad_input
def test_a_list_answer_stops_training_with_one_line(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1+1", "answer": [2]}) + "\n")
    code, _, err = run_main(settings(tiny_model_dir, str(path), tmp_path / "out"), capsys)
    one_line_error(code, err, f"{path}:1: 'answer' is a list ([2])")


@pytest.mark.bad_input
def test_a_missing_test_file_is_found_before_training(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    trip(monkeypatch, common, "load_model")
    missing = tmp_path / "tset.jsonl"
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path, eval_at_end=True,
                                                          test_file=missing)], capsys)
    assert str(missing) in line and "not found" in line


@pytest.mark.bad_input
def test_a_question_longer_than_the_context(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"question": "1+" * 600 + "1", "answer": "601"}) + "\n")
    code, _, err = run_main(settings(tiny_model_dir, str(data), tmp_path), capsys)
    one_line_error(code, err, "do not fit the model's context")


@pytest.mark.bad_input
def test_own_data_with_the_rule_critic(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "words.jsonl"
    data.write_text(json.dumps({"question": "What is two plus two?", "answer": "4"}) + "\n")
    code, _, err = run_main(settings(tiny_model_dir, str(data), tmp_path) + ["--context", "critique"], capsys)
    one_line_error(code, err, "critic=rule critiques toy arithmetic chains only")


# ---------------------------------------------------------------------------------------------
# Models, LoRA and local critics


@pytest.mark.bad_input
def test_tilde_model_path_in_yaml_is_one_line(data, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(f"model: ~/models/chat\ntrain_file: {data}\ntest_file: {data}\n")
    line = error_line(["--context", "grpo", "--config", str(tmp_path / "c.yaml"),
                           f"out_dir={tmp_path}"], capsys)
    assert line.startswith("error: cannot load a tokenizer from '~/models/chat'")


@pytest.mark.bad_input
def test_model_folder_without_weights_is_one_line(tiny_model_dir, data, tmp_path, capsys):
    folder = tmp_path / "tokenizer_only"
    folder.mkdir()
    for name in os.listdir(tiny_model_dir):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(tiny_model_dir, name), folder)
    line = error_line(["--context", "grpo", *settings(str(folder), data, tmp_path)], capsys)
    assert line.startswith(f"error: cannot load a causal LM from '{folder}'")


@pytest.mark.bad_input
@pytest.mark.parametrize("targets", ["qproj,vproj", ","], ids=["no-name-matches", "no-name-at-all"])
def test_lora_targets_that_match_nothing(targets, tiny_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path,
                                                          lora_targets=targets)], capsys)
    assert line.startswith("error: lora_targets") and all(t in line for t in targets.split(",") if t)


@pytest.mark.bad_input
def test_a_lora_target_with_a_typo_among_valid_ones(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    trip(monkeypatch, sampler, "generate")  # the error must come before training starts
    line = error_line(["--context", "grpo", *settings(tiny_model_dir, data, tmp_path,
                                                          lora_targets="q_prj,v_proj")], capsys)
    assert "q_prj" in line


@pytest.mark.bad_input
def test_hf_critic_folder_that_does_not_exist(tiny_model_dir, data, tmp_path, capsys):
    missing = tmp_path / "no_such_critic"
    line = error_line(["--context", "critique", *settings(tiny_model_dir, data, tmp_path, critic="hf",
                                                              critic_model=missing)], capsys)
    assert line.startswith(f"error: cannot load the critic '{missing}'")


@pytest.mark.bad_input
def test_hf_critic_without_chat_template(tiny_model_dir, no_template_model_dir, data, tmp_path, capsys):
    line = error_line(["--context", "critique", *settings(tiny_model_dir, data, tmp_path, critic="hf",
                                                              critic_model=no_template_model_dir)], capsys)
    assert "has no chat template" in line
