"""Plumbing every script needs and no reader of the method needs to see: user errors, config
parsing and checking, device / model / tokenizer / data loading, the one `generate`, forward passes
at response positions, run folders, checkpoints and resume, atomic writes, signals and timers, and
the few collective calls that let the same loop run on several processes under torchrun.

Imports flow one way: contexts ← common ← critic ← toy ← selfdistill ← eval (each file imports only
files to its left); this file imports only contexts.py (prompts and rows) from the project.
"""
import argparse
import atexit
import contextlib
import dataclasses
import difflib
import errno
import inspect
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist
import yaml

import contexts


class UserError(Exception):
    """A mistake in the user's input: printed as one line, no traceback."""


@contextlib.contextmanager
def user_errors():
    """A user's mistake (or an unreachable critic) becomes one line on stderr and exit code 2;
    SELFDISTILL_DEBUG=1 shows the traceback instead. Ctrl-C that reaches here (evaluation, or a
    second one during training) is one line too, with exit code 130."""
    try:
        yield
    except (UserError, ConnectionError) as e:
        if os.environ.get("SELFDISTILL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("SELFDISTILL_DEBUG"):
            raise
        print("stopped by Ctrl-C; finished work is kept (checkpoints, eval.jsonl rows): rerun the same "
              "command to continue", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except OSError as e:  # the user's disk or paths: full, read-only, not permitted, in the way
        if os.environ.get("SELFDISTILL_DEBUG") or e.errno not in DISK_ERRORS | PATH_ERRORS.keys():
            raise
        where = f" {e.filename}" if e.filename else ""
        if e.errno in PATH_ERRORS:
            print(f"error: cannot use{where}: {e.strerror} ({PATH_ERRORS[e.errno]}); check out_dir, "
                  f"--run and --out", file=sys.stderr)
        else:
            print(f"error: cannot write{where}: {e.strerror}; free space or choose a writable out_dir",
                  file=sys.stderr)
        sys.exit(2)


DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
# A path that cannot be used as given: each errno with what usually causes it.
PATH_ERRORS = {errno.EEXIST: "a file or a dangling link is in the way",
               errno.ENOENT: "a folder on the way is missing, or a link points nowhere",
               errno.ELOOP: "a symbolic link points back at itself",
               errno.ENOTDIR: "a file stands where a folder should be",
               errno.EISDIR: "a folder stands where a file should be",
               errno.ENAMETOOLONG: "the name is too long"}


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


def check_key(cls, key):
    if key not in fields_of(cls):
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
        values[key] = coerce(cls, choices, key, value, from_text=True)
    return values


def parse_command_line(cls, choices, argv, description):
    """--config FILE.yaml, then --context/--run, then key=value overrides → {key: value}, checked."""
    help_text, fields = field_help(cls), fields_of(cls)
    epilog = "config fields (key=value):\n" + "\n".join(
        f"  {name:<24} {fields[name].default!r:<12} {help_text.get(name, '')}" for name in fields)
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", choices=choices["context"], help="the arm: what the teacher sees")
    parser.add_argument("--config", help="YAML file of overrides")
    parser.add_argument("--run", help="run name (rerun the same name to resume)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value may come before and after the options
    values = {}
    if args.config:
        for key, value in read_yaml_config(args.config).items():
            check_key(cls, key)
            values[key] = coerce(cls, choices, key, value, from_text=False)
    values.update(parse_overrides(cls, choices, args.overrides))
    values.update({k: v for k, v in (("context", args.context), ("run", args.run)) if v})
    return values


INT_LIMIT = 2 ** 31 - 1  # larger integers overflow torch's and the tokenizers' index types
MAX_CRITIC_RETRIES = 10  # more would only wait longer: critic.py caps a critique's total time anyway


def check_numbers(cfg):
    """Every float finite (a NaN passes `x < 0` checks and poisons the optimizer), every integer in
    0..INT_LIMIT; then the per-field ranges in check_consistency."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key '{field.name}' must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= INT_LIMIT:
            raise UserError(f"config key '{field.name}' must lie in 0..{INT_LIMIT}, got {value}")


def check_names(cfg):
    """The run name is one plain folder under out_dir; the key variable is a variable's name."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*", cfg.run) or cfg.run in (".", ".."):
        raise UserError(f"run name {cfg.run!r} must be a plain folder name (letters, digits, _ . = + -; "
                        f"no '/', no leading '.'); use out_dir=... to put runs elsewhere")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.critic_api_key_env):
        raise UserError("config key 'critic_api_key_env' must be the NAME of an environment variable "
                        "(e.g. OPENAI_API_KEY) that holds the key, not the key itself; it was not saved")


def check_consistency(cfg):
    """Settings that are out of range, or each valid but contradicting one another."""
    check_numbers(cfg)
    check_names(cfg)
    for key in ("token_clip", "epochs"):
        if getattr(cfg, key) < 0:
            raise UserError(f"config key '{key}' must be at least 0")
    if not cfg.critic_timeout > 0:
        raise UserError("config key 'critic_timeout' must be positive (seconds)")
    if cfg.lora_alpha < 1:
        raise UserError("config key 'lora_alpha' must be at least 1 (the adapter's update is scaled by "
                        "lora_alpha / lora_r: with 0 the run would never learn)")
    if cfg.critic_retries > MAX_CRITIC_RETRIES:
        raise UserError(f"config key 'critic_retries' must lie in 0..{MAX_CRITIC_RETRIES} (a critique gets "
                        f"a few critic_timeouts in all, retries included)")
    for key in ("batch_size", "micro_batch", "max_new_tokens", "generation_batch",
                "lora_r", "eval_samples", "samples_per_question", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise UserError(f"config key '{key}' must be at least 1")
    for key in ("max_steps", "weight_decay", "grad_clip", "top_k", "warmup_steps", "chunk_size"):
        if getattr(cfg, key) < 0:
            raise UserError(f"config key '{key}' must be at least 0 (0 = off)")
    if not cfg.lr > 0:
        raise UserError("config key 'lr' must be positive")
    if cfg.max_steps == 0 and not cfg.epochs > 0:
        raise UserError("config key 'epochs' must be positive (or set max_steps)")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError("config key 'lora_dropout' must lie in [0, 1)")
    if not 0 < cfg.top_p <= 1:
        raise UserError("config key 'top_p' must lie in (0, 1] (1 = off)")
    if cfg.support == "topk" and cfg.topk < 1:
        raise UserError("config key 'topk' must be at least 1 with support=topk")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise UserError(f"config key 'device' must be auto, cpu, mps, cuda or cuda:N, got '{cfg.device}'")
    G = cfg.samples_per_question
    if cfg.arm == "grpo" and G < 2:
        raise UserError("grpo needs samples_per_question >= 2 (the advantage is relative to the group)")
    if cfg.batch_size % world_size():
        raise UserError(f"batch_size = {cfg.batch_size} does not divide across {world_size()} processes "
                        f"(torchrun --nproc_per_node); use a multiple of {world_size()}")
    if (cfg.batch_size * G) % min(cfg.micro_batch, cfg.batch_size * G):
        raise UserError(f"batch_size·samples_per_question = {cfg.batch_size * G} is not divisible "
                        f"by micro_batch = {cfg.micro_batch}")
    if not 0.0 <= cfg.jsd_alpha <= 1.0:
        raise UserError("jsd_alpha must lie in [0, 1]")
    if not 0.0 < cfg.ema_rate <= 1.0:
        raise UserError("ema_rate must lie in (0, 1]")
    if cfg.temperature <= 0 or cfg.logit_temperature <= 0:
        raise UserError("temperature and logit_temperature must be positive")
    if cfg.distill_span != "all" and not cfg.arm.startswith("critique"):
        raise UserError("distill_span=through_first_divergence needs a critique arm (the span ends "
                        "where the response leaves the critique's verbatim prefix)")
    if cfg.support == "sampled" and cfg.divergence != "reverse":
        raise UserError("support=sampled estimates reverse KL only; set divergence=reverse")
    if cfg.critic == "http" and not cfg.critic_url and cfg.arm.startswith("critique"):
        raise UserError("critic=http needs critic_url (e.g. http://127.0.0.1:8000/v1)")
    if cfg.critic == "hf" and not cfg.critic_model and cfg.arm.startswith("critique"):
        raise UserError("critic=hf needs critic_model (a folder or hub id)")


# ---------------------------------------------------------------------------------------------
# Device, tokenizer, model (+ a fresh LoRA adapter), data.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(cfg):
    """The run's device; under torchrun, `auto` and `cuda` mean this process's GPU (LOCAL_RANK)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device} but no CUDA device is available; use device=cpu")
    if name == "cuda" and world_size() > 1:
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if name.startswith("cuda:"):
        torch.cuda.set_device(torch.device(name))  # NCCL and the default allocations go there
    return torch.device(name)


def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from '{path}': not a model folder, and not "
                        f"reachable on the hub ({type(e).__name__})") from None
    try:
        contexts.check_chat_template(tokenizer, path)
    except ValueError as e:
        raise UserError(str(e)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(cfg, path, device):
    """The student: a causal LM with a fresh LoRA adapter (the only trainable weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype],
                                                    trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from '{path}': {str(e).splitlines()[0]}") from None
    base.to(device)
    torch.manual_seed(cfg.seed)  # LoRA init
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    names = [name for name, _ in base.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise UserError(f"lora_targets: {', '.join(unknown)} match no module of {path}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base, lora)
    except ValueError as e:
        raise UserError(f"lora_targets={cfg.lora_targets!r} do not match the model's modules: "
                        f"{str(e).splitlines()[0]}") from None
    if os.path.isdir(path):  # adapters record where their base is: a hub id as typed, a folder absolute
        model.peft_config["default"].base_model_name_or_path = os.path.abspath(path)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    check_plain_head(model, device)
    return model, tokenizer


# Config fields by which a causal LM says its logits are more than hidden @ Wᵀ (Gemma-2's soft-capping,
# Cohere's logit_scale, Granite's logits_scaling, MiniCPM-style output scaling).
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling",
                   "output_multiplier_scale", "dim_model_base")


@torch.no_grad()
def check_plain_head(model, device):
    """We apply the LM head ourselves (hidden @ W^T); refuse models whose logits are anything else
    (soft-capping, scaling, a bias), rather than train on a silently wrong distribution. The config
    is checked first: on random or small weights soft-capping is nearly the identity, so comparing
    numbers alone would let it through."""
    declared = [k for k in HEAD_TRANSFORMS if getattr(model.config, k, None) not in (None, 1, 1.0)]
    head = model.get_base_model().get_output_embeddings()
    if declared or head.bias is not None:
        what = f"its config sets {', '.join(declared)}" if declared else "its LM head has a bias"
        raise UserError(f"this model's logits are not a plain linear head of its last hidden state "
                        f"({what}); selfdistill does not support it")
    ids = torch.arange(4, device=device)[None] % model.config.vocab_size
    body = model.get_base_model().get_decoder()
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state
    ours = hidden @ head.weight.T
    theirs = model(input_ids=ids).logits
    if not torch.allclose(ours.float(), theirs.float(), atol=1e-3, rtol=1e-3):
        raise UserError("this model's logits are not a plain linear head of its last hidden state; "
                        "selfdistill does not support it")


def load_jsonl(path, need_solution=False, normalize=None):
    """Records with question, answer, optional solution and id. A bad line is an error naming it;
    so is a gold answer that `normalize` (critic.normalize_answer) turns into nothing."""
    if not os.path.isfile(path):
        raise UserError(f"dataset file {path} not found")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); give a JSONL file, "
                        f"one JSON object per line") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
                or not record["question"].strip() or record.get("answer") in (None, ""):
            raise UserError(f"{path}:{lineno}: each line needs a non-empty 'question' and 'answer'")
        if need_solution and not isinstance(record.get("solution"), str):
            raise UserError(f"{path}:{lineno}: context=reference needs a 'solution' on every line")
        if isinstance(record["answer"], bool) or not isinstance(record["answer"], (int, str)):
            kind = {list: "a list", dict: "an object", bool: "true/false", float: "a decimal number"}
            raise UserError(f"{path}:{lineno}: 'answer' is {kind.get(type(record['answer']), 'not text')} "
                            f"({json.dumps(record['answer'])[:40]}); write the gold answer as a string "
                            f"(e.g. \"0.5\") or an integer")
        record["answer"] = str(record["answer"])
        if normalize and normalize(record["answer"]) == "":
            raise UserError(f"{path}:{lineno}: answer {record['answer']!r} is empty once LaTeX and "
                            f"spaces are stripped; no response could ever match it")
        record.setdefault("id", f"{os.path.basename(path)}:{lineno}")
        records.append(record)
    if not records:
        raise UserError(f"dataset file {path} has no records")
    return records


def check_fits(model, tokenizer, cfg, records):
    """Every student prompt plus max_new_tokens must fit the model's context window."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    too_long = [r for r in records if len(contexts.student_prompt_ids(
        tokenizer, r["question"], cfg.prompts, cfg.student_thinking)) + cfg.max_new_tokens > limit]
    if too_long:
        raise UserError(f"{len(too_long)} question(s) (first: id {too_long[0]['id']}) do not fit the model's "
                        f"context of {limit} tokens with max_new_tokens={cfg.max_new_tokens}; shorten or "
                        f"drop them, or lower max_new_tokens")


def batch_for_step(n_records, batch_size, step, seed):
    """Indices of the questions of one step: epochs are fresh permutations laid end to end, so the
    data position is a function of (seed, step) and resuming needs no saved iterator."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_records)
        order = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(order[offset]))
    return out


def step_seed(cfg, step):
    """The torch seed of one step's sampling: a function of (seed, step), so resuming repeats it."""
    return cfg.seed * 1_000_003 + step


def lr_lambda(cfg, total_steps):
    def factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - progress,
                "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[cfg.schedule]
    return factor


# ---------------------------------------------------------------------------------------------
# Generation: the one sampler (training rollouts, evaluation, the toy build, the HF critic).

def eos_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def sampling_config(tokenizer, stop, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                    static_cache=False):
    """temperature 0 = greedy. A static KV cache helps big batches of a tiny model on CPU (the
    default dynamic cache's concatenations made batches of 1024 rows 4x slower there)."""
    from transformers import GenerationConfig
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) \
        if temperature > 0 else dict(do_sample=False)
    return GenerationConfig(**sampling, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop),
                            use_cache=True, remove_invalid_values=True,
                            **({"cache_implementation": "static"} if static_cache else {}))


