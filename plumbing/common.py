"""Plumbing every script needs and no reader of the method needs to see: one-line user errors,
device / model / tokenizer / data loading and the data's checks, the optimizer and its schedule,
data order and seeds, signals, the end-of-run evaluation's child process, timers, progress bars and
the optional figure backend. The rest of the plumbing has a file per job: the sampler (sampler.py),
the run folder and checkpoints (runfolder.py), config parsing (options.py), the torchrun helpers
(ranks.py). From the project this file imports only contexts.py (prompts) and ranks.py (world size,
process groups). The update itself (selfdistill.optimizer_step) is the method's.
"""
import contextlib
import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import torch

import contexts
from plumbing import ranks

# peft calls a transformers method that transformers 5 deprecates; nothing for users to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

class UserError(Exception):
    """A mistake in the user's input: printed as one line, no traceback."""


@contextlib.contextmanager
def user_errors():
    """A user's mistake (or an unreachable critic) becomes one line on stderr and exit code 2;
    SELFDISTILL_DEBUG=1 shows the traceback instead. Ctrl-C that reaches here (evaluation, or a
    second one during training) is one line too, with exit code 130; so is, under torchrun, a
    collective that fails because another process of the group died (exit code 2)."""
    try:
        yield
    except (UserError, ConnectionError) as e:
        if os.environ.get("SELFDISTILL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # under torchrun: another process died, and a collective says so here
        if os.environ.get("SELFDISTILL_DEBUG") or not ranks.peer_failure(e):
            raise
        said = str(e).splitlines()[0].rpartition("] ")[2].partition(". ")[0][:120]  # gloo: "[file:line] what. Hint"
        print(f"error: another process of this torchrun group stopped ({said}); its own output says why; "
              f"finished checkpoints and eval.jsonl rows are kept: rerun the same command to continue",
              file=sys.stderr)
        with contextlib.suppress(Exception):
            ranks.leave_group()  # a group left standing aborts the interpreter at exit (C++ terminate)
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
# Device, tokenizer, model (+ a fresh LoRA adapter), data.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(cfg):
    """The run's device; under torchrun, `auto` and `cuda` mean this process's GPU (LOCAL_RANK)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device} but no CUDA device is available; use device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():  # else an allocator error at the first tensor
        raise UserError("device=mps but no Apple GPU (MPS) is available; use device=cpu")
    if name == "cuda" and ranks.world_size() > 1:
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
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


# The settings that decide which problems prepare.py's filter keeps: prepare.json records them.
FILTER_SETTINGS = ("model", "dtype", "prompts", "student_thinking", "max_new_tokens", "temperature", "top_p",
                   "top_k", "critic", "critic_model", "critic_max_new_tokens", "critique_validation")


def check_data_settings(cfg, train_path):
    """One warning when the train file's folder holds a prepare.json whose filter sampled or
    critiqued at other settings than this run's: the paper's filter (Avg@16 below 5/16 at the
    training settings) then need not hold for the run."""
    path = os.path.join(os.path.dirname(train_path) or ".", "prepare.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)["settings"]
        differ = [f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in FILTER_SETTINGS
                  if k in saved and saved[k] != getattr(cfg, k)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        print(f"warning: {path} cannot be read; the data's filter settings are not checked", file=sys.stderr)
        return
    if differ:
        print(f"warning: {train_path} was filtered by prepare.py at other settings than this run's "
              f"({'; '.join(differ)}): its difficulty filter need not hold at this run's settings; "
              f"rerun prepare.py --config with this run's config", file=sys.stderr)


def check_reference_lengths(tokenizer, records, max_context_tokens):
    """The reference arm's teacher sees each record's solution; one warning with the count of those
    longer than max_context_tokens, which lose their middle (contexts.truncate_middle)."""
    if max_context_tokens <= 0:
        return
    lengths = [len(tokenizer(r["solution"], add_special_tokens=False)["input_ids"]) for r in records]
    over = sum(n > max_context_tokens for n in lengths)
    if over:
        print(f"warning: {over} of {len(records)} reference solutions are longer than max_context_tokens="
              f"{max_context_tokens} (longest {max(lengths)} tokens) and lose their middle in the teacher's "
              f"context; raise max_context_tokens to show them whole", file=sys.stderr)


def context_window(cfg, path):
    """(tokenizer, the model's context length or None), read without loading the weights."""
    from transformers import AutoConfig
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from '{path}': {str(e).splitlines()[0]}") from None
    return tokenizer, getattr(config, "max_position_embeddings", None)


def longer_than(tokenizer, limit, cfg, records):
    """The records whose student prompt plus max_new_tokens exceeds the context `limit` (None: none)."""
    if not limit:
        return []
    return [r for r in records if len(contexts.student_prompt_ids(
        tokenizer, r["question"], cfg.prompts, cfg.student_thinking)) + cfg.max_new_tokens > limit]


def check_fits(model, tokenizer, cfg, records):
    """Every student prompt plus max_new_tokens must fit the model's context window (training: an
    error; evaluation counts and skips a test question that does not fit, eval.fitting_records), and
    a top-k support must be smaller than the vocabulary (else it is support=full)."""
    vocab = getattr(model, "get_base_model", lambda: model)().get_output_embeddings().weight.shape[0]
    if cfg.support == "topk" and cfg.topk >= vocab:
        raise UserError(f"support=topk with topk={cfg.topk} >= the vocabulary size {vocab} is "
                        f"support=full; set support=full or a smaller topk")
    limit = getattr(model.config, "max_position_embeddings", None)
    too_long = longer_than(tokenizer, limit, cfg, records)
    if too_long:
        raise UserError(f"{len(too_long)} question(s) (first: id {too_long[0]['id']}) do not fit the model's "
                        f"context of {limit} tokens with max_new_tokens={cfg.max_new_tokens}; shorten or "
                        f"drop them, or lower max_new_tokens")


# ---------------------------------------------------------------------------------------------
# Data order, seeds, the optimizer and its step.

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


def optimizer_for(cfg, model, n_records):
    """AdamW on the trainable weights (the LoRA factors) and its learning-rate schedule over the run's
    steps (max_steps, or `epochs` passes over the records): (params, optimizer, scheduler, total_steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_records / cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    return params, optimizer, scheduler, total_steps


def lr_lambda(cfg, total_steps):
    def factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - progress,
                "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[cfg.schedule]
    return factor


# ---------------------------------------------------------------------------------------------
# A block in eval mode (the teacher's forward passes: no dropout).

@contextlib.contextmanager
def eval_mode(model):
    """Eval mode inside the block (no dropout), the previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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


def evaluate_in_child(run_dir, trust_remote_code=False):
    """After training: `python eval.py RUN` in its own process (it imports the method's file, never
    the reverse), under torchrun as its own group of the same ranks. Returns its exit code."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
    trust = ["--trust-remote-code"] if trust_remote_code else []  # given on this command line
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trainer's cached blocks, before the child allocates its own
    env = ranks.child_group_env()  # under torchrun, eval.py's processes form their own group
    ranks.leave_group()
    # our SIGINT/SIGTERM are passed on to it, and we wait: it never runs on alone
    return run_child([sys.executable, os.path.join(here, "eval.py"), run_dir, *trust], env)


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


# ---------------------------------------------------------------------------------------------
# Figures (optional): matplotlib when it is installed.

MATPLOTLIB = "matplotlib==3.11.2"  # optional: figures; without it, CSV only (requirements-extras.txt)


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
