"""eval.py: the numbers every comparison in the README rests on, checked on CPU in seconds.

Protects: Avg@k, Pass@k and Maj@k (strict tie rule) on hand-computed cases, and the unbiased
Pass@k estimator against brute-force enumeration of k-subsets; the bootstrap CI (seeded,
contains the estimate); A_t = log π_T(y_t|x,c,y<t) − log π_θ(y_t|x,y<t) against a plain full
forward of each unpadded row (teacher = LoRA off, student = a non-zero LoRA), in a padded batch;
the step / first-error masks and the four analysis contexts; the training log's advantage
statistics (contexts.advantage_stats, logged every `analysis_every` steps) on hand-computed A values
and regions; HTML escaping of hostile tokens;
--compare pooling seeds into mean ± std with the best step and the final value; evaluate_run on
a tiny run (eval.jsonl written, steps skipped on rerun) and its one-line errors."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import common
import contexts
import eval as ev
import selfdistill
import toy
from common import UserError
import analyze
import compare
import toy_build

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
# Per-token advantage


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    cfg = selfdistill.Config(model=tiny_model_dir, prompts="instruct", lora_r=4, chunk_size=5, micro_batch=8)
    model, tok = common.load_model(cfg, tiny_model_dir, torch.device("cpu"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # student ≠ teacher
    return cfg, model.eval(), tok


def direct_logp(model, prompt, response):
    """log p(response_t | prompt, response<t) from one full forward of the unpadded row."""
    ids = torch.tensor([prompt + response])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (L, V)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[positions, torch.tensor(response)]


@torch.no_grad()
@pytest.mark.parametrize("chunk_size", [5, 0])  # 0: the chunk from chunked_head.CHUNK_LOGITS_MB
def test_advantages_equal_direct_log_probs(lora_model, chunk_size, monkeypatch):
    cfg, model, tok = lora_model
    monkeypatch.setattr(cfg, "chunk_size", chunk_size)
    questions = ["2+7+5", "3+4-1+2"]
    responses = [tok("<step_1> 2+7=9 <step_2> 9+5=15 <answer> 15")["input_ids"] + [tok.eos_token_id],
                 tok("<answer> 8")["input_ids"]]  # different lengths: the batch is padded
    context = "<step_1> 2+7=9 <step_2> 9+5=14 <answer> 14"
    A = analyze.batch_advantages(model, tok, cfg, torch.device("cpu"), questions, responses,
                            {"critique": [context, context]})["critique"]
    for q, r, a in zip(questions, responses, A):
        student = contexts.student_prompt_ids(tok, q, cfg.prompts)
        teacher = contexts.teacher_prompt_ids(tok, q, context, "critique", cfg.prompts)
        with model.disable_adapter():
            teacher_logp = direct_logp(model, teacher, r)
        expected = teacher_logp - direct_logp(model, student, r)
        assert a.shape == (len(r),)
        assert expected.abs().max() > 1e-3  # the LoRA really changes the student
        torch.testing.assert_close(a, expected, atol=1e-4, rtol=1e-4)
    one = analyze.token_advantages(model, tok, questions[0], responses[0], context, "critique", cfg, "cpu")
    torch.testing.assert_close(one, A[0], atol=1e-5, rtol=1e-5)


def test_analysis_masks_and_contexts(lora_model):
    toy = pytest.importorskip("toy")
    cfg, model, tok = lora_model
    text = "<step_1> 2+7=9 <step_2> 9+5=15 <step_3> 15-3=12 <answer> 12"
    critique = toy.rule_critique("2+7+5-3", text, "11")
    item = {"question": "2+7+5-3", "answer": "11", "solution": toy.reference_solution("2+7+5-3"),
            "response_ids": tok(text)["input_ids"] + [tok.eos_token_id], "text": text,
            "critique": critique, "wrong_step": analyze.first_wrong_step(text, critique)}
    assert item["wrong_step"] == 1
    texts = analyze.analysis_contexts(cfg, item, analyze.KINDS)
    assert texts["critique"] == critique and texts["reference"] == item["solution"]
    assert "9+5=15 is wrong; correct: 9+5=14" in texts["critique_quoting"]
    assert "2+7=9" not in texts["critique_no_prefix"] and "9 plus 5 is 14" in texts["critique_no_prefix"]
    [result] = analyze.analyze_rollouts(model, tok, cfg, "cpu", [item])
    start, end = result["wrong_span"]
    assert "".join(result["tokens"][start:end]).strip() == "9+5=15"
    assert "".join(result["tokens"][result["step_starts"][0]:]).startswith("<step_1>")
    for kind in analyze.KINDS:
        A = torch.tensor(result["contexts"][kind]["A"])
        assert A.shape == (len(item["response_ids"]),)
        assert result["summary"][kind]["wrong"] == pytest.approx(A[start:end].mean().item(), abs=1e-3)
    summary = analyze.summarize_contexts([result, result], analyze.KINDS)
    assert summary["critique"]["wrong"]["n"] == 2 and summary["critique"]["wrong"]["std"] == 0


@pytest.mark.parametrize("response, critique, expected", [
    ("<step_1> 1+1=2 <step_2> 2+3=6 <answer> 6", "<step_1> 1+1=2 <step_2> 2+3=5 <answer> 5", 1),
    ("<step_1> 1+1=3 <answer> 3", "<step_1> 1+1=2 <answer> 2", 0),
    ("<step_1> 1+1=2 <answer> 3", "<step_1> 1+1=2 <answer> 2", None),  # no wrong step to point at
    ("<step_2> 1+1=2", "<step_1> 1+1=2 <answer> 2", None),              # bad tags
    ("<step_1> 1+1=3", None, None),                                     # the critic failed
])
def test_first_wrong_step(response, critique, expected):
    assert analyze.first_wrong_step(response, critique) == expected


def test_advantage_stats_by_hand(tiny):
    """contexts.advantage_stats, what `analysis_every` logs: the mean A_t over every distilled token,
    and over the wrong rollouts' correct prefix, first wrong step and the rest. The regions are
    written here by hand in characters (the tiny tokenizer has one token per character; a tag is 8
    tokens, EOS one more); rollouts with no differing step, no critique, or a wrong step whose tag
    is not among its tokens are left out of the regions but not of A_mean."""
    _, tok = tiny
    eos = [tok.eos_token_id]

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"] + eos

    # 1: wrong at step 2 (0-based 1). <step_1> 0-7, " 2+7=9 " 8-14, <step_2> 15-22 (tag: prefix),
    #    " 9+5=15 " 23-30 (the wrong step), <answer> 31-38, " 15" 39-41, EOS 42 (after)
    wrong_second = "<step_1> 2+7=9 <step_2> 9+5=15 <answer> 15"
    # 2: right, the critique reproduces it: no differing step
    right = "<step_1> 3+4=7 <answer> 7"
    # 3: the critic failed (None)
    failed = "<step_1> 1+1=3 <answer> 3"
    # 4: wrong at step 1 (0-based 0). <step_1> 0-7 (prefix), " 5-2=4 " 8-14 (wrong), the rest 15-40
    wrong_first = "<step_1> 5-2=4 <step_2> 4+1=5 <answer> 5"
    # 5: its text and critique differ at step 2, but its tokens hold no <step_2>: not located
    unlocated_text = "<step_1> 1+1=2 <step_2> 2+1=4 <answer> 4"
    responses = [ids(wrong_second), ids(right), ids(failed), ids(wrong_first), ids("<step_1> 1+1=2")]
    texts = [wrong_second, right, failed, wrong_first, unlocated_text]
    critiques = ["<step_1> 2+7=9 <step_2> 9+5=14 <answer> 14", right, None,
                 "<step_1> 5-2=3 <step_2> 3+1=4 <answer> 4", "<step_1> 1+1=2 <step_2> 2+1=3 <answer> 3"]
    assert [len(r) for r in responses] == [43, 26, 26, 41, 15]
    A = [torch.arange(43.0), torch.full((26,), 7.0), torch.full((26,), -9.0),
         torch.ones(41), torch.full((15,), 100.0)]
    A[3][8:15] = -4.0  # rollout 4's wrong step
    out = contexts.advantage_stats(tok, responses, A, texts, critiques)
    assert set(out) == {"analysis/A_mean", "analysis/rollouts", "analysis/A_prefix", "analysis/A_wrong",
                        "analysis/A_after"}
    assert out["analysis/rollouts"] == 2
    total = sum(range(43)) + 26 * 7.0 - 26 * 9.0 + (41 - 7) - 7 * 4.0 + 15 * 100.0
    assert out["analysis/A_mean"] == pytest.approx(total / (43 + 26 + 26 + 41 + 15))
    assert out["analysis/A_prefix"] == pytest.approx((sum(range(0, 23)) + 8 * 1.0) / (23 + 8))
    assert out["analysis/A_wrong"] == pytest.approx((sum(range(23, 31)) + 7 * -4.0) / (8 + 7))
    assert out["analysis/A_after"] == pytest.approx((sum(range(31, 43)) + 26 * 1.0) / (12 + 26))
    # the regions the statistics used, from the tokens
    _, masks = contexts.step_regions(contexts.token_pieces(tok, responses[0]), 1)
    assert [m.nonzero().flatten().tolist() for m in masks] == [
        list(range(0, 23)), list(range(23, 31)), list(range(31, 43))]
    # nothing to locate: no region statistics; no rollouts at all: no mean either
    none = contexts.advantage_stats(tok, responses[1:3], A[1:3], texts[1:3], critiques[1:3])
    assert none["analysis/rollouts"] == 0 and none["analysis/A_mean"] == pytest.approx(-1.0)
    assert none["analysis/A_prefix"] is none["analysis/A_wrong"] is none["analysis/A_after"] is None
    empty = contexts.advantage_stats(tok, [], [], [], [])
    assert empty["analysis/A_mean"] is None and empty["analysis/rollouts"] == 0


def test_analysis_config_of_a_model_is_resolved(tiny_model_dir):
    """--analyze / --prepare on a model (not a run) get the derived values a run would have."""
    import toy
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


def test_advantage_summary():
    A = torch.tensor([1.0, -1.0, 0.0, -4.0, -2.0, 5.0])
    prefix = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    wrong = torch.tensor([0, 0, 0, 1, 1, 0], dtype=torch.bool)
    s = analyze.advantage_summary(A, prefix, wrong, ~(prefix | wrong))
    assert s == {"prefix": 0.0, "wrong": -3.0, "after": 5.0, "prefix_abs": pytest.approx(2 / 3),
                 "focus": pytest.approx(4.5)}


def test_pooled_focus_is_a_ratio_of_means_not_a_mean_of_ratios():
    results = [{"summary": {"critique": {"prefix": 0.0, "wrong": -2.0, "after": None,
                                         "prefix_abs": 1e-6, "focus": 2e6}}},
               {"summary": {"critique": {"prefix": 0.0, "wrong": -4.0, "after": None,
                                         "prefix_abs": 2.0, "focus": 2.0}}}]
    pooled = analyze.summarize_contexts(results, ["critique"])["critique"]["focus_pooled"]
    assert pooled["mean"] == pytest.approx(3.0 / (1.0 + 0.5e-6))
    assert pooled["median_per_rollout"] == pytest.approx((2e6 + 2.0) / 2) and pooled["n"] == 2


def test_html_escapes_tokens():
    tokens = ["<step_1>", " a<b", " & ", "\n", "\"'", "<script>alert(1)</script>"]
    result = {"question": "1<2 & 3", "answer": "<x>", "tokens": tokens, "step_starts": [0],
              "wrong_step": 1, "wrong_span": [1, 3],
              "contexts": {"critique": {"text": "<step_1> </pre><b>", "A": [0.5, -1, -20, 2, 0, 1]}},
              "summary": {"critique": {"prefix": 0.1, "wrong": -2.0, "after": None, "focus": 3.0}}}
    page = analyze.render_html([result], ["critique"], "t<itle>")
    assert "<script>" not in page and "</pre><b>" not in page and "<step_1>" not in page
    assert "&lt;step_1&gt;" in page and " a&lt;b" in page and " &amp; " in page
    assert "↵<br>" in page and "&quot;&#x27;" in page and "1&lt;2 &amp; 3" in page
    assert page.count('class="s"') == 1 and page.count('class="w"') == 2


# ---------------------------------------------------------------------------------------------
# --compare


def fake_run(root, name, seed, values, **config):
    """A run folder with config.yaml and eval.jsonl; values: {step: avg} (other metrics derived)."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    # a resolved config, as training writes it
    cfg = vars(selfdistill.resolve(selfdistill.Config(**{"arm": "critique", "seed": seed, "run": name, **config})))
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(run_dir, "eval.jsonl"), "w") as f:
        for step, avg in values.items():
            row = {"step": step, "n": 4, "k": 4, "questions": 10, "temperature": 1.0, "avg": avg,
                   "pass": min(1.0, 2 * avg), "maj": avg / 2, "length": 10 * step, "unparseable": 0,
                   "truncated": 0}
            row["ci"] = {m: [row[m] - 0.1, row[m] + 0.1] for m in ev.METRICS}
            f.write(json.dumps(row) + "\n")
    return run_dir