def growing_cache(model, capacity):
    """HF's dynamic KV cache with its full-attention layers writing into buffers of `capacity`
    positions, allocated once, instead of concatenating the whole cache at every token (a copy that
    grows with the length: 3-5 % of a toy evaluation). Attention reads the filled part, the very
    values the concatenation would hold, so the samples are bit-identical (tested); other layer
    kinds (sliding windows) keep HF's own class."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            B, H, _, D = key_states.shape
            self.key_buffer = key_states.new_empty(B, H, capacity, D)
            self.value_buffer = value_states.new_empty(B, H, capacity, value_states.shape[-1])

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"KV cache of {capacity} positions overflowed ({end})")
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices):  # rows leave the batch: one copy of what is kept
            end = self.get_seq_length()
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


MIN_ROWS = 8  # the batch shrinks only while this many rows remain: matmuls of 1-3 rows take other
# kernels (gemv) on CPU whose last bits differ from the same rows in a batch


def warpers(temperature, top_p, top_k):
    """HF generate's logit processors for our sampling settings, in its order (so that the loop
    below draws what model.generate would): inf/NaN removal, temperature, top-k, top-p."""
    from transformers import (InfNanRemoveLogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)
    steps = [InfNanRemoveLogitsProcessor()]
    if temperature > 0:
        steps += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        steps += [TopKLogitsWarper(top_k)] if top_k else []
        steps += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    return LogitsProcessorList(steps)


# generation_config fields that decode honours (or that do not change what is sampled)
PLAIN_FIELDS = {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "max_length", "eos_token_id",
                "pad_token_id", "bos_token_id", "use_cache", "remove_invalid_values", "transformers_version",
                "_from_model_config", "output_attentions", "output_hidden_states", "return_dict_in_generate"}


def hf_only_settings(model):
    """Settings in the model's generation_config that HF's generate merges into every call and
    decode does not apply (repetition penalty, min_new_tokens, bad words, ...). A model with any
    samples with HF's loop instead, so that it samples as it would anywhere else."""
    return sorted(set(model.generation_config.to_diff_dict()) - PLAIN_FIELDS)


