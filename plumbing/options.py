"""Config parsing: a dataclass of defaults (selfdistill.Config, folders.BuildSettings) overridden
by a YAML file, then by key=value words; every key and value checked against the dataclass, and
each field's trailing comment is its `--help` line (one source of truth).

Each key's own range is a table beside the choices (selfdistill.RANGES, in interval notation),
enforced here (check_numbers); what the values must satisfy together (cross-field rules) is the
method's business: selfdistill.check_consistency.
"""
import argparse
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys

import yaml

from plumbing.common import UserError

# ---------------------------------------------------------------------------------------------
# Config: a dataclass of defaults (selfdistill.Config), overridden by YAML then key=value.

TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def fields_of(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


def field_help(cls):
    """Each field's trailing comment, read from the class source (one source of truth)."""
    out, fields = {}, fields_of(cls)
    for line in inspect.getsource(cls).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and name in fields and "#" in rest:
            out[name] = rest.split("#", 1)[1].strip()
    return out


# The names a TRL (SDPOTrainer, SDFTTrainer, GRPOTrainer) or verl user brings, and ours: what an
# unknown key answers with before guessing by spelling (`learning_rate` is not `ema_rate`). None:
# no such setting here, and why. The full table, with the values, is docs/trl.md.
PEER_NAMES = {
    "learning_rate": ("lr", ""),
    "num_generations": ("samples_per_question", "G, the rollouts per question"),
    "max_completion_length": ("max_new_tokens", ""),
    "max_prompt_length": ("max_context_tokens", "the teacher's context loses its middle beyond it; a "
                          "question is never cut"),
    "beta": ("grpo_beta", "the KL penalty to the base, GRPO arm"),
    "loss_type": ("grpo_norm", "dapo/bnpo = token_mean, grpo = sequence_mean, dr_grpo = constant"),
    "distillation_alpha": ("divergence", "0 = forward, 1 = reverse, between = jsd with jsd_alpha"),
    "distillation_mode": ("support", "full_logits = full, topk_logits = topk, sampled_token = sampled"),
    "distillation_topk": ("topk", "with support=topk; TRL's top k is the student's: topk_side=student"),
    "distillation_add_tail": ("topk_tail", ""),
    "distillation_is_clip": (None, "one on-policy update per batch: no importance ratio to clip"),
    "distillation_weight": (None, "no GRPO + distillation mix: grpo and the distillation arms are separate "
                            "--context values"),
    "teacher_model_kind": ("teacher", "base | ema | live, as TRL's; our default is base, the paper's"),
    "teacher_update_rate": ("ema_rate", ""),
    "per_device_train_batch_size": ("micro_batch", "sequences per forward/backward"),
    "gradient_accumulation_steps": (None, "batch_size (questions per update) and micro_batch decide it"),
    "generation_batch_size": ("generation_batch", ""),
    "num_train_epochs": ("epochs", ""),
    "lr_scheduler_type": ("schedule", ""),
    "max_grad_norm": ("grad_clip", ""),
    "save_steps": ("checkpoint_every", ""),
    "output_dir": ("out_dir", "plus run=NAME"),
    "model_name_or_path": ("model", ""),
    "target_modules": ("lora_targets", ""),
    "bf16": ("dtype", "dtype=bfloat16"),
    "num_iterations": (None, "one update per batch"),
    "epsilon": (None, "one on-policy update per batch: the ratio is 1, nothing to clip"),
    "feedback_template": (None, "the teacher's prompts are contexts.PROMPTS; the arm (--context) picks the context"),
    # verl's names (lasgroup/SDPO's self_distillation block included), as key=value would spell them
    "actor_rollout_ref.actor.optim.lr": ("lr", ""),
    "actor_rollout_ref.rollout.n": ("samples_per_question", "G"),
    "data.max_response_length": ("max_new_tokens", ""),
    "data.train_batch_size": ("batch_size", "questions per update"),
    "actor_rollout_ref.actor.ppo_mini_batch_size": ("batch_size", "one update per batch"),
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": ("micro_batch", ""),
    "actor_rollout_ref.rollout.temperature": ("temperature", ""),
    "actor_rollout_ref.actor.loss_agg_mode": ("grpo_norm", "token-mean = token_mean, seq-mean-token-mean = "
                                              "sequence_mean, seq-mean-token-sum-norm = constant"),
    "actor_rollout_ref.actor.kl_loss_coef": ("grpo_beta", "k3, as verl's low_var_kl"),
    "actor_rollout_ref.actor.grad_clip": ("grad_clip", ""),
    "actor_rollout_ref.model.path": ("model", ""),
    "actor_rollout_ref.model.lora_rank": ("lora_r", ""),
    "actor_rollout_ref.model.enable_gradient_checkpointing": ("gradient_checkpointing", ""),
    "actor_rollout_ref.actor.self_distillation.alpha": ("divergence", "0 = forward, 1 = reverse, between = jsd "
                                                        "with jsd_alpha"),
    "actor_rollout_ref.actor.self_distillation.distillation_topk": ("topk", "with support=topk"),
    "actor_rollout_ref.actor.self_distillation.distillation_add_tail": ("topk_tail", ""),
    "actor_rollout_ref.actor.self_distillation.teacher_regularization": ("teacher", ""),
    "actor_rollout_ref.actor.self_distillation.teacher_update_rate": ("ema_rate", ""),
    "trainer.total_epochs": ("epochs", ""),
    "trainer.total_training_steps": ("max_steps", ""),
    "trainer.save_freq": ("checkpoint_every", ""),
    "trainer.logger": ("report_to", ""),
    "data.train_files": ("train_file", ""),
    "data.val_files": ("test_file", ""),
    **{block: (None, "verl's nested blocks are flat keys here (docs/trl.md maps each)")
       for block in ("actor_rollout_ref", "data", "trainer", "algorithm")},
}


def check_key(cls, key):
    if key not in fields_of(cls):
        ours, why = PEER_NAMES.get(key.lstrip("+"), (False, ""))  # verl's Hydra writes +key / ++key
        if ours is None or ours in fields_of(cls):
            said = (f"ours is '{ours}'" + (f": {why}" if why else "")) if ours else f"no such setting here: {why}"
            raise UserError(f"unknown config key '{key}' (TRL's or verl's name; {said}; see docs/trl.md)")
        near = difflib.get_close_matches(key, fields_of(cls), n=1, cutoff=0.5)
        hint = f" (did you mean '{near[0]}'?)" if near else " (see --help)"
        raise UserError(f"unknown config key '{key}'{hint}")


def coerce(cls, choices, key, value, from_text):
    """Check (and, for command-line text, convert) one value against the field's type."""
    kind = fields_of(cls)[key].type
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(kind, kind)
    if kind is float and isinstance(value, str):
        from_text = True  # YAML reads 1e-3 (no dot) as a string; it is still a number
    if from_text:
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = value.lower() in ("true", "1", "yes")
            else:
                value = kind(value)
        except ValueError:
            raise UserError(f"config key '{key}' wants {TYPE_NAMES[kind]}, got '{value}'") from None
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"config key '{key}' wants {TYPE_NAMES[kind]}, got {value!r} "
                        f"({type(value).__name__})")
    if key in choices and value not in choices[key]:
        raise UserError(f"config key '{key}' must be one of {'|'.join(choices[key])}, got '{value}'")
    return value


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if keys.count(key) > 1:
                raise UserError(f"config key '{key}' is given twice (line {key_node.start_mark.line + 1})")
        return super().construct_mapping(node, deep)


