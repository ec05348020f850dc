"""Protects the toy world's pipeline end to end, in seconds: a micro build (a few pretraining
steps, a handful of problems) is trained on by each self-distillation arm through the same code
path as the real default, then evaluated; and the alignment-dial ablation rebuilds references."""
import json
import os

import pytest

import selfdistill
import toy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    settings = toy.BuildSettings(steps=20, n_train=8, n_test=4, samples=2, max_correct=2)
    return toy.ensure_built(str(tmp_path_factory.mktemp("world")), progress=False, settings=settings)


@pytest.mark.parametrize("context", ["critique", "reference"])
def test_micro_toy_run_trains_and_evaluates(context, world, tmp_path):
    cfg = selfdistill.load_config([
        "--context", context, "--run", "micro", f"model={world['model_dir']}",
        f"train_file={world['train']}", f"test_file={world['test']}", f"out_dir={tmp_path}",
        "max_steps=2", "batch_size=4", "micro_batch=4", "eval_questions=2", "eval_samples=2",
        "threads=1"])
    run_dir, _ = selfdistill.train(cfg)
    metrics = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["train/kl"] >= 0 for m in metrics)
    if context == "critique":  # the rule critic's critiques all pass validation
        assert all(m["train/critique_invalid"] == 0 for m in metrics)
    steps = sorted(json.loads(l)["step"] for l in open(os.path.join(run_dir, "eval.jsonl")))
    assert steps == [0, 2]


def test_alignment_dial_rebuilds_the_reference():
    record = {"question": "2+7+5-9", "solution": toy.reference_solution("2+7+5-9")}
    default = selfdistill.Config(context="reference")
    aligned = selfdistill.Config(context="reference", toy_order="chain", toy_phrasing="same")
    assert selfdistill.teacher_context(default, record) == record["solution"]
    assert selfdistill.teacher_context(aligned, record) == toy.solve("2+7+5-9", "plain")