def test_compare_pools_seeds(tmp_path):
    runs = [fake_run(tmp_path, "c0", 0, {0: 0.1, 10: 0.3, 20: 0.5, 30: 0.4}),
            fake_run(tmp_path, "c1", 1, {0: 0.1, 10: 0.5, 20: 0.5, 30: 0.2}),
            fake_run(tmp_path, "r0", 0, {0: 0.1, 10: 0.2, 20: 0.1}, arm="reference", lr=1e-3)]
    arms, shared = compare.compare_runs(runs)
    critique, reference = arms
    assert critique["label"] == "critique" and critique["seeds"] == [0, 1]
    assert reference["label"] == "reference lr=0.001" and shared == {}
    best, final = critique["avg"]["best"], critique["avg"]["final"]
    assert best["step"] == 20 and best["value"] == pytest.approx(0.5) and best["spread"] == pytest.approx(0)
    assert final["step"] == 30 and final["value"] == pytest.approx(0.3)
    assert final["spread"] == pytest.approx(0.14142, abs=1e-4)  # std of (0.4, 0.2), n - 1
    assert critique["length"]["best"]["step"] == 20  # length is shown at the Avg-best step
    assert reference["avg"]["best"]["spread"] == pytest.approx([0.1, 0.3])  # one seed: the CI
    table = compare.comparison_table(arms, shared, markdown=True)
    lines = table.splitlines()
    assert lines[2] == "| arm | seeds | step | Pass@4 | Maj@4 | Avg@4 | len | unparsed | teacher ceiling |"
    # the final checkpoint, mean ± std over seeds (one seed: the value; its CI is behind --ci),
    # beside it the toy world's teacher with the arm's context (build.json)
    ceilings = json.load(open(os.path.join(toy_build.WORLD, "build.json")))["ceilings"]
    assert (f"| critique | 2 | 30 | 60.0 ± 28.3 | 15.0 ± 7.1 | 30.0 ± 14.1 | 300.0 ± 0.0 | 0.0 ± 0.0 | "
            f"{100 * ceilings['critique']:.1f} |") in lines
    assert f"| reference lr=0.001 | 1 | 20 | 20.0 | 5.0 | 10.0 | 200.0 | 0.0 | {100 * ceilings['reference']:.1f} |" in lines
    # the best checkpoint of the seed-mean curve, with its step
    assert "| critique | 100.0 ± 0.0 (20) | 25.0 ± 0.0 (20) | 50.0 ± 0.0 (20) | 200.0 ± 0.0 (20) |" in lines
    assert "| reference lr=0.001 | 40.0 (10) | 10.0 (10) | 20.0 (10) | 100.0 (10) |" in lines


