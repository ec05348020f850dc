"""critic.py: the reward and the critique, checked on CPU in seconds with no downloads.

Protects: answer extraction and equivalence (the binary reward every arm logs and GRPO trains on);
the validity rules that decide which critiques enter the loss (verbatim prefix kept, retyped steps
and malformed critiques dropped); think-block removal; the local HF critic on a tiny model; the
HTTP critic's contract against a local OpenAI-compatible server (the key is sent but never shown,
timeouts and garbage become None after bounded retries, 5xx is retried, other 4xx is not, an
unreachable server fails at startup with one line); which critic a config builds (critic=rule:
the toy world's toy.RuleCritic through world.make_judge; critic.make_critic and
critic.from_config build the model critics, hf and http, only)."""
import json
import socket
import time

import pytest

import selfdistill
from toyworld import toy
from plumbing.common import UserError
from critic import (Failure, HFCritic, HTTPCritic, answers_match, clean_critique, critic_prompt, extract_answer,
                    from_config, make_critic, reward, validate_critique)
from toyworld.toy import RuleCritic
from toyworld import world

# ---------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize("text, expected", [
    ("<step_1> 2+7=9 <step_2> 9-4=5 <answer> 5", "5"),
    ("<answer> 3 </answer> later <answer>\n  7\nmore text", "7"),       # last tag, next line
    ("<answer>42</answer> trailing", "42"),
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),       # balanced braces
    ("\\boxed{1} then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),               # the last box
    ("<answer>   \n", None),                                           # empty answer, no box
    ("\\boxed{\\frac{1}{2", None),                                       # cut-off box
    ("no answer here", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold", [
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("$\\dfrac{1}{2}$", "1/2"),
    ("\\frac12", "0.50"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("-3", "-3.0"),
    ("-\\frac{3}{4}", "-0.75"),
    ("\\frac{-3}{4}", "-0.75"),
    ("x = 5.", "5"),
    ("\\text{(B)}", "(B)"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("90^\\circ", "90"),
    ("12", 12),
])
def test_answers_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("0.333", "1/3"),        # no rounding tolerance
    ("1,2", "12"),           # a pair is not a thousands number
    ("-5", "5"),
    ("garbage", "5"),
    ("", ""),
    (None, "5"),
    ("1/0", "0"),
])
def test_answers_do_not_match(pred, gold):
    assert not answers_match(pred, gold)


def test_reward_is_binary():
    assert reward("<step_1> 2+3=5 <answer> 5", "5") == 1.0
    assert reward("<step_1> 2+3=6 <answer> 6", "5") == 0.0
    assert reward("no tags at all", "5") == 0.0


# ---------------------------------------------------------------------------------------------
# Critique text

ROLLOUT = "<step_1> 2+7=9 <step_2> 9+5=13 <step_3> 13-9=4 <answer> 4"


@pytest.mark.parametrize("critique, valid, reason", [
    ("<step_1> 2+7=9 <step_2> 9+5=14 <step_3> 14-9=5 <answer> 5", True, "ok"),     # case D
    ("<step_1> 2 + 7 = 10 <step_2> 10+5=15 <answer> 6", True, "ok"),              # error at step 1
    (ROLLOUT, True, "ok"),                                                          # case A
    ("<step_1> 2+7=9 <step_2> 9 + 5 = 13 <step_3> 13-9=4 <answer> 4", False, "retypes"),
    ("<step_1> 2+7=9 <step_2> 9+5=13 <step_3> 13-9=4", False, "no answer"),
    ("<step_1> 2+7=9 <step_2> 9+5=14 <answer>  ", False, "no answer"),
    ("2+7=9, 9+5=14, 14-9=5 <answer> 5", False, "no step tags"),
    ("<step_1> 2+7=9 <step_3> 9+5=14 <answer> 5", False, "bad step tags"),
    ("<step_1> 2+7=9 <step_2> <answer> 5", False, "empty"),
    ("\x00\ufffd<<<step_>>> }{ <answer", False, "no step tags"),
    (None, False, "no critique"),
])
def test_validate_critique(critique, valid, reason):
    ok, why = validate_critique(ROLLOUT, critique)
    assert ok is valid and reason in why


def test_validate_critique_right_answer_rewrite_is_invalid():
    right = "<step_1> 2+7=9 <step_2> 9+5=14 <step_3> 14-9=5 <answer> 5"
    rewrite = "<step_1> 2+5=7 <step_2> 7-9+7=5 <answer> 5"      # a different route, same answer
    ok, why = validate_critique(right, rewrite)
    assert not ok and "rewrites" in why
    skipped = "<step_1> 2+7=9 <step_2> 14-9=5 <answer> 5"            # right answer, a step missing
    assert validate_critique(skipped, right) == (True, "ok")                  # case B: inserted


def test_validate_critique_against_gold():
    fixed = "<step_1> 2+7=9 <step_2> 9+5=14 <step_3> 14-9=5 <answer> 5"
    assert validate_critique(ROLLOUT, fixed, gold="5") == (True, "ok")
    assert not validate_critique(ROLLOUT, fixed, gold="6")[0]


@pytest.mark.parametrize("rollout", [
    "2+7=9 then 9+5 is", "<step_2> oops <step_1> x", None, 12345])            # case C, garbage
def test_validate_critique_unparseable_rollout(rollout):
    assert validate_critique(rollout, "<step_1> 2+7=9 <step_2> 9+5=14 <answer> 14") == (True, "ok")


