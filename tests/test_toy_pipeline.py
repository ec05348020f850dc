"""Protects the toy world's pipeline end to end, in seconds: a micro build (a few pretraining
steps, a handful of problems) is trained on by each self-distillation arm through the same code
path as the real default, logging the per-token advantage statistics every `analysis_every` steps,
then evaluated in-process by eval.evaluate_run (what `selfdistill.py` runs as `eval.py RUN` in its
own process after training); and the alignment-dial ablation rebuilds references."""
import json
import os

import pytest

import eval as ev
import prepare
import selfdistill
from toyworld import toy
from toyworld import folders
from toyworld import toy_build
from toyworld import world

ANALYSIS = ("analysis/A_mean", "analysis/rollouts", "analysis/A_prefix", "analysis/A_wrong", "analysis/A_after")


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory):
    settings = folders.BuildSettings(steps=20, n_train=8, n_test=4, n_transfer=3, samples=2, max_correct=2)
    return toy_build.ensure_built(str(tmp_path_factory.mktemp("world")), progress=False, settings=settings)


@pytest.mark.parametrize("context", ["critique", "reference"])
def test_micro_toy_run_trains_and_evaluates(context, micro_world, tmp_path):
    cfg = selfdistill.load_config([
        "--context", context, "--run", "micro", f"model={micro_world['model_dir']}",
        f"train_file={micro_world['train']}", f"test_file={micro_world['test']}", f"out_dir={tmp_path}",
        "max_steps=2", "batch_size=4", "micro_batch=4", "eval_questions=2", "eval_samples=2",
        "threads=1", "analysis_every=2",
        # the world's one length budget, as model=toy gets it (a model folder would default to 512,
        # which with the prompt does not fit the toy model's 512 positions)
        f"max_new_tokens={folders.budget(os.path.dirname(micro_world['model_dir']))}"])
    run_dir, _ = selfdistill.train(cfg)
    metrics = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["train/kl"] >= 0 for m in metrics)
    # the per-token advantage statistics of the arm's own teacher, logged every analysis_every steps
    assert not any(k in metrics[0] for k in ANALYSIS) and all(k in metrics[1] for k in ANALYSIS)
    assert metrics[1]["analysis/A_mean"] is not None  # over every distilled token of the step
    assert 0 <= metrics[1]["analysis/rollouts"] <= 4  # the step's wrong rollouts with a located step
    if metrics[1]["analysis/rollouts"]:
        assert metrics[1]["analysis/A_wrong"] is not None and metrics[1]["analysis/A_prefix"] is not None
    if context == "critique":  # the rule critic's critiques all pass validation
        assert all(m["train/critique_invalid"] == 0 for m in metrics)
    # train() no longer evaluates (main() runs eval.py in a subprocess): evaluate here, in-process
    assert not os.path.exists(os.path.join(run_dir, "eval.jsonl"))
    rows = ev.evaluate_run(run_dir)
    assert [r["step"] for r in rows] == [0, 2] and all(r["questions"] == 2 and r["n"] == 2 for r in rows)
    steps = sorted(json.loads(l)["step"] for l in open(os.path.join(run_dir, "eval.jsonl")))
    assert steps == [0, 2]


def test_alignment_dial_rewrites_the_reference_once_at_load(tmp_path):
    """The reference arm's teacher sees each record's `solution`: as written without the dial, and
    with it (toy_order / toy_phrasing) the dial's reference, rebuilt once when the file is loaded."""
    record = {"question": "2+7+5-9", "answer": "5", "solution": toy.reference_solution("2+7+5-9")}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")
    default = selfdistill.Config(arm="reference")
    aligned = selfdistill.Config(arm="reference", toy_order="chain", toy_phrasing="same")
    assert world.load_records(default, str(path), need_solution=True)[0]["solution"] == record["solution"]
    assert world.load_records(aligned, str(path), need_solution=True)[0]["solution"] == \
        toy.solve("2+7+5-9", "plain")


def test_prepare_converts_and_filters_openmath_records(micro_world, tmp_path):
    """prepare.py: OpenMathReasoning fields in, our JSONL out, the difficulty filter applied
    with the solver's samples and the (rule) critic; every kept record is counted and split."""
    problems = toy.generate_problems(6, seed=5)
    source = tmp_path / "omr.jsonl"
    source.write_text("".join(json.dumps({"problem": p["question"], "expected_answer": p["answer"],
                                          "generated_solution": p["solution"]}) + "\n" for p in problems)
                      + json.dumps({"problem": "no answer"}) + "\n")
    # max_new_tokens is given: eval.target_config leaves it at 0 (unresolved), which generate
    # refuses (see test_eval.py::test_target_config_of_a_model_is_resolved, an expected failure)
    budget = folders.budget(os.path.dirname(micro_world["model_dir"]))
    prepare.main([str(source), micro_world["model_dir"], "prompts=toy", "critic=rule", "threads=1",
                  f"max_new_tokens={budget}", "--out", str(tmp_path / "out"), "--test-size", "1",
                  "--samples", "2", "--max-correct", "1"])
    counts = json.loads((tmp_path / "out" / "prepare.json").read_text())["counts"]
    assert counts["input"] == 7 and counts["missing_fields"] == 1 and counts["problems"] == 6
    dropped = sum(v for k, v in counts.items() if k in ("too_easy", "no_wrong_stepped_rollout")
                  or k.startswith("critic/"))
    assert counts["kept"] + dropped == 6 and counts["train"] + counts["test"] == counts["kept"]
    rows = [json.loads(l) for l in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert all(set(r) >= {"question", "answer", "solution"} for r in rows)
