"""eval.py: the numbers every comparison in the README rests on, checked on CPU in seconds.

Protects: Avg@k, Pass@k and Maj@k (strict tie rule) on hand-computed cases, and the unbiased
Pass@k estimator against brute-force enumeration of k-subsets; the bootstrap CI (seeded,
contains the estimate); a model target's config resolved as a run of it would be; a checkpoint's
adapter loaded back exactly, and step 0's student the base with the adapter off; evaluate_run on
a tiny run (eval.jsonl written, steps skipped on rerun, step 0 evaluated once per base key) and
its one-line errors; the old `eval.py --compare/--plot/--analyze/--prepare` flags answered with
the new command."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from plumbing import common
import eval as ev
import selfdistill
from toyworld import toy_build
from plumbing.common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (5, 2, 3), (6, 1, 2), (8, 3, 8),
                                     (10, 0, 4), (12, 5, 12), (12, 11, 3), (7, 7, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    brute = sum(any(s) for s in subsets) / len(subsets)
    assert ev.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError):
        ev.pass_at_k(3, 1, 4)


def test_question_scores_hand_computed():
    # 4 samples: two say "5" (gold), one "\frac{10}{2}" (= 5), one unparseable
    answers = ["5", "7", "\\frac{10}{2}", None]
    correct = [True, False, True, False]
    s = ev.question_scores(answers, correct, [3, 4, 5, 8], [False, False, False, True], "5", k=4)
    assert s["avg"] == 0.5 and s["pass"] == 1.0 and s["maj"] == 1.0
    assert s["length"] == 5.0 and s["unparseable"] == 0.25 and s["truncated"] == 0.25


@pytest.mark.parametrize("answers, gold, expected", [
    (["3", "3", "4"], "3", 1.0),
    (["3", "4", "4"], "3", 0.0),
    (["3", "4"], "3", 0.0),                  # a tie counts as wrong (strict rule)
    (["3", "4", "4", "3"], "4", 0.0),
    (["0.5", "1/2", "7", None, None], "\\frac{1}{2}", 1.0),  # equal answers pool; None abstains
    ([None, None], "1", 0.0),
    (["x = 2", "2.0", "3"], "2", 1.0),
])
def test_majority_correct(answers, gold, expected):
    assert ev.majority_correct(answers, gold) == expected


def test_maj_at_k_averages_disjoint_blocks():
    # n = 6, k = 3: blocks ["1","1","2"] (right) and ["2","2","1"] (wrong)
    assert ev.maj_at_k(["1", "1", "2", "2", "2", "1"], "1", 3) == 0.5


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    values = [0, 1, 0.5, 0.25, 1, 1, 0, 0.75, 0.5, 0.1]
    mean = sum(values) / len(values)
    low, high = ev.bootstrap_ci(values, seed=3)
    assert low <= mean <= high and low < high
    assert ev.bootstrap_ci(values, seed=3) == [low, high]
    assert ev.bootstrap_ci(values, seed=4) != [low, high]
    assert ev.bootstrap_ci([0.5] * 5) == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# A run's config for a model target, and a checkpoint's adapter as the student


def test_target_config_of_a_model_is_resolved(tiny_model_dir):
    """analyze.py / prepare.py on a model (not a run) get the derived values a run would have."""
    for target, budget in (("toy", toy_build.budget()), (tiny_model_dir, 512)):
        cfg, run_dir = ev.target_config(target, ["threads=1"])
        assert run_dir is None and cfg.max_new_tokens == budget and cfg.samples_per_question == 1


def test_load_adapter_round_trip(lora_model, tmp_path):
    cfg, model, tok = lora_model
    model.save_pretrained(str(tmp_path / "step_000001"))
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    try:
        ev.load_adapter(model, None)
        assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)
        ev.load_adapter(model, str(tmp_path / "step_000001"))
        assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters() if "lora_" in n)
    finally:
        for n, p in model.named_parameters():
            if n in saved:
                p.data.copy_(saved[n])


def test_step_0_student_is_the_base_with_the_adapter_off(lora_model, tmp_path):
    """student_at(model, None) switches the adapter off: the logits of a zero adapter exactly, the
    adapter's weights untouched and active again afterwards."""
    cfg, model, tok = lora_model
    ids = torch.tensor([tok("12+7=19")["input_ids"]])
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        with ev.student_at(model, None):
            off = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, trained)  # on again
        assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters() if "lora_" in n)
        try:
            ev.load_adapter(model, None)  # the zero adapter it replaces
            assert torch.equal(model(input_ids=ids).logits, off) and not torch.equal(off, trained)
            model.save_pretrained(str(tmp_path / "step_000001"))
            for n, p in model.named_parameters():
                if n in saved:
                    p.data.copy_(saved[n] + 1)
            with ev.student_at(model, str(tmp_path / "step_000001")):
                assert torch.equal(model(input_ids=ids).logits, off)  # the checkpoint's weights loaded
        finally:
            for n, p in model.named_parameters():
                if n in saved:
                    p.data.copy_(saved[n])


