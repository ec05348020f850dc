"""analyze.py: the per-token advantage analysis of Fig. 4, checked on CPU.

Protects: A_t = log π_T(y_t|x,c,y<t) − log π_θ(y_t|x,y<t) against a plain full forward of each
unpadded row (teacher = LoRA off, student = a non-zero LoRA), in a padded batch, with an explicit
chunk and the chunk from the memory budget; the step / first-error masks and the four analysis
contexts; the training log's advantage statistics (contexts.advantage_stats, logged every
`analysis_every` steps) on hand-computed A values and regions; the summary's error focus (n/a
where the prefix has no correct step, floored, pooled as a ratio of means); HTML escaping of
hostile tokens; the page's colour scale taken from the data; the pooled Fig. 4 alignment; what
`analyze` writes, for a run and for a model (./analysis/NAME); and its inputs: a path that is
neither run nor model, a damaged checkpoint, --rollouts below 1 and the rule critic on non-toy data
are each one `error:` line."""
import json
import os

import pytest
import torch
import yaml

import analyze
from plumbing import common
import contexts
from plumbing import sampler
import selfdistill
from plumbing.common import UserError
import eval as ev
from conftest import error_line, one_line_error, put, run_main, trip
from test_eval_inputs import tiny_run


# ---------------------------------------------------------------------------------------------
# A_t against a direct computation; the masks and contexts


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

    monkeypatch.setattr(sampler, "generate", fake_generate)
    summary = analyze.analyze(str(run_dir), rollouts=5)
    assert summary["critique"]["wrong"]["n"] == 2  # the right rollout is not analysed
    saved = json.loads((run_dir / "analysis" / "advantage_step_000000.json").read_text())
    assert [r["wrong_step"] for r in saved["rollouts"]] == [2, 1]
    assert set(saved["rollouts"][0]["contexts"]) == set(analyze.KINDS)
    page = (run_dir / "analysis" / "advantage_step_000000.html").read_text()
    assert page.count("<h2>") == 2 and "critique_no_prefix" in page and "http" not in page
    with pytest.raises(UserError, match="no checkpoint for step 7"):
        analyze.analyze(str(run_dir), step=7)


def test_focus_is_na_without_a_correct_step_and_floored():
    import torch
    A = torch.tensor([1e-6, -0.5, -0.3, 0.0])
    prefix = torch.tensor([1, 0, 0, 0], dtype=torch.bool)  # the wrong step's tag alone
    wrong = torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    after = ~(prefix | wrong)
    alone = analyze.advantage_summary(A, prefix, wrong, after, prefix_has_step=False)
    assert alone["prefix"] is None and alone["prefix_abs"] is None and alone["focus"] is None
    assert alone["wrong"] == pytest.approx(-0.4)
    # a correct prefix that teacher and student score alike: the ratio divides by the floor
    floored = analyze.advantage_summary(A, prefix, wrong, after)
    assert floored["focus"] == pytest.approx(0.4 / analyze.FOCUS_FLOOR) and floored["focus"] < 1e3
    results = [{"summary": {"critique": alone}}, {"summary": {"critique": {**floored, "prefix_abs": 0.2,
                                                                           "focus": 0.4 / 0.2}}}]
    pooled = analyze.summarize_contexts(results, ["critique"])["critique"]
    assert pooled["focus_pooled"] == {"mean": pytest.approx(2.0), "median_per_rollout": pytest.approx(2.0), "n": 1}
    assert pooled["wrong"]["n"] == 2 and pooled["prefix"]["n"] == 1
    page = analyze.render_html([fake_result([0.1, -0.5, -0.3, 0.0], alone)], ["critique"], "t", {"critique": pooled})
    assert "prefix n/a, wrong step -0.40, after +0.00, focus n/a" in page
    assert "<td>critique</td><td>2</td><td>1</td>" in page  # rollouts, and those with a correct prefix


def fake_result(A, summary, wrong_span=(1, 3)):
    return {"question": "q", "answer": "1", "tokens": ["<step_1>", " 1", "+1", "=3"][:len(A)], "step_starts": [0],
            "wrong_step": 1, "wrong_span": list(wrong_span), "contexts": {"critique": {"text": "c", "A": A}},
            "summary": {"critique": summary}}


def test_colour_scale_is_the_95th_percentile_of_the_data():
    import torch
    values = [i / 10 for i in range(-20, 21)]  # |A| = 0 … 2
    result = fake_result(values, {"prefix": None, "wrong": None, "after": None, "focus": None})
    result["tokens"] = [f"t{i}" for i in range(len(values))]
    scale = analyze.colour_scale([result], ["critique"])
    assert scale == pytest.approx(torch.quantile(torch.tensor([abs(v) for v in values]), 0.95).item())
    assert scale == pytest.approx(1.9)
    page = analyze.render_html([result], ["critique"], "t")
    assert "full colour at |A| ≥ 1.9 nats, the 95th percentile" in page
    assert 'rgba(215,48,39,1.00)" title="A = -2.000' in page  # beyond the scale: saturated
    assert 'rgba(69,117,180,0.50)" title="A = +0.950' not in page  # (0.95 is not a value here)
    assert 'rgba(215,48,39,0.53)" title="A = -1.000' in page  # 1.0 / 1.9
    zero = fake_result([0.0, 0.0], {"prefix": None, "wrong": None, "after": None, "focus": None})
    assert analyze.colour_scale([zero], ["critique"]) == 1.0


