"""Protects the token alignment the loss depends on: the student row and the teacher row carry
identical response ids at identical grid positions, padding is on the left only, the context (and
never the question or the final instruction) is what truncation cuts, and step tags round-trip; the
critique forms used as training arms, and the distilled span of
`distill_span=through_first_divergence`."""
import pytest
import torch

import contexts
from toyworld import toy


def test_response_ids_identical_across_rows_with_real_template(tiny):
    model, tok = tiny
    questions = ["2+3", "7-1+4"]
    critiques = ["<step_1> 2+3=5 <answer> 5", "<step_1> 7-1=6 <step_2> 6+4=10 <answer> 10" * 5]
    responses = [tok("<step_1> 2+3=5 <answer> 5", add_special_tokens=False)["input_ids"]
                 + [tok.eos_token_id], tok("<step_1> 7", add_special_tokens=False)["input_ids"]]
    student = [contexts.student_prompt_ids(tok, q, thinking=False) for q in questions]
    teacher = [contexts.teacher_prompt_ids(tok, q, c, "critique", thinking=True)
               for q, c in zip(questions, critiques)]
    assert len(set(map(len, teacher))) == 2  # contexts of different lengths in one batch
    s, t = contexts.build_pair(student, teacher, responses, tok.pad_token_id)
    T = s["response_mask"].shape[1]
    assert T == max(map(len, responses))
    for b, r in enumerate(responses):
        for rows in (s, t):
            assert rows["input_ids"][b, -len(r):].tolist() == r
            assert rows["response_mask"][b].sum() == len(r)
            # left padding only: once a row starts, every later position is a real token
            start = int(rows["attention_mask"][b].argmax())
            assert rows["attention_mask"][b, start:].all() and not rows["attention_mask"][b, :start].any()
            assert rows["position_ids"][b, start:].tolist() == list(range(rows["attention_mask"][b].sum()))


def test_left_padded_row_equals_unpadded_forward(tiny):
    """With position ids from the mask, a padded row's response logits equal the unpadded row's."""
    model, tok = tiny
    prompts = [[5, 6, 7], [5, 6, 7, 8, 9, 10, 11]]
    responses = [[20, 21, 22], [30, 31]]
    rows = contexts.build_rows(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        batched = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                        position_ids=rows["position_ids"]).logits
        for b in range(2):
            alone = model(input_ids=torch.tensor([prompts[b] + responses[b]])).logits
            n = len(prompts[b]) + len(responses[b])
            torch.testing.assert_close(batched[b, -n:], alone[0], rtol=1e-5, atol=1e-5)


def test_truncation_cuts_the_middle_of_the_context_only(tiny):
    _, tok = tiny
    context = "HEAD " + "x" * 500 + " TAIL"
    ids = contexts.teacher_prompt_ids(tok, "QUESTION 1+1", context, "reference", max_context_tokens=40)
    text = tok.decode(ids)
    assert contexts.TRUNCATION_MARKER in text
    assert "QUESTION 1+1" in text and "HEAD" in text and "TAIL" in text
    assert "Now write your solution in the step format above." in text
    full = tok.decode(contexts.teacher_prompt_ids(tok, "QUESTION 1+1", context, "reference"))
    assert len(text) < len(full) and contexts.TRUNCATION_MARKER not in full


def test_thinking_flag_reaches_the_template(tiny):
    _, tok = tiny
    off = tok.decode(contexts.student_prompt_ids(tok, "1+1", thinking=False))
    on = tok.decode(contexts.student_prompt_ids(tok, "1+1", thinking=True))
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")


def test_missing_chat_template_is_a_one_line_error(no_template_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(no_template_model_dir)
    with pytest.raises(ValueError, match="no chat template") as e:
        contexts.check_chat_template(tok, "m")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,steps,answer", [
    ("<step_1> 2+7=9 <step_2> 9+5=14 <answer> 14", ["2+7=9", "9+5=14"], "14"),
    ("<step_1> a", ["a"], None),
    ("no tags", [], None),
])
def test_parse_steps(text, steps, answer):
    assert contexts.parse_steps(text) == (steps, answer)


def test_parse_steps_rejects_bad_numbering_and_render_round_trips():
    with pytest.raises(ValueError):
        contexts.parse_steps("<step_2> a <answer> 1")
    text = contexts.render_steps(["2+7=9", "9-3=6"], "6")
    assert contexts.parse_steps(text) == (["2+7=9", "9-3=6"], "6")


# ---------------------------------------------------------------------------------------------
# The critique forms used as training arms, and the distilled span


def test_critique_forms():
    response = "<step_1> 2+7=9 <step_2> 9+5=15 <step_3> 15-9=6 <answer> 6"
    critique = "<step_1> 2+7=9 <step_2> 9+5=14 <step_3> 14-9=5 <answer> 5"
    assert contexts.critique_form("critique", response, critique) == critique
    assert contexts.critique_form("critique_quoting", response, critique) == (
        "<step_1> 2+7=9 <step_2> 9+5=15 is wrong; correct: 9+5=14 <step_3> 14-9=5 <answer> 5")
    assert contexts.critique_form("critique_no_prefix", response, critique) == (
        "<step_1> 9+5=14 <step_2> 14-9=5 <answer> 5")
    assert contexts.critique_form("critique_no_prefix", response, critique, toy.restyle_step) == (
        "<step_1> 2 plus 7 is 9 <step_2> 9 plus 5 is 14 <step_3> 14 minus 9 is 5 <answer> 5")
    assert contexts.critique_form("critique_quoting", critique, critique) == critique  # correct rollout


def test_departure_index_and_distilled_span():
    assert contexts.departure_index([1, 2, 3, 9], [1, 2, 3]) == 3  # the critique then EOS
    assert contexts.departure_index([1, 2, 4, 5], [1, 2, 3, 4]) == 2
    assert contexts.departure_index([7], [1]) == 0
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    span = contexts.distilled_span(mask, [2, None])  # row 0: its first 2 of 3 tokens
    assert span.tolist() == [[False, True, True, False], [True, True, True, True]]