# ---------------------------------------------------------------------------------------------
# evaluate_run
# evaluate_run


def test_evaluate_run_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist") as missing:
        ev.evaluate_run(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no checkpoints and no config.yaml") as empty:
        ev.evaluate_run(str(tmp_path))
    assert "\n" not in str(missing.value) + str(empty.value)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1


def test_evaluate_run_tiny(tmp_path, tiny_model_dir, capsys):
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                 for q, a in [("1+1", "2"), ("2+3", "5"), ("4-1", "3")]))
    cfg = selfdistill.resolve(selfdistill.Config(
        model=tiny_model_dir, prompts="instruct", test_file=str(test_file), train_file=str(test_file),
        max_new_tokens=6, eval_samples=3, lora_r=2, run="tiny", out_dir=str(tmp_path)))
    run_dir = tmp_path / "tiny"
    os.makedirs(run_dir)
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump(vars(cfg), f)
    model, _ = common.load_model(cfg, tiny_model_dir, torch.device("cpu"))
    model.save_pretrained(str(run_dir / "checkpoints" / "step_000005"))
    rows = ev.evaluate_run(str(run_dir), questions=2)
    assert [r["step"] for r in rows] == [0, 5]
    assert all(r["n"] == 3 and r["k"] == 3 and r["questions"] == 2 for r in rows)
    assert all(0 <= r[m] <= 1 for r in rows for m in ("avg", "pass", "maj", "unparseable"))
    assert 0 < rows[0]["length"] <= 6
    # a zero-LoRA checkpoint is the base, and both steps sample with the same seed
    assert {m: rows[0][m] for m in ev.METRICS} == {m: rows[1][m] for m in ev.METRICS}
    assert "Avg@3" in capsys.readouterr().out
    again = ev.evaluate_run(str(run_dir), questions=2)
    assert again == rows and len((run_dir / "eval.jsonl").read_text().splitlines()) == 2


def test_step_zero_is_evaluated_once_per_base_key(tmp_path, tiny_model_dir, capsys):
    """Another arm of the same base, test set and sampling reuses step 0 (bit-identical anyway);
    a changed key (here the seed) recomputes it."""
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                 for q, a in [("1+1", "2"), ("2+3", "5")]))
    rows = {}
    for name, arm, seed in (("a", "critique", 0), ("b", "reference", 0), ("c", "critique", 1)):
        cfg = selfdistill.resolve(selfdistill.Config(
            arm=arm, seed=seed, model=tiny_model_dir, prompts="instruct", test_file=str(test_file),
            train_file=str(test_file), max_new_tokens=5, eval_samples=2, run=name, out_dir=str(tmp_path)))
        os.makedirs(tmp_path / name)
        yaml.safe_dump(vars(cfg), open(tmp_path / name / "config.yaml", "w"))
        rows[name] = ev.evaluate_run(str(tmp_path / name))[0]
    assert "reused_from" not in rows["a"] and rows["b"]["reused_from"] == "a"
    assert {k: v for k, v in rows["b"].items() if k != "reused_from"} == rows["a"]
    assert "reused_from" not in rows["c"] and rows["c"]["base_key"]["seed"] == 1
    assert "reused from a" in capsys.readouterr().out