def decode(model, input_ids, attention_mask, max_new_tokens, warp, stop, pad_id, greedy=False):
    """One chunk's decoding loop, written out so that finished rows leave the batch (HF generate
    runs every row until the last one stops: half the work of a toy evaluation went to rows that
    had ended) and each distinct prompt is read once. (B, L) left-padded prompts → (B,
    max_new_tokens) new ids, pad after a stop id.

    Each step draws one Exp(1) variable per (row, token) for the whole chunk, whether a row still
    runs or not, and samples argmax p / q (the exponential race: P(token) = p, as torch.multinomial
    draws one sample). So a row's tokens do not depend on when other rows stop, and they are the
    tokens model.generate samples from the same seed (tested), up to the last bits of matmuls
    over fewer rows, which are equal on CPU from MIN_ROWS rows up."""
    B, L = input_ids.shape
    device = input_ids.device
    stop = torch.tensor(sorted(stop), device=device)
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # left padding
    cache = growing_cache(model, L + max_new_tokens)
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(body.forward).parameters else {}
    rows = torch.arange(B, device=device)  # which of the chunk's rows the batch holds
    # The prompt pass once per distinct prompt (eval's 12 samples of a question, GRPO's G copies);
    # its cache and last logits are then copied to every row with that prompt.
    distinct, copies = torch.unique(torch.cat([input_ids, attention_mask], -1), dim=0, return_inverse=True)
    shared = MIN_ROWS <= len(distinct) < B
    first = torch.zeros(len(distinct), dtype=torch.long, device=device).scatter_(0, copies, rows) if shared else rows
    logits = model(input_ids=input_ids[first], attention_mask=attention_mask[first], position_ids=positions[first],
                   cache=cache, use_cache=True, **last).logits[:, -1]
    if shared:
        logits = logits[copies]
        cache.batch_select_indices(copies)
    new_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)  # per batch row: no stop id yet
    for t in range(max_new_tokens):
        scores = warp(None, logits.float())  # (b, V)
        if greedy:
            next_ids = scores.argmax(-1)
        else:
            draws = torch.empty(B, scores.shape[-1], device=device).exponential_()  # (B, V)
            next_ids = (scores.softmax(-1) / draws[rows]).argmax(-1)  # (b,)
        new_ids[rows, t] = torch.where(running, next_ids, pad_id)
        running &= ~torch.isin(next_ids, stop)
        left = int(running.sum())
        if left == 0 or t == max_new_tokens - 1:
            break
        if MIN_ROWS <= left <= len(rows) // 2:  # at most one shrink per halving: each copies the cache
            keep = running.nonzero().flatten()
            rows, running, next_ids = rows[keep], running[keep], next_ids[keep]
            attention_mask, positions = attention_mask[keep], positions[keep]
            cache.batch_select_indices(keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=next_ids[:, None], attention_mask=attention_mask, position_ids=positions,
                       cache=cache, use_cache=True, **last).logits[:, -1]
    return new_ids