def test_compare_labels_runs_that_differ_in_length_budget_apart(tmp_path, capsys):
    """A toy run at its world's budget is the default; one at another budget says so (quietly)."""
    import toy
    runs = [fake_run(tmp_path, "a", 0, {0: 0.1, 10: 0.3}),
            fake_run(tmp_path, "b", 0, {0: 0.1, 10: 0.3}, max_new_tokens=toy_build.budget() + 8)]
    capsys.readouterr()
    labels = [arm["label"] for arm in compare.compare_runs(runs)[0]]
    assert labels == ["critique", f"critique max_new_tokens={toy_build.budget() + 8}"]
    assert "warning" not in capsys.readouterr().err


def test_toy_table_shows_what_moved(tmp_path):
    """--compare's second table: per-step arithmetic etc. at the base, the best and the final step."""
    run = fake_run(tmp_path, "t", 0, {0: 0.1, 10: 0.3, 20: 0.2})
    rows = [json.loads(line) for line in open(os.path.join(run, "eval.jsonl"))]
    with open(os.path.join(run, "eval.jsonl"), "w") as f:
        for row, arith in zip(rows, (0.5, 0.9, 0.8)):
            row["toy"] = {"step_arith": arith, "step_chain": 1.0, "answer_own": 0.99,
                          "styles": {"plain": 1.0}, "style_accuracy": {"plain": row["avg"]}}
            f.write(json.dumps(row) + "\n")
    arms, shared = compare.compare_runs([run])
    assert arms[0]["toy"]["base"]["step_arith"] == 0.5 and arms[0]["toy"]["best"]["step_arith"] == 0.9
    assert arms[0]["toy"]["final"]["step_arith"] == 0.8
    table = compare.comparison_table(arms, shared, markdown=True)
    assert "| step_arith base | step_arith best | step_arith final |" in table
    assert "| critique | 50.0 | 90.0 | 80.0 |" in table and "plain 100" in table


