"""Protects the config contract: defaults in one dataclass, YAML and key=value overrides, and a
one-line error (never a silent default) for unknown keys, wrong types, missing or malformed files
and contradictory settings; every key's own range and choices (selfdistill.RANGES and CHOICES) from
one table-driven test, its edges kept; non-finite numbers, integers past INT_LIMIT, keys or flags
given twice and settings the arm or the world does not use, each one line before anything runs."""
import functools
import math
import os
import subprocess
import sys

import pytest

from plumbing import options
import selfdistill
from toyworld import folders
from plumbing.common import UserError
from selfdistill import load_config
from conftest import one_line_error, run_main, run_settings, trip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
settings = functools.partial(run_settings, max_new_tokens=6, max_steps=2, lr=0.05)


def error_of(argv):
    with pytest.raises(UserError) as e:
        load_config(argv)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_defaults_and_derived_values():
    cfg = load_config([])
    assert cfg.arm == "critique" and cfg.samples_per_question == 1 and cfg.run == "critique-s0"
    cfg = load_config(["--context", "grpo", "seed=3"])
    assert cfg.arm == "grpo" and cfg.samples_per_question == 8 and cfg.run == "grpo-s3"
    # --context NAME sets the field `arm`; as key=value the field is written arm=NAME
    cfg = load_config(["arm=reference"])
    assert cfg.arm == "reference" and cfg.run == "reference-s0"


def test_prompts_follow_the_model(tiny_model_dir, tmp_path):
    """auto: the toy prompt (the bare question) only for a toy-world model, instruct for any other;
    prompts=toy on a chat model is refused in one line rather than trained silently."""
    assert load_config([]).prompts == "toy"
    assert load_config([f"model={tiny_model_dir}"]).prompts == "instruct"
    assert load_config(["model=Qwen/Qwen3-1.7B"]).prompts == "instruct"
    assert load_config([f"model={tiny_model_dir}", "prompts=instruct"]).prompts == "instruct"
    assert "prompts=toy" in error_of([f"model={tiny_model_dir}", "prompts=toy"])
    world = tmp_path / "world"  # any built toy world: build.json beside its model folder
    os.makedirs(world / "model")
    (world / "build.json").write_text('{"settings": {"max_new_tokens": 40}}')
    assert load_config([f"model={world / 'model'}"]).prompts == "toy"
    assert load_config(["model=toy", "prompts=instruct"]).prompts == "instruct"  # allowed: an ablation


def test_the_length_budget_follows_the_world(tiny_model_dir, tmp_path):
    """max_new_tokens=0: a toy-world model's budget comes from its own world's build.json (the
    shipped world's for model=toy), 512 for any other model."""
    world = tmp_path / "world"
    os.makedirs(world / "model")
    (world / "build.json").write_text('{"settings": {"max_new_tokens": 40}}')
    assert load_config(["model=toy"]).max_new_tokens == folders.budget()
    assert load_config([f"model={folders.WORLD}/model"]).max_new_tokens == folders.budget()
    assert load_config([f"model={world / 'model'}"]).max_new_tokens == 40
    assert load_config([f"model={tiny_model_dir}"]).max_new_tokens == 512


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nbatch_size: 8\nmicro_batch: 8\ntopk_tail: true\n")
    cfg = load_config(["--config", str(path), "batch_size=16", "--run", "x"])
    assert cfg.lr == 0.001 and cfg.batch_size == 16 and cfg.topk_tail is True and cfg.run == "x"


def test_yaml_numbers_for_float_fields_are_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\n")
    assert load_config(["--config", str(path)]).lr == 1.0
    path.write_text("lr: 1e-3\n")  # a string to YAML 1.1, a number to the user
    assert load_config(["--config", str(path)]).lr == 0.001
    path.write_text("lr: fast\n")
    assert "wants a number" in error_of(["--config", str(path)])


def test_unknown_key_names_the_nearest_valid_key(tmp_path):
    assert "did you mean 'lr'" in error_of(["lrr=0.1"])
    path = tmp_path / "c.yaml"
    path.write_text("bach_size: 4\n")
    assert "did you mean 'batch_size'" in error_of(["--config", str(path)])


@pytest.mark.parametrize("argv,fragment", [
    (["lr=fast"], "wants a number"),
    (["batch_size=2.5"], "wants an integer"),
    (["topk_tail=maybe"], "wants true or false"),
    (["divergence=kl"], "must be one of forward|reverse|jsd"),
    (["noequals"], "expected key=value"),
])
def test_wrong_values_on_the_command_line(argv, fragment):
    assert fragment in error_of(argv)