@torch.inference_mode()  # no_grad's numbers without autograd's bookkeeping: 3-8 % off a toy evaluation
def generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
             batch_size=256, static_cache=False, stop=None, seed=None, first=0):
    """Sample one response per prompt (lists of ids): KV cache on, left padding, eval mode.
    Returns (responses, truncated): ids up to and including the first stop id; truncated = none.
    seed: the chunk of prompts that starts at row i (counted from `first`) is sampled after
    torch.manual_seed(seed + (i << 32)), so a chunk's samples do not depend on the chunks before
    it, nor on which process drew them; None continues the current random stream."""
    stop = stop or eos_ids(model, tokenizer)
    gen = sampling_config(tokenizer, stop, max_new_tokens, temperature, top_p, top_k, static_cache)
    warp, hf_loop = warpers(temperature, top_p, top_k), bool(hf_only_settings(model))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses, truncated = [], []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        if seed is not None:
            torch.manual_seed(seed + ((first + i) << 32))
        L = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), L), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), L), dtype=torch.long)
        for b, p in enumerate(batch):
            input_ids[b, L - len(p):] = torch.tensor(p)
            attention_mask[b, L - len(p):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if static_cache or hf_loop:  # the toy build, which must not change, or settings decode lacks
            new_ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen)[:, L:]
        else:
            new_ids = decode(model, input_ids, attention_mask, max_new_tokens, warp, stop,
                             tokenizer.pad_token_id, greedy=temperature == 0)
        batch_responses, batch_truncated = cut_at_stop(new_ids, stop)
        responses += batch_responses
        truncated += batch_truncated
    model.train(was_training)
    return responses, truncated


