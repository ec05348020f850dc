"""What happens to a critique that does not come back whole, and what validation lets through.

Protects: a critic that fails says why (critic.Failure: critic_error, critique_truncated,
critic_oom) and each drop is counted by that reason in metrics.jsonl (train/dropped/REASON) and
samples.jsonl (verdict); a critique cut at the critic's token budget (HTTP finish_reason "length",
or the local model reaching max_new_tokens, e.g. inside <think>) is critique_truncated, never
retried and never read as a critique; a local critic that runs out of memory halves its batch and
retries before any sample is dropped; critique_validation=full|format|off decides what enters the
loss; the critic's settings are range-checked."""
import json

import pytest
import torch

import critic
from conftest import run_main
from critic import Failure, HFCritic, HTTPCritic, validate_critique

ROLLOUT = "<step_1> 2+7=9 <step_2> 9+5=13 <answer> 13"
FIXED = "<step_1> 2+7=9 <step_2> 9+5=14 <answer> 14"
ARGS = (["2+7+5"], [ROLLOUT], ["7+5=12, 12+2=14"], ["14"])


@pytest.mark.parametrize("critique, gold, verdicts", [
    # critique                                    gold   full              format            off
    (FIXED,                                       "14", ("ok",            "ok",             "ok")),
    (FIXED,                                       "15", ("wrong_answer",  "ok",             "ok")),
    ("The answer is 14.",                         "14", ("bad_format",    "bad_format",     "ok")),
    ("<step_1> 2+7=9 <step_2> 9 + 5 = 13 <answer> 13", "13", ("retyped_step", "retyped_step", "ok")),
    ("   ",                                       "14", ("bad_format",    "bad_format",     "bad_format")),
    (Failure("critique_truncated"),               "14", ("critique_truncated",) * 3),
    (None,                                        "14", ("critic_error",) * 3),
])
def test_each_validation_mode_says_why(critique, gold, verdicts):
    for mode, verdict in zip(critic.VALIDATION, verdicts):
        ok, why = validate_critique(ROLLOUT, critique, gold, mode)
        assert ok is (verdict == "ok") and why.split(":")[0] == verdict, (mode, why)


def test_http_critique_cut_at_max_tokens_is_truncated_and_not_retried(critic_server):
    critic_server.critique, critic_server.replies = "<think>still thinking", "length"
    http = HTTPCritic(critic_server.url, "critic-model", timeout=5, retries=3, max_tokens=123)
    assert http(*ARGS) == [Failure("critique_truncated")]
    assert len(critic_server.requests) == 1 and critic_server.requests[0][1]["max_tokens"] == 123


def test_http_critic_sends_the_configs_budget_and_batch(critic_server, tiny_model_dir):
    import selfdistill
    cfg = selfdistill.Config(model=tiny_model_dir, critic="http", critic_url=critic_server.url,
                             critic_model="critic-model", critic_max_new_tokens=4321, critic_batch=3)
    judge = critic.from_config(cfg, torch.device("cpu"))
    assert judge.max_tokens == 4321 and judge.workers == 3


@pytest.fixture
def hf(tiny_model_dir):
    return HFCritic(tiny_model_dir, max_new_tokens=4, batch_size=8)


def test_hf_critique_that_reaches_its_budget_is_truncated(hf, monkeypatch):
    monkeypatch.setattr(hf, "generate", lambda prompts: (["<think>abc", FIXED], [True, False]))
    assert hf(*(column * 2 for column in ARGS)) == [Failure("critique_truncated"), FIXED]


def test_hf_critic_halves_its_batch_on_out_of_memory_before_dropping(hf, monkeypatch):
    seen = []

    def generate(prompts):  # fits two prompts at a time, not more
        seen.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [FIXED] * len(prompts), [False] * len(prompts)
    monkeypatch.setattr(hf, "generate", generate)
    assert hf(*(column * 5 for column in ARGS)) == [FIXED] * 5  # nothing dropped
    assert seen == [5, 4, 2, 2, 1] and hf.batch_size == 2  # batch 8: 5 (OOM), 4 (OOM), then 2, 2, 1
    seen.clear()
    assert hf(*(column * 3 for column in ARGS)) == [FIXED] * 3 and seen == [2, 1]  # the size that fitted


def test_hf_critic_out_of_memory_on_one_prompt_is_counted(hf, monkeypatch):
    def generate(prompts):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(hf, "generate", generate)
    assert hf(*(column * 3 for column in ARGS)) == [Failure("critic_oom")] * 3


def settings(server, model_dir, data, out_dir, **extra):
    values = dict(model=model_dir, train_file=data, test_file=data, out_dir=str(out_dir), threads=1,
                  prompts="instruct", batch_size=4, micro_batch=4, eval_at_end=False, max_steps=1,
                  max_new_tokens=8, critic="http", critic_url=server.url, critic_model="critic-model",
                  critic_timeout=2, critic_retries=0)
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize("replies, validation, dropped", [
    ("no_step_tags", "full", {"train/dropped/bad_format": 4}),
    ("no_step_tags", "off", {}),                           # any text enters the loss
    ("length", "full", {"train/dropped/critique_truncated": 4}),
    ("length", "off", {"train/dropped/critique_truncated": 4}),  # a cut critique never does
])
def test_drops_are_counted_by_reason(replies, validation, dropped, critic_server, tiny_model_dir, data,
                                     tmp_path, capsys):
    critic_server.replies = replies
    code, _, err = run_main(["--context", "critique", "--run", "c", *settings(
        critic_server, tiny_model_dir, data, tmp_path, critique_validation=validation)], capsys)
    assert code == 0, err[-2000:]
    [metrics] = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert {k: v for k, v in metrics.items() if k.startswith("train/dropped/")} == dropped
    assert metrics["train/critique_invalid"] == sum(dropped.values())
    assert ("train/kl" in metrics) == (not dropped)  # the loss ran on the kept rollouts only
    samples = [json.loads(line) for line in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    assert {s["verdict"] for s in samples} == ({k.split("/")[-1] for k in dropped} or {"ok"})


@pytest.mark.parametrize("extra, message", [
    ({"critic_batch": 0}, "'critic_batch' must lie in 1..4096"),
    ({"critic_max_new_tokens": 0}, "'critic_max_new_tokens' must lie in 1..1048576"),
    ({"critique_validation": "lenient"}, "must be one of full|format|off"),
    ({"critique_validation": "off", "distill_span": "through_first_divergence"}, "needs critique_validation"),
])
def test_critic_settings_are_checked(extra, message, critic_server, tiny_model_dir, data, tmp_path, capsys):
    code, _, err = run_main(["--context", "critique", *settings(critic_server, tiny_model_dir, data, tmp_path,
                                                                **extra)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_the_quoting_control_needs_validated_critiques(critic_server, tiny_model_dir, data, tmp_path, capsys):
    code, _, err = run_main(["--context", "critique_quoting", *settings(
        critic_server, tiny_model_dir, data, tmp_path, critique_validation="off")], capsys)
    assert code == 2 and "critique_quoting reads the critique's steps" in err
