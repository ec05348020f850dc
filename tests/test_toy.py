"""The toy world's ground truth: what the experiment's conclusions silently rest on.

Protects: the problem generator (deterministic, within its difficulty knobs); every solver trace
and reference being arithmetically sound; grouped references never sharing the chain's
intermediate values (else the reference arm is quietly aligned); the step styles round-tripping
through the parser; the rule critic's four cases (verbatim prefix, fix in the solver's style,
the wrong step never restated, the right answer); the character tokenizer round-tripping; and
the build folder's contract (a tiny build, never the real one). The levers added with v2: the
departing critique examples (the wrong result carries no loss, the rest continues from the
response's own state), the trace statistics eval.py logs, the teacher's after-error probe, the
solver's fixed misconceptions, and the toy reward being training's (critic.reward). The worlds as
folders (builds, named worlds, damage) are test_toy_worlds.py's."""
import itertools
import json
import os
import random
from collections import Counter

import pytest
import torch

import critic
import selfdistill
from toyworld import toy
from toyworld import world

from toyworld import folders
from toyworld import toy_build
from contexts import PROMPTS, parse_steps, student_prompt_ids, teacher_prompt_ids

ALL_STYLES = toy.STYLES + (toy.REFERENCE_STYLE,)


def steps_of(text):
    texts, answer = parse_steps(text)
    return [toy.parse_step(t) for t in texts], answer


def assert_sound(text, answer):
    """Every step parses, its arithmetic holds, and the last step and the answer agree."""
    steps, written = steps_of(text)
    assert steps and all(steps), text
    for a, op, b, r, _ in steps:
        assert toy.apply(a, op, b) == r, text
    assert written == answer == str(steps[-1][3]), text


def all_questions(n_ops):
    """Every chain with n_ops operations that stays within the value range."""
    moves = [(op, x) for op in "+-" for x in toy.OPERANDS]
    for first in toy.OPERANDS:
        for chain in itertools.product(moves, repeat=n_ops):
            value, ok = first, True
            for op, x in chain:
                value = toy.apply(value, op, x)
                ok &= toy.MIN_VALUE <= value <= toy.MAX_VALUE
            if ok:
                yield str(first) + "".join(f"{op}{x}" for op, x in chain)


# ---------------------------------------------------------------------------------------------
# Generator, traces, references

def test_generator_is_deterministic_and_within_knobs():
    a, b = toy.generate_problems(200, seed=3), toy.generate_problems(200, seed=3)
    assert a == b and a != toy.generate_problems(200, seed=4)
    assert len({p["question"] for p in a}) == 200 and len({p["id"] for p in a}) == 200
    for p in a:
        first, moves = toy.parse_question(p["question"])
        assert toy.MIN_OPS <= len(moves) <= toy.MAX_OPS
        assert first in toy.OPERANDS and all(x in toy.OPERANDS for _, x in moves)
        assert all(toy.MIN_VALUE <= r <= toy.MAX_VALUE for *_, r in toy.chain_steps(p["question"]))
        assert p["solution"] == toy.reference_solution(p["question"])


def test_every_trace_and_reference_is_sound():
    for p in toy.generate_problems(300, seed=0):
        q, answer = p["question"], p["answer"]
        for style in toy.STYLES:
            trace = toy.solve(q, style)
            assert_sound(trace, answer)
            steps, _ = steps_of(trace)
            assert [s[:4] for s in steps] == toy.chain_steps(q)
            assert {s[4] for s in steps} == {style}
        for order, phrasing in itertools.product(["grouped", "chain"], ["other", "same"]):
            reference = toy.reference_solution(q, order, phrasing)
            assert_sound(reference, answer)
            style = {s[4] for s in steps_of(reference)[0]}
            assert style == ({toy.REFERENCE_STYLE} if phrasing == "other" else {"plain"})
            assert (reference == toy.solve(q, "plain")) == ((order, phrasing) == ("chain", "same"))


def test_grouped_route_never_shares_the_chain_values():
    questions = [q for n in (2, 3) for q in all_questions(n)]  # exhaustive for 2 and 3 operations
    questions += [toy.random_question(random.Random(i), 4, 4) for i in range(3000)]
    for q in questions:
        chain_values = [r for *_, r in toy.chain_steps(q)]
        route = toy.grouped_route(q)
        assert [r for *_, r in route] != chain_values, q
        assert route[-1][3] == chain_values[-1], q
    assert toy.reference_solution("3+3+3") == toy.reference_solution("3+3+3")  # deterministic