def cut_at_stop(new_ids, stop):
    """Rows of sampled ids (B, T), padded after an early EOS → (ids up to and including the first
    stop id, truncated = no stop id at all)."""
    is_stop = torch.isin(new_ids, torch.tensor(sorted(stop), device=new_ids.device))  # (B, T)
    ended = is_stop.any(-1)  # (B,)
    lengths = torch.where(ended, is_stop.int().argmax(-1) + 1, new_ids.shape[1])  # (B,)
    return ([row[:n] for row, n in zip(new_ids.tolist(), lengths.tolist())],
            [not done for done in ended.tolist()])


# ---------------------------------------------------------------------------------------------
# Forward passes at the response positions only (the LM head is applied by the caller).

def response_hidden(model, rows, T, device):
    """The transformer body's final hidden states at the T positions that predict the response
    tokens: (B, T, d). The LM head is applied later, chunk by chunk (never to prompt positions)."""
    body = model.get_base_model().get_decoder()
    out = body(input_ids=rows["input_ids"].to(device), attention_mask=rows["attention_mask"].to(device),
               position_ids=rows["position_ids"].to(device), use_cache=False)
    return out.last_hidden_state[:, -T - 1:-1]


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode inside the block (no dropout), the previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def token_log_probs(hidden, weight, ids, chunk_size, temperature=1.0):
    """log softmax(h·Wᵀ / temperature)[ŷ_t] for each position: hidden (N, d), ids (N,) → (N,),
    `chunk_size` positions at a time, so no (N, V) tensor is held (DESIGN.md, memory rule)."""
    return torch.cat([(hidden[j:j + chunk_size] @ weight.T).float().div(temperature).log_softmax(-1)
                      .gather(-1, ids[j:j + chunk_size, None]).squeeze(-1)
                      for j in range(0, len(ids), chunk_size)])


# ---------------------------------------------------------------------------------------------
# Run folder: config, logs, checkpoints. Every file is written to a temporary name and renamed,
# so a kill never leaves half of one.

def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


def append_jsonl(path, record):
    """One line, written with a single write: a kill leaves at most one partial last line, which
    the next append (or read) drops."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":  # a partial line from a killed writer: cut it off
                drop_partial_last_line(f, path)
        f.write(line)


def drop_partial_last_line(f, path):
    f.seek(0)
    data = f.read()
    f.truncate(data.rfind(b"\n") + 1)
    print(f"warning: dropped a truncated last line of {path} (a write was interrupted)", file=sys.stderr)


def read_jsonl(path):
    """The records of a JSONL log; a truncated last line (an interrupted write) is dropped with a
    warning, a damaged line elsewhere is a one-line error naming it."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if lineno == len(lines):  # no newline after it: the last write was cut short
                print(f"warning: ignoring a truncated last line of {path}", file=sys.stderr)
                continue
            raise UserError(f"{path}:{lineno} is damaged (not JSON); remove that line or the file") from None
    return records


def keep_lines_up_to(path, step):
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if os.path.isfile(path):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r.get("step", 0) <= step))


def run_folder(cfg):
    """runs/NAME, created (the run name is checked to be one plain folder: check_names)."""
    run_dir = os.path.join(cfg.out_dir, cfg.run)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} exists and is not a folder; choose another --run or out_dir")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"out_dir {cfg.out_dir} exists and is not a folder")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


