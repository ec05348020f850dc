"""Protects the config contract: defaults in one dataclass, YAML and key=value overrides, and a
one-line error (never a silent default) for unknown keys, wrong types, missing or malformed files
and contradictory settings."""
import os
import subprocess
import sys

import pytest

from plumbing import options
import selfdistill
from toyworld import folders
from plumbing.common import UserError
from selfdistill import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