# ---------------------------------------------------------------------------------------------
# Styles

def test_format_and_parse_round_trip_in_every_style():
    rng = random.Random(0)
    for style in ALL_STYLES:
        for _ in range(300):
            a, op, b = rng.randint(-40, 60), rng.choice("+-"), rng.randint(0, 40)
            r = rng.choice([toy.apply(a, op, b), rng.randint(-99, 99)])  # right or wrong result
            text = toy.format_step(a, op, b, r, style)
            assert toy.parse_step(text) == (a, op, b, r, style)
            assert toy.format_step(*toy.parse_step(text)) == text


@pytest.mark.parametrize("garbage", ["", "2+", "2+7=", "07+1=8", "2+7=9 ", " 2+7=9", "2*3=6",
                                     "add 7 to 2 9", "take 9 from 14:", "<step_1> 2+7=9", "-0+1=1",
                                     "2+-7=5", "9=2+7=9", "add to 2: 9", "two plus 7 is 9", None])
def test_parse_step_rejects_garbage(garbage):
    assert toy.parse_step(garbage) is None


# ---------------------------------------------------------------------------------------------
# The rule critic

Q, GOLD = "2+7+5-9", "5"


def test_case_a_reproduces_a_correct_rollout_exactly():
    for style in toy.STYLES:
        rollout = toy.solve(Q, style)
        assert toy.critique_case(Q, rollout, GOLD) == ("A", rollout)


def test_case_b_inserts_the_missing_step():
    rollout = "<step_1> add 7 to 2: 9 <step_2> take 9 from 14: 5 <answer> 5"
    case, critique = toy.critique_case(Q, rollout, GOLD)
    assert case == "B"
    assert critique == ("<step_1> add 7 to 2: 9 <step_2> add 5 to 9: 14 "
                        "<step_3> take 9 from 14: 5 <answer> 5")
    # A missing last step, right answer: also B, appended in the solver's style.
    case, critique = toy.critique_case(Q, "<step_1> 9=2+7 <step_2> 14=9+5 <answer> 5", GOLD)
    assert (case, critique) == ("B", "<step_1> 9=2+7 <step_2> 14=9+5 <step_3> 5=14-9 <answer> 5")


@pytest.mark.parametrize("rollout, kept", [
    ("<step_1> 9=2+7 <step_2> 14=9+", ["9=2+7"]),                 # truncated mid-step
    ("<step_1> 9=2+7 <step_2> 14=9+5 <step_3> 5=14-9", ["9=2+7", "14=9+5"]),  # no answer tag
    ("<step_1> 9=2+7 <step_2> nine plus five <step_3> 5=14-9 <answer> 5", ["9=2+7"]),  # garbage
    ("<step_2> 9=2+7 <answer> 5", []),                             # misnumbered tags
    ("", []),                                                      # nothing at all
])
def test_case_c_keeps_the_correct_prefix_and_finishes(rollout, kept):
    case, critique = toy.critique_case(Q, rollout, GOLD)
    steps, answer = parse_steps(critique)
    assert case == "C" and answer == GOLD and steps[:len(kept)] == kept
    style = "flipped" if kept else "plain"  # no parseable step: fall back to a+b=r
    assert steps == [toy.format_step(*s, style) for s in toy.chain_steps(Q)]


def test_case_d_copies_the_prefix_and_fixes_in_the_solvers_style():
    rollout = "<step_1> 2 + 7 = 9 <step_2> 9 + 5 = 15 <step_3> 15 - 9 = 6 <answer> 6"
    case, critique = toy.critique_case(Q, rollout, GOLD)
    assert case == "D"
    assert critique == "<step_1> 2 + 7 = 9 <step_2> 9 + 5 = 14 <step_3> 14 - 9 = 5 <answer> 5"
    assert "9 + 5 = 15" not in critique and "15 - 9 = 6" not in critique  # never restated
    # Right steps, wrong answer; and a correct chain with an extra step: both D.
    right = toy.solve(Q, "words")
    assert toy.critique_case(Q, right.replace("<answer> 5", "<answer> 6"), GOLD) == ("D", right)
    extra = right.replace("<answer>", "<step_4> add 0 to 5: 5 <answer>")
    assert toy.critique_case(Q, extra, GOLD) == ("D", right)