class RunLock:
    """One writer per run folder: RUN/.lock holds the writer's pid. It appears atomically with the
    pid in it (create_with_pid), so a reader never sees it empty. One held by a live process is a
    one-line error; one whose process is gone is stale and taken over (take_over: by one starter
    only, however many race). A lock that is not one plausible pid (a folder, a link, garbage, 0, -1,
    a pid beyond pid_max) is a one-line error, never removed nor waited on: we cannot tell it is
    stale. Released on release() or at exit; a process may take its own lock again (an in-process
    rerun after an error)."""

    def __init__(self, run_dir, what):
        self.path = os.path.join(run_dir, ".lock")
        for _ in range(50):  # each retry means another starter moved the lock meanwhile
            if create_with_pid(self.path):
                break
            holder = read_pid(self.path)
            if holder is None:
                continue  # released between our two looks
            if holder != os.getpid() and alive(holder):
                raise UserError(f"run folder {run_dir} is in use by process {holder}; wait for it to "
                                f"finish (or stop it) before {what} there")
            if holder == os.getpid() or self.take_over(holder):
                break
            time.sleep(0.02)  # another starter is taking the stale lock over: look again
        else:
            raise UserError(f"cannot take the lock {self.path}; remove it (and {self.path}.takeover) if "
                            f"no process uses the run")
        atexit.register(self.release)

    def take_over(self, stale):
        """Replace the stale lock of dead process `stale` by ours in one rename, while holding
        RUN/.lock.takeover: the lock is never absent (no third starter can create it) and only the
        takeover's holder replaces it, after checking it still names `stale`. False when another
        starter holds the takeover or the lock changed: the caller looks again."""
        marker = self.path + ".takeover"
        if not create_with_pid(marker):
            return False
        try:
            if read_pid(self.path) != stale or alive(stale):
                return False
            tmp = write_pid_file(self.path)
            os.replace(tmp, self.path)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(marker)

    def release(self):
        try:
            mine = read_pid(self.path) == os.getpid()
        except UserError:  # replaced by something else meanwhile: not ours to remove
            return
        if mine:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def write_pid_file(path):
    """A private file next to `path` that holds this process's pid; returns its name."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    return tmp


def create_with_pid(path):
    """Create `path` holding this process's pid, atomically; False when it exists. The pid is
    written to a private file first and hard-linked into place (link fails if `path` exists, even
    as a dangling link). A file system without hard links gets O_EXCL, where a reader may catch the
    file empty for a moment: it then reports the lock as unreadable, while its writer is alive."""
    tmp = write_pid_file(path)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return True
    finally:
        os.remove(tmp)


def pid_max():
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 ** 22  # Linux's ceiling; macOS's pids stay below 100000


def read_pid(path):
    """The pid in a lock file, or None when there is no file. Anything but a plain file holding
    one pid in 1..pid_max is a one-line error: such a lock was not written by us, and is never
    guessed to be stale."""
    unusable = f"{path} is not a lock file this program wrote"
    try:
        kind = os.lstat(path).st_mode
        if not stat.S_ISREG(kind):  # a folder, a link, a pipe (reading a pipe would hang)
            what = "a folder" if stat.S_ISDIR(kind) else "a link" if stat.S_ISLNK(kind) else "not a file"
            raise UserError(f"{unusable} ({what}); remove it if no process uses the run")
        with open(path, "rb") as f:
            text = f.read(32)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{unusable} (unreadable: {e.strerror}); remove it if no process uses the run") from None
    if not re.fullmatch(rb"[0-9]{1,12}\n?", text) or not 0 < int(text) <= pid_max():
        raise UserError(f"{unusable} (it holds {text[:20]!r}, not a process id); remove it if no process "
                        f"uses the run")
    return int(text)


def alive(pid):
    """True when process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust kill(pid, 0)


def prepare_run_dir(cfg):
    """Save the resolved config in runs/NAME; a rerun must use the same settings."""
    run_dir = run_folder(cfg)
    path = os.path.join(run_dir, "config.yaml")
    resolved = dataclasses.asdict(cfg)
    if os.path.isfile(path) and checkpoint_dirs(run_dir):  # nothing to resume: nothing to refuse
        saved = read_yaml_config(path)
        changed = [k for k in resolved if k != "eval_at_end" and saved.get(k) != resolved[k]]
        if changed:
            k = changed[0]
            raise UserError(f"run '{cfg.run}' exists with {k}={saved.get(k)!r} (now {resolved[k]!r}); "
                            f"resume with the same settings or choose another --run")
    write_atomic(path, yaml.safe_dump(resolved, sort_keys=False))
    return run_dir


def checkpoint_dirs(run_dir):
    """The checkpoint folders step_NNNNNN, oldest first; any other name under checkpoints/ is ignored."""
    root = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(root) if re.fullmatch(r"step_\d{6}", n)
                   and os.path.isdir(os.path.join(root, n))) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in names]