def read_yaml_config(path):
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.load(f, Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (bad byte at offset {e.start})") from None
    except UserError as e:  # a key given twice (UniqueKeyLoader): name the file
        raise UserError(f"config file {path}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"config file {path} is not valid YAML{line}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must be a mapping of key: value")
    return loaded


def parse_overrides(cls, choices, items):
    """key=value strings → {key: value}, each checked against the dataclass."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"expected key=value, got '{item}'")
        check_key(cls, key)
        if key in values:  # as in YAML (UniqueKeyLoader): the last one would win silently
            raise UserError(f"config key '{key}' is given twice on the command line")
        values[key] = coerce(cls, choices, key, value, from_text=True)
    return values


def config_values(cls, choices, config_path, overrides):
    """A YAML file's values (None: none), then key=value overrides → {key: value}, checked: what
    every program that reads a training config (--config) takes."""
    values = {}
    if config_path:
        for key, value in read_yaml_config(config_path).items():
            check_key(cls, key)
            values[key] = coerce(cls, choices, key, value, from_text=False)
    values.update(parse_overrides(cls, choices, overrides))
    return values


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `error: MESSAGE (--help lists the options)` and
    exit code 2, without the usage block; a mistyped choice gets the nearest one."""

    def error(self, message):
        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            listed = [word.strip(" '") for word in bad.group(2).split(",")]
            near = difflib.get_close_matches(bad.group(1), listed, n=1, cutoff=0.6)
            message += f"; did you mean '{near[0]}'?" if near else ""
        print(f"error: {message} (--help lists the options)", file=sys.stderr)
        sys.exit(2)


def parse_command_line(cls, choices, argv, description):
    """--config FILE.yaml, then --context/--run, then key=value overrides → {key: value}, checked."""
    help_text, fields = field_help(cls), fields_of(cls)
    epilog = "config fields (key=value):\n" + "\n".join(
        f"  {name:<24} {fields[name].default!r:<12} {help_text.get(name, '')}" for name in fields)
    parser = Parser(description=description, epilog=epilog,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", choices=choices["context"], help="the arm: what the teacher sees")
    parser.add_argument("--config", help="YAML file of overrides")
    parser.add_argument("--run", help="run name (rerun the same name to resume)")
    parser.add_argument("--explain", nargs="?", const=2, type=int, metavar="N",
                        help="show one training step for N rollouts (default 2), then stop; writes nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    argv = list(argv)
    for flag in ("--context", "--config", "--run", "--explain"):  # argparse would keep the last one silently
        if sum(word == flag or word.startswith(flag + "=") for word in argv) > 1:
            raise UserError(f"{flag} is given twice on the command line")
    for i, word in enumerate(argv):  # a bare --explain before key=value words: N is its default
        if word == "--explain" and (i + 1 == len(argv) or not re.fullmatch(r"-?\d+", argv[i + 1])):
            argv[i:i + 1] = ["--explain", "2"]
            break
    args = parser.parse_intermixed_args(argv)  # key=value may come before and after the options
    if args.explain is not None and args.explain < 1:  # 0 would train a whole run; -3 drop the last 3
        raise UserError(f"--explain N shows N rollouts of one step: N must be at least 1, got {args.explain}")
    values = config_values(cls, choices, args.config, [])
    overrides = parse_overrides(cls, choices, args.overrides)
    flags = {k: v for k, v in (("context", args.context), ("run", args.run), ("explain", args.explain)) if v}
    for flag, key in (("run", "run"), ("context", "arm")):  # the same setting twice: refuse, as above
        if flag in flags and key in overrides:
            raise UserError(f"--{flag} and {key}= both set the {'arm' if key == 'arm' else 'run name'}; give one")
    values.update(overrides)
    values.update(flags)
    return values


INT_LIMIT = 2 ** 31 - 1  # larger integers overflow torch's and the tokenizers' index types


def check_numbers(cfg, ranges=None):
    """Every float finite (a NaN passes `x < 0` checks and poisons the optimizer), every integer in
    0..INT_LIMIT; then each key of `ranges` ({key: "[low, high]"}, selfdistill.RANGES) in its range."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key '{field.name}' must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= INT_LIMIT:
            raise UserError(f"config key '{field.name}' must lie in 0..{INT_LIMIT}, got {value}")
    for key, interval in (ranges or {}).items():
        if not in_range(getattr(cfg, key), interval):
            whole = isinstance(getattr(cfg, key), int)
            raise UserError(f"config key '{key}' must {range_words(interval, whole)}, got {getattr(cfg, key)}")


def interval_parts(interval):
    """"[1, 4096]" / "(0, 1]" / "[0, inf)" -> (low, high, low included, high included)."""
    m = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])", interval)
    return float(m[2]), float(m[3]), m[1] == "[", m[4] == "]"


def in_range(value, interval):
    low, high, with_low, with_high = interval_parts(interval)
    return (low <= value if with_low else low < value) and (value <= high if with_high else value < high)


def range_words(interval, whole=False):
    """The rule in words: "be at least 1", "be positive", "lie in 1..4096" (`whole` numbers), "lie in (0, 1]"."""
    low, high, with_low, _ = interval_parts(interval)
    number = lambda x: str(int(x)) if x == int(x) else f"{x:g}"
    if math.isinf(high):
        return f"be at least {number(low)}" if with_low else "be positive" if low == 0 else f"be above {number(low)}"
    if whole and interval[0] == "[" and interval[-1] == "]":
        return f"lie in {number(low)}..{number(high)}"
    return f"lie in {interval}"