def test_critic_on_many_corrupted_attempts():
    """Property check: a sound chain trace in the solver's style, the correct prefix verbatim."""
    rng = random.Random(1)
    cases = Counter()
    for _ in range(2000):
        q = toy.random_question(rng)
        attempt = toy_build.corrupted_attempt(rng, q)
        gold = str(toy.chain_steps(q)[-1][3])
        case, critique = toy.critique_case(q, attempt, gold)
        cases[case] += 1
        assert_sound(critique, gold)
        steps, _ = steps_of(critique)
        assert [s[:4] for s in steps] == toy.chain_steps(q)
        style = toy.response_style(attempt)
        assert {s[4] for s in steps} == {"plain" if style == "none" else style}
        attempt_steps = parse_steps(attempt)[0]
        prefix = 0  # the attempt's steps that follow the chain, before its earliest error
        while prefix < len(attempt_steps) and prefix < len(steps) and \
                (toy.parse_step(attempt_steps[prefix]) or [None])[:4] == toy.chain_steps(q)[prefix]:
            prefix += 1
        assert parse_steps(critique)[0][:prefix] == attempt_steps[:prefix]
        if case == "D" and prefix < len(attempt_steps):
            assert attempt_steps[prefix] not in parse_steps(critique)[0]  # never restated
    assert set(cases) == set("ABCD"), cases


def test_gold_answer_must_fit_the_question():
    with pytest.raises(AssertionError):
        toy.rule_critique(Q, toy.solve(Q, "plain"), "6")


# ---------------------------------------------------------------------------------------------
# Tokenizer and the build folder

def test_tokenizer_round_trips_and_tags_are_single_tokens(tmp_path):
    from transformers import AutoTokenizer
    tok = toy.make_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    q = "9+8-3+7"
    texts = [toy.solve(q, s) for s in toy.STYLES] + [toy.reference_solution(q),
             toy.rule_critique(q, "<step_1> 9+8=16", "21"), PROMPTS["toy"]["critique"], "a\n b~"]
    for t in [tok, loaded]:
        assert t.padding_side == "left" and t.unk_token_id not in t(" ".join(texts)).input_ids
        for text in texts:
            assert t.decode(t(text).input_ids) == text
        for tag in toy.TAG_TOKENS + toy.SPECIAL_TOKENS:
            assert len(t(tag, add_special_tokens=False).input_ids) == 1, tag
        # Tags survive skip_special_tokens (responses are decoded that way), chat tokens do not.
        ids = student_prompt_ids(t, q, prompts="toy") + t(texts[0]).input_ids + [t.eos_token_id]
        assert t.decode(ids) == f"<|user|>{q}<|end|><|assistant|>{texts[0]}<|end|>"
        assert t.decode(ids, skip_special_tokens=True) == q + texts[0]
        teacher = teacher_prompt_ids(t, q, texts[4], "critique", prompts="toy")
        assert t.decode(teacher) == f"<|user|>{q}\nfix: {texts[4]}<|end|><|assistant|>"


def test_tiny_build_writes_a_complete_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    settings = folders.BuildSettings(steps=2, n_train=3, n_test=2, n_transfer=2, samples=2, max_correct=2,
                                       max_new_tokens=4, score_batch=8)  # max_correct <= samples
    root = str(tmp_path / "world")
    out = toy_build.ensure_built(root, progress=False, settings=settings)
    info = json.load(open(os.path.join(root, "build.json")))
    assert info["n_train"] == 3 and info["n_test"] == 2 and info["settings"]["steps"] == 2
    train = [json.loads(line) for line in open(out["train"])]
    test = [json.loads(line) for line in open(out["test"])]
    assert len(train) == 3 and len(test) == 2
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert set(train[0]) == {"id", "question", "answer", "solution"}
    tok = AutoTokenizer.from_pretrained(out["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(out["model_dir"])
    assert tok.padding_side == "left" and model.config.vocab_size == len(tok)
    stamp = os.path.getmtime(os.path.join(root, "build.json"))
    assert toy_build.ensure_built(root, progress=False, settings=settings) == out
    assert os.path.getmtime(os.path.join(root, "build.json")) == stamp  # complete: not rebuilt


# ---------------------------------------------------------------------------------------------
# The toy world v2's levers: departing examples, trace statistics, the after-error probe, the solver's faults


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