def save_checkpoint(run_dir, step, model, optimizer, scheduler, state, tokenizer=None):
    """The adapter (with an absolute base path, see load_model) and the tokenizer beside it, so
    `AutoPeftModelForCausalLM.from_pretrained(checkpoint)` works from any folder; plus the trainer
    state. Written to a temporary folder and renamed."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    if os.path.isdir(final):
        return final
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise UserError(f"the adapter has non-finite weights after step {step}; no checkpoint written "
                        f"(the newest one is intact); lower lr or check the data")
    tmp = os.path.join(run_dir, "checkpoints", f".tmp_step_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # the adapter only; PeftModel.from_pretrained(base, tmp) loads it
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(), **state},
               os.path.join(tmp, "trainer_state.pt"))
    os.replace(tmp, final)
    return final


class NonFiniteAdapter(UserError, ValueError):
    """A checkpoint whose adapter holds NaN or inf: damaged (a ValueError, see DAMAGED) for resume
    and evaluation, a one-line error where nothing can skip it."""


def load_adapter_file(checkpoint):
    """A checkpoint's LoRA weights; NaN or inf in them (a disk error, a hand edit) is refused: a
    run resumed from them would only ever produce NaN."""
    from safetensors.torch import load_file
    adapter = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    bad = next((name for name, w in adapter.items() if w.is_floating_point() and not torch.isfinite(w).all()), None)
    if bad:
        raise NonFiniteAdapter(f"the checkpoint {checkpoint} holds non-finite adapter weights ({bad})")
    return adapter


def load_checkpoint(path, model, optimizer, scheduler):
    """Read both files first, then apply them: a damaged checkpoint changes nothing."""
    from peft import set_peft_model_state_dict
    adapter = load_adapter_file(path)
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    missing = {"optimizer", "scheduler", "rng_torch", "rng_python", "step"} - set(state)
    if missing:
        raise KeyError(f"trainer_state.pt lacks {sorted(missing)}")
    set_peft_model_state_dict(model, adapter)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    return state


DAMAGED = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError)  # + safetensors'


def resume(run_dir, model, optimizer, scheduler, writer=True):
    """Load the newest checkpoint that loads (a damaged one is skipped with a warning naming it) and
    trim the logs to it: {"step", "ema", "nonfinite"}. writer=False (ranks > 0, after rank 0 has
    resumed) only reads."""
    from safetensors import SafetensorError
    state = {"step": 0, "ema": {}, "nonfinite": 0}
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            state = load_checkpoint(path, model, optimizer, scheduler)
        except (*DAMAGED, SafetensorError) as e:
            if not writer:
                raise UserError(f"the checkpoint {path} does not load on this process (rank 0 loaded it)") from None
            aside = path + ".damaged"  # out of the step_NNNNNN names, so it is rewritten, not reused
            while os.path.exists(aside):
                aside += "_"
            os.replace(path, aside)
            print(f"warning: the checkpoint {path} does not load ({type(e).__name__}); moved it to "
                  f"{os.path.basename(aside)} and resuming from the one before it", file=sys.stderr)
            continue
        if writer:
            print(f"resuming {run_dir} after step {state['step']}")
        break
    for name in ("metrics.jsonl", "samples.jsonl") if writer else ():
        keep_lines_up_to(os.path.join(run_dir, name), state["step"])
    return state


# ---------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node=N script.py ...` sets WORLD_SIZE, RANK and
# LOCAL_RANK; each process then takes its share of a step's questions. The losses are divided by
# the whole step's counts, so the SUM of the processes' gradients is the one-process gradient.
# Alone (no torchrun), every helper here returns its input and calls nothing.

def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_ranks(device):
    """(rank, world size): (0, 1) alone; under torchrun, after joining the process group (NCCL on
    GPUs, gloo on CPU)."""
    if world_size() == 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size()


def share(items, rank, world):
    """This process's contiguous part of a list (the parts' sizes differ by at most one)."""
    return items[rank * len(items) // world:(rank + 1) * len(items) // world]


def comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values):
    """Element-wise sums over the processes of a list of numbers."""
    if world_size() == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(total)
    return total.tolist()


def gather(values):
    """Every process's list, concatenated in rank order: rank r's share lands where it came from."""
    if world_size() == 1:
        return values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def from_rank0(value):
    """Rank 0's value on every process (e.g. a decision only rank 0 may take)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients(params):
    """p.grad ← Σ_ranks p.grad, in one flat buffer (a process with no kept sample adds zeros)."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def barrier():
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def rank0_first(rank):
    """Rank 0 runs the block before the other processes do: it may write what they then read."""
    if rank > 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def child_group_env():
    """The environment for a child process (eval.py after training) that forms its own group of
    the same ranks: a free port on rank 0's host, the same on all ranks. None when alone."""
    if world_size() == 1:
        return None
    port = None
    if dist.get_rank() == 0:
        import socket
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    env = {**os.environ, "MASTER_PORT": str(from_rank0(port))}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # the child hosts its own store on that port
    return env


def leave_group():
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Signals, timers, monitoring.

def progress_bars():
    """tqdm bars only on a terminal: piped logs get the one plain line per step, no \\r frames."""
    return sys.stderr.isatty()


STOPPING = threading.Event()  # set by a stop signal during training: the HTTP critic abandons its requests


