"""Protects the toy world v2's levers and instruments: the departing critique examples (the
wrong result carries no loss, the rest continues from the response's own state), the trace
statistics eval.py logs, the teacher's after-error probe, the critique forms used as training
arms, the distilled span of `distill_span=through_first_divergence`, the one length budget, and
the toy reward being training's (critic.reward)."""
import random

import pytest
import torch

import contexts
import critic
import selfdistill
from toyworld import toy
from toyworld import folders
from toyworld import toy_build
from toyworld import world
from plumbing.common import UserError
from contexts import parse_steps


def test_departing_trace_continues_from_its_own_wrong_value():
    rng = random.Random(3)
    for _ in range(300):
        q = toy.random_question(rng, 3)
        text, (start, end) = toy_build.departing_trace(rng, q, "plain")
        steps, answer = parse_steps(text)
        parsed = [toy.parse_step(s) for s in steps]
        chain = toy.chain_steps(q)
        wrong = [i for i, p in enumerate(parsed) if p[3] != toy.apply(*p[:3])]
        assert len(wrong) == 1  # exactly one arithmetic slip ...
        k = wrong[0]
        assert [p[:4] for p in parsed[:k]] == chain[:k]  # ... after the critique's route
        assert text[start:end] == str(parsed[k][3])  # the no-loss span is that wrong result
        for i in range(k + 1, len(parsed)):  # then correct arithmetic from its own state
            assert parsed[i][0] == parsed[i - 1][3] and parsed[i][1:3] == chain[i][1:3]
        assert answer == str(parsed[-1][3]) != str(chain[-1][3])


def test_training_examples_mask_only_the_wrong_result():
    rng, tok = random.Random(0), toy.make_tokenizer()
    settings = folders.BuildSettings(mix=(0, 1, 0), recovery=1.0)
    for _ in range(50):
        prompt, response, no_loss = toy_build.training_example(rng, tok, settings, {})
        text = tok.decode(response[:-1])
        masked = tok.decode(response[no_loss[0]:no_loss[1]])
        steps = [toy.parse_step(s) for s in parse_steps(text)[0]]
        slip = next(p for p in steps if p[3] != toy.apply(*p[:3]))
        assert masked == str(slip[3])
    old = folders.BuildSettings(mix=(0, 1, 0), recovery=0.0)  # the v1 teacher: always the critique
    assert all(toy_build.training_example(rng, tok, old, {})[2] is None for _ in range(50))


def test_trace_stats_counts_arithmetic_chaining_and_own_answer():
    texts = ["<step_1> 2+7=9 <step_2> 9+5=14 <answer> 14",     # all right
             "<step_1> 2+7=8 <step_2> 8+5=13 <answer> 13",     # one slip, then consistent
             "<step_1> 2+7=9 <step_2> 8+5=13 <answer> 12",     # copy slip, answer not its own
             "garbage"]
    stats = toy.trace_stats(texts, [True, False, False, False])
    assert stats["step_arith"] == pytest.approx(5 / 6)
    assert stats["step_chain"] == pytest.approx(2 / 3)
    assert stats["answer_own"] == pytest.approx(2 / 3)
    assert stats["styles"] == {"plain": 0.75, "none": 0.25}
    assert stats["style_accuracy"]["plain"] == pytest.approx(1 / 3)


def test_result_offset_finds_each_result():
    text = "<step_1> 2+7=9 <step_2> 9+15=24 <answer> 24"
    assert text[toy.result_offset(text, 0):].startswith("9 <step_2>")
    assert text[toy.result_offset(text, 1):].startswith("24 <answer>")
    assert toy.result_offset(text, 2) is None


class ScriptedTeacher(torch.nn.Module):
    """A 'model' whose next-token distribution is one-hot on a fixed character: the probe must
    report that character's mass as 1 and the other's as 0."""
    def __init__(self, tok, char):
        super().__init__()
        self.vocab, self.target = len(tok), tok.convert_tokens_to_ids(char)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = torch.full((*input_ids.shape, self.vocab), -1e4)
        logits[..., self.target] = 0.0
        return type("Out", (), {"logits": logits})