def test_compare_needs_eval_jsonl(tmp_path):
    run_dir = fake_run(tmp_path, "a", 0, {})
    with pytest.raises(UserError, match="no eval.jsonl"):
        compare.compare_runs([run_dir])


# ---------------------------------------------------------------------------------------------
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


def test_analyze_writes_html_and_json(tmp_path, tiny_model_dir, monkeypatch):
    toy = pytest.importorskip("toy")
    problems = [("2+7+5", "<step_1> 2+7=9 <step_2> 9+5=15 <answer> 15"),
                ("3+4", "<step_1> 3+4=7 <answer> 7"), ("6-2+3", "<step_1> 6-2=5 <step_2> 5+3=8 <answer> 8")]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"question": q, "answer": str(eval(q)),
                                             "solution": toy.reference_solution(q)}) + "\n"
                                 for q, _ in problems))
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    cfg = selfdistill.resolve(selfdistill.Config(model=tiny_model_dir, prompts="instruct", test_file=str(test_file),
                                                 train_file=str(test_file), lora_r=2))
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump(vars(cfg), f)

    def fake_generate(model, tokenizer, prompts, max_new_tokens, *args, **kwargs):  # scripted rollouts
        texts = [t for _, t in problems][:len(prompts)]
        return [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts], [False] * len(texts)

    monkeypatch.setattr(common, "generate", fake_generate)
    summary = analyze.analyze(str(run_dir), rollouts=5)
    assert summary["critique"]["wrong"]["n"] == 2  # the right rollout is not analysed
    saved = json.loads((run_dir / "analysis" / "advantage_step_000000.json").read_text())
    assert [r["wrong_step"] for r in saved["rollouts"]] == [2, 1]
    assert set(saved["rollouts"][0]["contexts"]) == set(analyze.KINDS)
    page = (run_dir / "analysis" / "advantage_step_000000.html").read_text()
    assert page.count("<h2>") == 2 and "critique_no_prefix" in page and "http" not in page
    with pytest.raises(UserError, match="no checkpoint for step 7"):
        analyze.analyze(str(run_dir), step=7)