def handle_signals():
    """SIGINT/SIGTERM finish the current step and write a checkpoint (a step waiting on the HTTP
    critic is dropped instead: STOPPING); a second one quits at once."""
    stop = {"signal": None}
    STOPPING.clear()

    def handler(signum, frame):
        if stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"] = signum
        STOPPING.set()
        print(f"\nsignal {signum}: finishing this step, then saving a checkpoint", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def default_signals():
    """Evaluation: Ctrl-C stops at once (KeyboardInterrupt, one line through user_errors); a second
    one while that unwinds, e.g. the trainer's forwarded copy of the same Ctrl-C, is ignored."""
    def interrupt_once(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt
    STOPPING.clear()
    signal.signal(signal.SIGINT, interrupt_once)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_child(command, env=None):
    """Run a child process (eval.py after training) to its end and return its exit code. SIGINT and
    SIGTERM to this process are passed on to it and we still wait, so it never runs on alone."""
    box = {"child": None, "early": []}

    def forward(signum, frame):
        if box["child"] is None:
            box["early"].append(signum)  # it is being started: it gets the signal once it exists
        else:
            box["child"].send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        box["child"] = subprocess.Popen(command, env=env)
        for signum in box["early"]:
            box["child"].send_signal(signum)
        code = box["child"].wait()
    finally:
        default_signals()
    if code < 0:  # it died of signal -code without a word (SIGTERM); Ctrl-C makes it say so itself
        print(f"stopped by signal {-code} during the evaluation; evaluated steps are kept, "
              f"`python eval.py RUN` finishes it", file=sys.stderr)
        return 128 - code
    return code


class Timer:
    """Seconds per phase; on a GPU it waits for queued kernels at each phase's edges (so a phase is
    not billed for the one before it) and keeps each phase's peak allocated memory in GiB."""
    def __init__(self, device):
        self.device = device if device.type == "cuda" else None
        self.seconds, self.peak_gib = {}, {}

    @contextlib.contextmanager
    def __call__(self, phase):
        if self.device:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if self.device:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            self.peak_gib[phase] = max(self.peak_gib.get(phase, 0.0), peak)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def record(self):
        return {**{f"time/{k}": round(v, 3) for k, v in self.seconds.items()},
                **{f"memory/{k}": round(v, 2) for k, v in self.peak_gib.items()}}


def leak_rate(texts, prompts_kind):
    """Share of responses that mention the teacher's privileged prompt (a context-leakage sign)."""
    markers = ("ref:", "fix:") if prompts_kind == "toy" else ("reference solution", "reviewer")
    return sum(any(m in t for m in markers) for t in texts) / max(len(texts), 1)


def ngram_overlap(response, context, n=4):
    """Share of the response's token n-grams that also occur in the context (copying the context)."""
    grams = {tuple(response[i:i + n]) for i in range(len(response) - n + 1)}
    if not grams:
        return 0.0
    seen = {tuple(context[i:i + n]) for i in range(len(context) - n + 1)}
    return len(grams & seen) / len(grams)


def context_overlap(tokenizer, responses, context_texts):
    """Mean over responses of ngram_overlap with its own teacher context (0 where it has none)."""
    return sum(ngram_overlap(r, tokenizer(c, add_special_tokens=False)["input_ids"])
               for r, c in zip(responses, context_texts) if c) / max(len(responses), 1)


def log_step(run_dir, record, total_steps, finite, sample_every, sample_records, texts, rewards,
             context_texts, valid, truncated):
    """One metrics line, one printed line, and every `sample_every` steps the samples with their
    teacher contexts (reading them is how self-distillation is debugged)."""
    from tqdm import tqdm
    step = record["step"]
    append_jsonl(os.path.join(run_dir, "metrics.jsonl"), record)
    kl_text = f" | kl {record['train/kl']:.4f}" if "train/kl" in record else ""
    tqdm.write(f"step {step}/{total_steps} | loss {record['train/loss']:.4f}{kl_text}"
               f" | reward {record['train/reward']:.3f} | len {record['train/response_len']:.1f}"
               f" | invalid {record['train/critique_invalid']} | {record['time/step']:.1f}s"
               + ("" if finite else " | update skipped (non-finite)"))
    if sample_every and step % sample_every == 0 or step == 1:
        for i, r in enumerate(sample_records):
            append_jsonl(os.path.join(run_dir, "samples.jsonl"),
                         {"step": step, "id": r["id"], "question": r["question"], "response": texts[i],
                          "reward": rewards[i].item(), "context": context_texts[i], "valid": valid[i],
                          "truncated": truncated[i]})


def stop_if_asked(stop, give_up, nonfinite, step):
    """After the step's checkpoint: stop on too many non-finite steps, or on a signal."""
    if give_up:
        raise UserError(f"stopping: {nonfinite} steps in a row had a non-finite loss or gradient "
                        f"(last at step {step}); lower lr or check the data")
    if stop["signal"]:
        print(f"stopped by signal {stop['signal']} after step {step}; checkpoint saved, "
              f"rerun the same command to resume")
        sys.exit(128 + stop["signal"])