def test_after_error_mass_reads_the_right_digits():
    tok = toy.make_tokenizer()
    # 2+7+5: chain 9, 14. The rollout slips at step 1 (8), then 8+5=13: state says 1, critique 1 too
    # (first digits equal: skipped). 2+7-5: chain 9, 4; rollout 8, then 8-5=3: state 3, critique 4.
    rollouts = [("2+7+5", "<step_1> 2+7=8 <step_2> 8+5=13 <answer> 13"),
                ("2+7-5", "<step_1> 2+7=8 <step_2> 8-5=3 <answer> 3")]
    state = toy.after_error_mass(ScriptedTeacher(tok, "3"), tok, rollouts)
    assert state == {"n": 1, "state_mass": pytest.approx(1.0), "critique_mass": pytest.approx(0.0)}
    told = toy.after_error_mass(ScriptedTeacher(tok, "4"), tok, rollouts)
    assert told["critique_mass"] == pytest.approx(1.0) and told["state_mass"] == pytest.approx(0.0)


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


def test_through_first_divergence_is_refused_without_a_critique():
    with pytest.raises(UserError, match="critique arm"):
        selfdistill.load_config(["--context", "reference", "distill_span=through_first_divergence"])
    selfdistill.load_config(["--context", "critique_quoting", "distill_span=through_first_divergence"])


def test_toy_runs_take_the_worlds_length_budget(capsys):
    assert selfdistill.load_config([]).max_new_tokens == folders.budget()
    selfdistill.load_config([f"max_new_tokens={folders.budget() + 1}"])
    assert "differs from the toy world's budget" in capsys.readouterr().err
    assert selfdistill.load_config(["model=some/model", "prompts=instruct"]).max_new_tokens == 512


@pytest.mark.parametrize("text, answer", [
    ("<step_1> 2+7=9 <answer> 9", "9"), ("<step_1> 2+7=9 <answer> 8", "9"), ("<answer>9", "9"),
    ("\\boxed{9}", "9"), ("<step_1> 2+7=9", "9"), ("", "9"), ("<answer> 09", "9"), ("<answer> 2+7", "9")])
def test_toy_reward_is_trainings(text, answer):
    """The toy world trains on critic.reward's exact integer check (world.exact_answers)."""
    assert world.exact_answers(selfdistill.load_config([]))
    assert toy_build.is_correct(text, answer) is (critic.reward(text, answer, exact=True) == 1.0)


def test_the_solvers_misconceptions_are_fixed_facts_written_at_their_rate():
    faults = toy_build.faulty_facts(0, 0.3)
    assert faults == toy_build.faulty_facts(0, 0.3) != toy_build.faulty_facts(1, 0.3)  # deterministic per seed
    facts = [(a, op, b) for a in range(toy.MIN_VALUE, toy.MAX_VALUE + 1) for op in "+-" for b in toy.OPERANDS
             if toy.MIN_VALUE <= toy.apply(a, op, b) <= toy.MAX_VALUE]
    assert abs(len(faults) / len(facts) - 0.3) < 0.05
    assert all(0 < abs(wrong - toy.apply(*fact)) <= 2 for fact, wrong in faults.items())
    rng, written, wrong = random.Random(7), 0, 0
    for _ in range(2000):
        q = toy.random_question(rng)
        steps = [toy.parse_step(s) for s in parse_steps(toy_build.solver_trace(rng, q, "plain", faults, 0.8))[0]]
        for i, step in enumerate(steps):
            if i:
                assert step[0] == steps[i - 1][3]  # always from its own written value
            if step[:3] in faults:
                written += 1
                wrong += step[3] == faults[step[:3]]
            else:
                assert step[3] == toy.apply(*step[:3])  # a sound fact is never wrong
    assert abs(wrong / written - 0.8) < 0.03
    assert toy_build.solver_trace(rng, "2+7+5-9", "plain", faults, 0.0) == toy.solve("2+7+5-9", "plain")