@pytest.mark.parametrize("raw, cleaned", [
    ("<think>step 1 is wrong... <step_1> draft</think>\n<step_1> a <answer> 1", "<step_1> a <answer> 1"),
    ("the template opened it\n<step_1> draft </think> <step_1> a <answer> 1", "<step_1> a <answer> 1"),
    ("<think>ran out of tokens <step_1> draft", ""),
    ("Here is the trace:\n<step_1> a <step_2> b <answer> 2\n", "<step_1> a <step_2> b <answer> 2"),
    ("no tags", "no tags"),
])
def test_clean_critique(raw, cleaned):
    assert clean_critique(raw) == cleaned


def test_critic_prompt_carries_inputs_verbatim():
    prompt = critic_prompt("Find $\\frac{a}{b}$ {x}", "<step_1> {y} <answer> 2", "sol {z}", "3")
    for piece in ["Find $\\frac{a}{b}$ {x}", "<step_1> {y} <answer> 2", "sol {z}", "answer: 3"]:
        assert piece in prompt


# ---------------------------------------------------------------------------------------------
# Critics on local models and servers

ARGS = (["2+7+5"], ["<step_1> 2+7=9 <step_2> 9+5=13 <answer> 13"], ["7+5=12, 12+2=14"], ["14"])
GOOD = "<step_1> 2+7=9 <step_2> 9+5=14 <answer> 14"


def test_hf_critic_on_tiny_model(tiny_model_dir):
    hf = HFCritic(tiny_model_dir, max_new_tokens=8, batch_size=2)
    out = hf(*(column * 3 for column in ARGS))                   # 3 prompts: batches of 2 and 1
    assert len(out) == 3 and all(isinstance(o, (Failure, str)) for o in out)
    assert not any(p.requires_grad for p in hf.model.parameters()) and not hf.model.training


def test_hf_critic_needs_a_chat_template(no_template_model_dir):
    with pytest.raises(ValueError, match="chat template"):
        HFCritic(no_template_model_dir)


@pytest.fixture
def server(critic_server):
    critic_server.critique = "<think>let me check</think>\n" + GOOD  # the think block is removed
    return critic_server


def test_http_critic_sends_key_and_hides_it(server, monkeypatch):
    monkeypatch.setenv("CRITIC_TEST_KEY", "sk-secret-123")
    http = HTTPCritic(server.url, "critic-model", api_key_env="CRITIC_TEST_KEY", timeout=5)
    http.check()
    assert http(*(column * 2 for column in ARGS)) == [GOOD, GOOD]
    headers, body = server.requests[0]
    assert headers["Authorization"] == "Bearer sk-secret-123"
    assert body["model"] == "critic-model" and body["temperature"] == 0
    assert "sk-secret" not in repr(http) and "sk-secret" not in str(http)
    assert "sk-secret" not in json.dumps(vars(http))


def test_http_critic_timeout_gives_none_quickly(server):
    server.replies = "slow"
    http = HTTPCritic(server.url, "critic-model", timeout=0.5, retries=1, backoff=0.05)
    start = time.time()
    assert http(*ARGS) == [Failure("critic_error")]
    assert len(server.requests) == 2 and time.time() - start < 3


@pytest.mark.parametrize("mode, answer, attempts", [
    ("not_json", Failure("critic_error"), 1), ("400", Failure("critic_error"), 1), ("flaky", GOOD, 2)])
def test_http_critic_failures_and_retries(server, mode, answer, attempts):
    server.replies = mode
    http = HTTPCritic(server.url, "critic-model", timeout=5, retries=2, backoff=0.01)
    assert http(*ARGS) == [answer]
    assert len(server.requests) == attempts


def test_http_check_wrong_model(server):
    with pytest.raises(ValueError, match="does not serve"):
        HTTPCritic(server.url, "other-model").check()


def test_http_check_unreachable():
    with socket.socket() as s:          # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ConnectionError, match=f"critic at {url} is unreachable") as info:
        HTTPCritic(url, "m", timeout=2).check()
    assert "\n" not in str(info.value)


def test_make_critic_and_rule_critic(monkeypatch):
    # the rule critic is the toy world's program, called once per sample with (q, response, gold)
    assert RuleCritic()(*ARGS) == [GOOD]
    monkeypatch.setattr(toy, "rule_critique", lambda q, r, a: f"{q}|{r}|{a}")
    rule = RuleCritic()
    assert rule(*ARGS) == [f"{ARGS[0][0]}|{ARGS[1][0]}|14"]
    rule.check()  # nothing to check, and no error
    # make_critic builds the model critics only; "rule" is no longer one of its kinds
    assert isinstance(make_critic("http", base_url="http://x/v1", model="m"), HTTPCritic)
    with pytest.raises(ValueError, match="unknown critic 'gpt'"):
        make_critic("gpt")
    with pytest.raises(ValueError, match="unknown critic 'rule'"):
        make_critic("rule")


def test_make_judge_and_from_config(server):
    judge = world.make_judge(selfdistill.Config(critic="rule"), "cpu")
    assert isinstance(judge, RuleCritic)
    cfg = selfdistill.Config(critic="http", critic_url=server.url, critic_model="critic-model",
                             critic_timeout=5)
    judge = world.make_judge(cfg, "cpu")
    assert isinstance(judge, HTTPCritic) and judge.base_url == server.url and judge.model == "critic-model"
    assert judge(*ARGS) == [GOOD]
    assert isinstance(from_config(cfg, "cpu"), HTTPCritic)
    cfg.critic_model = "other-model"  # checked once, at construction: a one-line user error
    with pytest.raises(UserError, match="does not serve 'other-model'") as e:
        from_config(cfg, "cpu")
    assert "\n" not in str(e.value)