def test_wrong_types_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: '32'\n")
    assert "wants an integer" in error_of(["--config", str(path)])
    path.write_text("gradient_checkpointing: 1\n")
    assert "wants true or false" in error_of(["--config", str(path)])


def test_missing_and_malformed_files(tmp_path):
    assert "not found" in error_of(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\nbatch_size: 3\n")
    assert "not valid YAML" in error_of(["--config", str(bad)])
    bad.write_text("- a\n- b\n")
    assert "mapping" in error_of(["--config", str(bad)])


@pytest.mark.parametrize("argv,fragment", [
    (["--context", "grpo", "samples_per_question=1"], "samples_per_question >= 2"),
    (["batch_size=6", "micro_batch=4"], "not divisible"),
    (["support=sampled"], "divergence=reverse"),
    (["critic=http"], "critic_url"),
    (["jsd_alpha=2"], "jsd_alpha"),
    (["temperature=0"], "at least 0.001"),  # as evaluation refuses (eval.MIN_TEMPERATURE)
    (["micro_batch=0"], "at least 1"),
])
def test_contradictory_settings(argv, fragment):
    assert fragment in error_of(argv)


def test_help_lists_every_field_with_its_comment():
    out = subprocess.run([sys.executable, "selfdistill.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    comments = options.field_help(selfdistill.Config)
    for name in options.fields_of(selfdistill.Config):
        assert name in out and comments[name][:20] in out, name


def test_user_error_is_one_line_on_stderr_with_exit_code_2():
    result = subprocess.run([sys.executable, "selfdistill.py", "lrr=1"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'lrr' (did you mean 'lr'?)"
    result = subprocess.run([sys.executable, "selfdistill.py", "--context", "dpo"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'dpo'" in result.stderr
    assert result.stderr.startswith("error: argument --context") and len(result.stderr.splitlines()) == 1
    result = subprocess.run([sys.executable, "selfdistill.py", "--context", "critque"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "did you mean 'critique'?" in result.stderr


# ---------------------------------------------------------------------------------------------
# Every key's own range and choices, from the tables beside main() (selfdistill.RANGES, CHOICES)


def range_edges(key):
    """(values just outside RANGES[key], values on its edges inside it), as the command line writes
    them: each finite bound and its neighbour across it (the next integer, or the next float). A
    default of 0 outside the range is a placeholder resolved later (samples_per_question,
    max_new_tokens), so -1 stands for the value below it."""
    interval = selfdistill.RANGES[key]
    low, high, with_low, with_high = options.interval_parts(interval)
    default = options.fields_of(selfdistill.Config)[key].default
    whole = isinstance(default, int)
    beyond = (lambda x, d: int(x) + d) if whole else (lambda x, d: math.nextafter(x, x + d))
    outside, inside = [], []
    for bound, included, away in ((low, with_low, -1), (high, with_high, 1)):
        if math.isfinite(bound):
            (inside if included else outside).append(int(bound) if whole else bound)
            (outside if included else inside).append(beyond(bound, away if included else -away))
    outside = [-1 if value == 0 == default else value for value in outside]
    return outside, inside


def text(value):
    return str(value) if isinstance(value, int) else repr(float(value))


@pytest.mark.bad_input
@pytest.mark.parametrize("table, key", [("RANGES", key) for key in selfdistill.RANGES]
                         + [("CHOICES", key) for key in selfdistill.CHOICES], ids=lambda v: v)
def test_each_range_and_choice_refuses_a_value_outside_it_and_keeps_its_edges(table, key, tmp_path, capsys,
                                                                             monkeypatch):
    """Every entry of RANGES and CHOICES, the tables options.py enforces: a value just outside (or
    not among the choices) is one `error:` line naming the key and its rule, before anything is
    written; the edge values inside (every choice) pass the same checks. Rules between keys are
    check_consistency's (test_contradictory_settings and the tests below)."""
    trip(monkeypatch, selfdistill, "train")  # a value wrongly accepted would start training
    fields = options.fields_of(selfdistill.Config)
    if table == "RANGES":
        outside, inside = range_edges(key)
        assert outside and inside, key
        whole = isinstance(fields[key].default, int)
        for value in outside:
            code, _, err = run_main([f"{key}={text(value)}", f"out_dir={tmp_path}"], capsys)
            rule = (f"lie in 0..{options.INT_LIMIT}" if whole and value < 0
                    else options.range_words(selfdistill.RANGES[key], whole))
            one_line_error(code, err, f"config key '{key}' must {rule}, got ")
        resolved = vars(load_config([]))  # the placeholders (samples_per_question, max_new_tokens) filled in
        for value in inside:
            values = options.parse_overrides(selfdistill.Config, selfdistill.CHOICES, [f"{key}={text(value)}"])
            options.check_numbers(selfdistill.Config(**{**resolved, **values}), selfdistill.RANGES)
            assert values[key] == value
    elif key == "context":  # the flag that names the arm: argparse's refusal, as one line (options.Parser)
        code, _, err = run_main(["--context", "no_such_choice", f"out_dir={tmp_path}"], capsys)
        one_line_error(code, err, "invalid choice: 'no_such_choice'")
        for choice in selfdistill.CHOICES[key]:
            values = options.parse_command_line(selfdistill.Config, selfdistill.CHOICES, ["--context", choice], "")
            assert values["context"] == choice
    else:
        code, _, err = run_main([f"{key}=no_such_choice", f"out_dir={tmp_path}"], capsys)
        one_line_error(code, err, f"config key '{key}' must be one of {'|'.join(selfdistill.CHOICES[key])}")
        for choice in selfdistill.CHOICES[key]:
            assert options.parse_overrides(selfdistill.Config, selfdistill.CHOICES, [f"{key}={choice}"])[key] == choice
    assert key in fields or key == "context"
    assert not os.listdir(tmp_path)  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# Config files and the command line: more mistakes, each one line


@pytest.mark.bad_input
def test_config_pointing_at_a_directory_is_one_line_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "selfdistill.py", "--config", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"error: config file {tmp_path} not found\n"


@pytest.mark.bad_input
@pytest.mark.parametrize("yaml_text, argv_extra, fragment", [
    (None, ["configs/smoke.yaml"], "expected key=value, got 'configs/smoke.yaml'"),  # forgot --config
    ("lr:\n", [], "config key 'lr' wants a number, got None"),
    ("optim:\n  lr: 0.001\n", [], "unknown config key 'optim'"),  # Hydra-style sections
    (None, ["critic=hf"], "critic=hf needs critic_model"),
], ids=["yaml-without---config", "key-without-value", "nested-section", "hf-critic-without-model"])
def test_config_mistakes_are_one_line(yaml_text, argv_extra, fragment, tmp_path):
    argv = list(argv_extra)
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = ["--config", str(tmp_path / "c.yaml")] + argv
    assert fragment in error_of(argv)


@pytest.mark.bad_input
def test_a_key_given_twice_in_yaml_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.001\nbatch_size: 8\nlr: 0.01\n")
    assert "'lr'" in error_of(["--config", str(tmp_path / "c.yaml")])


@pytest.mark.bad_input
def test_yaml_infinity_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lr: .inf\n")
    code, _, err = run_main(["--config", str(path)], capsys)
    one_line_error(code, err, "'lr' must be a finite number")


@pytest.mark.bad_input
def test_a_config_file_in_another_encoding(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes("lr: 0.001  # réglé\n".encode("latin-1"))
    code, _, err = run_main(["--config", str(path)], capsys)
    one_line_error(code, err, "is not UTF-8 text")


# ---------------------------------------------------------------------------------------------
# Values no range table holds: non-finite numbers, integers past INT_LIMIT, rules between keys


@pytest.mark.bad_input
@pytest.mark.parametrize("argv, key", [
    (["epochs=0"], "epochs"),                       # max(1, ...): one step anyway
    (["support=topk", "topk=0"], "topk"),           # empty support: loss 0, nothing trains
    (["model=/some/chat/model", "toy_order=chain"], "toy_order"),  # toy-only knob, ignored
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_rules_between_keys_are_one_line_errors(argv, key):
    assert key in error_of(argv)


@pytest.mark.bad_input
@pytest.mark.parametrize("override, fragment", [
    ("grad_clip=nan", "'grad_clip' must be a finite number"),
    ("lr=inf", "'lr' must be a finite number"),
    ("temperature=-inf", "'temperature' must be a finite number"),
    ("ema_rate=nan", "'ema_rate' must be a finite number"),
    ("seed=-1", "'seed' must lie in 0.."),
    ("max_steps=99999999999", "'max_steps' must lie in 0.."),
    ("critic_timeout=0", "'critic_timeout' must be positive"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(override, fragment, tiny_model_dir, data, tmp_path, capsys):
    key, value = override.split("=", 1)  # in place of the setting's default (a key twice is an error)
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path, **{key: value}), capsys)
    one_line_error(code, err, fragment)
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.bad_input
@pytest.mark.parametrize("override, fragment", [
    ("lora_alpha=-4", "'lora_alpha' must lie in 0.."),
    ("critic_retries=11", "'critic_retries' must lie in 0..10"),
])
def test_settings_that_would_never_learn_or_wait_too_long(override, fragment, tiny_model_dir, data, tmp_path,
                                                          capsys):
    code, _, err = run_main(settings(tiny_model_dir, data, tmp_path) + [override], capsys)
    one_line_error(code, err, fragment)
    assert not any(tmp_path.iterdir())


@pytest.mark.bad_input
@pytest.mark.parametrize("argv, fragment", [
    (["--explain", "0"], "--explain N shows N rollouts of one step: N must be at least 1, got 0"),
    (["--explain=-3"], "N must be at least 1, got -3"),
    (["--explain", "-1"], "N must be at least 1"),
    (["--context", "critique", "grpo_beta=0.1"], "'grpo_beta' shapes GRPO's policy-gradient loss, which the critique arm"),
    (["--context", "reference", "grpo_norm=constant"], "'grpo_norm' shapes GRPO's"),
    (["--context", "critique_quoting", "grpo_norm=sequence_mean"], "does not use"),
    (["--context", "critique_no_prefix", "grpo_beta=1", "grpo_norm=constant"], "'grpo_beta'"),
    (["seed=99999999999"], "'seed' must lie in 0..2147483647"),
    (["lr=0.1", "lr=0.2"], "config key 'lr' is given twice on the command line"),
    (["seed=1", "seed=1"], "'seed' is given twice"),
    (["run=a", "--run", "b"], "--run and run= both set the run name"),
    (["arm=grpo", "--context", "critique"], "--context and arm= both set the arm"),
    (["--context", "grpo", "--context=critique"], "--context is given twice on the command line"),
    (["--run", "a", "--run", "b"], "--run is given twice"),
    (["--explain", "1", "--explain", "2"], "--explain is given twice"),
])
def test_flag_arm_and_repeated_key_mistakes_are_one_line(argv, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(selfdistill, "train", lambda cfg: pytest.fail("training started"))
    code, _, err = run_main([*argv, f"out_dir={tmp_path}"], capsys)
    one_line_error(code, err, fragment)
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.bad_input
def test_a_pasted_api_key_is_refused_and_never_shown(tiny_model_dir, data, tmp_path, capsys):
    secret = "sk-proj-abc123SECRET"
    code, out, err = run_main(settings(tiny_model_dir, data, tmp_path) + [f"critic_api_key_env={secret}"], capsys)
    one_line_error(code, err, "NAME of an environment variable")
    assert secret not in out + err and not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Settings that follow the arm or the world


def test_through_first_divergence_is_refused_without_a_critique():
    with pytest.raises(UserError, match="critique arm"):
        selfdistill.load_config(["--context", "reference", "distill_span=through_first_divergence"])
    selfdistill.load_config(["--context", "critique_quoting", "distill_span=through_first_divergence"])


def test_toy_runs_take_the_worlds_length_budget(capsys):
    assert selfdistill.load_config([]).max_new_tokens == folders.budget()
    selfdistill.load_config([f"max_new_tokens={folders.budget() + 1}"])
    assert "differs from the toy world's budget" in capsys.readouterr().err
    assert selfdistill.load_config(["model=some/model", "prompts=instruct"]).max_new_tokens == 512


@pytest.mark.bad_input
@pytest.mark.parametrize("argv, fragment", [
    (["compare.py", "--x", "steps", "runs/a"], "did you mean 'step'?"),
    (["eval.py"], "the following arguments are required: paths"),
    (["analyze.py", "toy", "--rollouts", "many"], "argument --rollouts: invalid int value: 'many'"),
    (["prepare.py"], "the following arguments are required"),
    (["-m", "toyworld.toy_build", "buld"], "did you mean 'build'?"),
    (["-m", "toyworld.toy_critic", "serv"], "did you mean 'serve'?"),
])
def test_every_programs_argument_mistakes_are_one_line(argv, fragment):
    """argparse's refusals, as the project's one line (options.Parser): no usage block, exit code 2."""
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    one_line_error(result.returncode, result.stderr, fragment)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