def test_aligned_advantages_by_hand(tmp_path):
    one = fake_result([0.0, -1.0, -3.0, 0.5], {}, wrong_span=(1, 3))
    two = fake_result([0.2, 0.0, -1.0], {}, wrong_span=(2, 3))
    curve = analyze.aligned_advantages([one, two], ["critique"], window=2)["critique"]
    # offsets: one at -1..2 (0.0, -1.0, -3.0, 0.5), two at -2..0 (0.2, 0.0, -1.0)
    assert curve["offset"] == [-2, -1, 0, 1, 2] and curve["n"] == [1, 2, 2, 1, 1]
    assert curve["mean"] == pytest.approx([0.2, 0.0, -1.0, -3.0, 0.5])
    assert curve["se"][0] is None and curve["se"][1] == pytest.approx(0.0)
    pytest.importorskip("matplotlib")
    path = analyze.plot_aligned({"critique": curve}, [one, two], str(tmp_path / "a.png"), "t")
    assert path and open(path, "rb").read(4) == b"\x89PNG"


def test_analyze_of_a_model_writes_under_analysis_name(tmp_path, tiny_model_dir, monkeypatch):
    """A model (not a run) is analysed into ./analysis/<its folder name>/: the HTML page opens with
    the summary table, the JSON carries the colour scale and the pooled curve, and with matplotlib
    the pooled Fig. 4 PNG is written beside the per-rollout one."""
    toy = pytest.importorskip("toy")
    problems = [("2+7+5", "<step_1> 2+7=9 <step_2> 9+5=15 <answer> 15"),
                ("6-2+3", "<step_1> 6-2=5 <step_2> 5+3=8 <answer> 8")]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"question": q, "answer": str(eval(q)),
                                             "solution": toy.reference_solution(q)}) + "\n" for q, _ in problems))

    def scripted(model, tokenizer, prompts, *args, **kwargs):
        texts = [t for _, t in problems][:len(prompts)]
        return [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts], [False] * len(texts)

    monkeypatch.setattr(sampler, "generate", scripted)
    monkeypatch.chdir(tmp_path)
    analyze.analyze(tiny_model_dir, [f"test_file={test_file}", "threads=1"], rollouts=2)
    out = tmp_path / "analysis" / os.path.basename(tiny_model_dir)
    saved = json.loads((out / "advantage_step_000000.json").read_text())
    assert [r["wrong_step"] for r in saved["rollouts"]] == [2, 1]
    critique = saved["summary"]["critique"]
    assert critique["prefix"]["n"] == 1 and critique["wrong"]["n"] == 2  # step 1 wrong: no prefix
    assert saved["rollouts"][1]["summary"]["critique"]["focus"] is None
    assert saved["colour_scale"] > 0 and set(saved["aligned"]) == set(analyze.KINDS)
    page = (out / "advantage_step_000000.html").read_text()
    assert page.index("<table>") < page.index("<h2>") and "error focus, pooled" in page
    if common.pyplot() is not None:
        assert (out / "advantage_step_000000_aligned.png").exists()


# ---------------------------------------------------------------------------------------------
# analyze.py's inputs: each a one-line error


@pytest.mark.bad_input
def test_analyze_on_a_path_that_is_neither_run_nor_model(tmp_path, capsys):
    missing = tmp_path / "runs" / "critque-s0"
    line = error_line([str(missing)], capsys, script=analyze)
    assert line == f"error: {missing} is neither a run folder (no config.yaml) nor a model folder"


@pytest.fixture
def analysed_run(tiny_model_dir, data, tmp_path):
    run = tiny_run(tmp_path, tiny_model_dir, data)
    cfg = ev.load_run_config(run)
    model, tokenizer = common.load_model(cfg, tiny_model_dir, torch.device("cpu"))
    model.save_pretrained(os.path.join(run, "checkpoints", "step_000002"))
    return run, os.path.join(run, "checkpoints", "step_000002", "adapter_model.safetensors")


@pytest.mark.bad_input
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


@pytest.mark.bad_input
@pytest.mark.parametrize("rollouts", ["0", "-1"])
def test_analyze_rollouts_below_one(rollouts, capsys, monkeypatch):
    trip(monkeypatch, analyze, "target_config")
    code, _, err = run_main(["toy", "--rollouts", rollouts], capsys, analyze)
    one_line_error(code, err, "--rollouts must be at least 1")


@pytest.mark.bad_input
def test_analyze_with_the_rule_critic_on_non_toy_data_is_one_line(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "words.jsonl"
    put(str(path), json.dumps({"question": "What is two plus two?", "answer": "4", "solution": "2+2=4"}) + "\n")
    code, _, err = run_main([tiny_model_dir, f"test_file={path}", f"train_file={path}", "--out",
                             str(tmp_path / "a")], capsys, script=analyze)
    one_line_error(code, err, "critic=rule critiques toy arithmetic chains only")