def test_compare_shows_both_budget_axes(tmp_path):
    """Arms with other budgets get the budget table: each arm at equal questions (the most any arm
    saw), at equal rollouts (the fewest any arm drew) and the rollouts it needed to reach a score."""
    # critique: 32 questions × 1 a step, 30 steps = 960 rollouts; grpo: 32 × 8 = 256 a step, so
    # step 4 (1,024) is the closest to 960; the rollout-matched grpo: 4 × 8 = 32 a step, 30 steps
    # = 960 rollouts but only 120 questions, so it never reaches equal questions (960)
    runs = [fake_run(tmp_path, "c0", 0, {0: 0.1, 10: 0.3, 20: 0.5, 30: 0.4}),
            fake_run(tmp_path, "g0", 0, {0: 0.1, 2: 0.15, 4: 0.2, 30: 0.6}, arm="grpo",
                     samples_per_question=8),
            fake_run(tmp_path, "m0", 0, {0: 0.1, 10: 0.2, 20: 0.25, 30: 0.3}, arm="grpo",
                     samples_per_question=8, batch_size=4, max_steps=30)]
    arms, shared = compare.compare_runs(runs)
    table = compare.comparison_table(arms, shared, markdown=True, reach=0.45)
    assert ("| arm | questions/step | rollouts/step | questions | rollouts | Avg@4 final | Avg@4 at 960 "
            "questions | Avg@4 at 960 rollouts | rollouts to Avg@4 ≥ 45 |") in table
    assert "| critique | 32 | 32 | 960 | 960 | 40.0 (30) | 40.0 (30) | 40.0 (30) | 640 |" in table
    assert "| grpo | 32 | 256 | 960 | 7680 | 60.0 (30) | 60.0 (30) | 20.0 (4) | 7680 |" in table
    assert "| grpo batch_size=4 max_steps=30 | 4 | 32 | 120 | 960 | 30.0 (30) | — | 30.0 (30) | — |" in table
    assert compare.rollouts_to_reach(arms[0], 0.5) == 640 and compare.rollouts_to_reach(arms[2], 0.9) is None
    same = compare.comparison_table(*compare.compare_runs(runs[:1]), markdown=True)
    assert "rollouts/step" not in same  # equal budgets: no budget table
    grpo_only = compare.comparison_table(*compare.compare_runs(runs[1:2]), markdown=True)
    assert "teacher ceiling" not in grpo_only  # GRPO has no teacher


def test_compare_shows_the_transfer_probe(tmp_path):
    """Transfer rows (split "transfer") stay out of the test table and get their own, base and final."""
    run = fake_run(tmp_path, "t", 0, {0: 0.1, 10: 0.3, 20: 0.5})
    with open(os.path.join(run, "eval.jsonl"), "a") as f:
        for step, avg in ((0, 0.05), (20, 0.07)):
            row = {"step": step, "n": 4, "k": 4, "questions": 7, "temperature": 1.0, "avg": avg, "pass": avg,
                   "maj": avg, "length": 1, "unparseable": 0, "truncated": 0, "split": "transfer",
                   "ci": {m: [0, 1] for m in ev.METRICS}}
            f.write(json.dumps(row) + "\n")
    arms, shared = compare.compare_runs([run])
    assert arms[0]["avg"]["final"]["value"] == 0.5 and arms[0]["avg"]["final"]["step"] == 20
    assert arms[0]["transfer"]["base"]["value"] == 0.05 and arms[0]["transfer"]["final"]["value"] == 0.07
    table = compare.comparison_table(arms, shared, markdown=True)
    assert "Transfer probe (7 problems" in table and "| critique | 5.0 | 7.0 (20) | 50.0 (20) |" in table
