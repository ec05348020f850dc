"""The run folder, runs/NAME: its config, its JSONL logs, its lock, its checkpoints and resuming
from them. Every file is written to a temporary name and renamed, so a kill never leaves half of
one; a log line is one write, and a half-written last line is dropped with a warning.
"""
import atexit
import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import stat
import sys
import time

import torch
import yaml

from plumbing import options
from plumbing import ranks
from plumbing.common import UserError

# ---------------------------------------------------------------------------------------------
# Atomic writes and JSONL logs.


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
    return [record for _, record in numbered_jsonl(path)]


def numbered_jsonl(path):
    """read_jsonl's records as (line number, record) pairs, for readers that name a bad row's line."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if lineno == len(lines):  # no newline after it: the last write was cut short
                print(f"warning: ignoring a truncated last line of {path}", file=sys.stderr)
                continue
            raise UserError(f"{path}:{lineno} is damaged (not JSON); remove that line or the file") from None
    return records


def keep_lines_up_to(path, step):
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if os.path.isfile(path):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if not after(r, step)))


def after(record, step):
    """True for a log line of a step after `step`; a line without a whole-number step is kept as it
    was (the readers skip it with a warning), never lost."""
    return isinstance(record, dict) and type(record.get("step")) is int and record["step"] > step


# ---------------------------------------------------------------------------------------------
# The run folder and its lock: one writer at a time.

def check_run_name(run):
    """The run name is one plain folder under out_dir (checked with the config, before anything runs)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*", run) or run in (".", ".."):
        raise UserError(f"run name {run!r} must be a plain folder name (letters, digits, _ . = + -; "
                        f"no '/', no leading '.'); use out_dir=... to put runs elsewhere")


def run_folder(cfg):
    """runs/NAME, created (the run name is checked to be one plain folder: check_run_name)."""
    run_dir = os.path.join(cfg.out_dir, cfg.run)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} exists and is not a folder; choose another --run or out_dir")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"out_dir {cfg.out_dir} exists and is not a folder")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


HELD = {}  # lock path -> this process's FileLock on it: an in-process rerun after an error takes it again


class RunLock:
    """One writer per run folder: an OS lock (flock, through filelock) on RUN/.lock. The OS drops it
    when its process ends, however it ends, so no lock is ever stale and none is taken over. The
    holder writes its pid into the file, for the one-line error a second writer gets; the file stays
    after release (waiters must share its inode), and its pid then means nothing. A RUN/.lock that
    is not a plain file (a folder, a link, a pipe) is a one-line error and is left in place."""

    def __init__(self, run_dir, what, noun="run folder"):
        import filelock
        self.path = os.path.abspath(os.path.join(run_dir, ".lock"))
        check_lock_file(self.path)
        if self.path not in HELD:
            lock = filelock.FileLock(self.path, timeout=0, thread_local=False, on_acquired=write_pid)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise UserError(f"{noun} {run_dir} is in use by {lock_holder(self.path)}; wait for it to "
                                f"finish (or stop it) before {what} there") from None
            except OSError as e:  # no flock on this file system, no permission, ...
                raise UserError(f"cannot lock {self.path}: {e.strerror or e}") from None
            HELD[self.path] = lock
        atexit.register(self.release)

    def release(self):
        lock = HELD.pop(self.path, None)
        if lock is not None:
            lock.release(force=True)


def write_pid(fd):
    """filelock's on_acquired: the holder's pid, in place of the last holder's."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def check_lock_file(path):
    """RUN/.lock must be a plain file or absent: anything else was not made by this program."""
    try:
        kind = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(kind):
        what = "a folder" if stat.S_ISDIR(kind) else "a link" if stat.S_ISLNK(kind) else "not a file"
        raise UserError(f"{path} is not a lock file this program wrote ({what}); remove it if no process uses the run")


def lock_holder(path):
    """'process PID' from the lock file, read again for up to a second while the holder (which has
    just taken the lock) has not yet written its pid; 'another process' if it never does."""
    for _ in range(20):
        try:
            with open(path, "rb") as f:
                text = f.read(32)
        except OSError:
            text = b""
        if re.fullmatch(rb"[0-9]{1,12}\n", text) and alive(int(text)):
            return f"process {int(text)}"
        time.sleep(0.05)
    return "another process"


def alive(pid):
    """True when process `pid` exists (another user's too); 0 names no process (kill's own group)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# The saved config, checkpoints and resume.

def prepare_run_dir(cfg, train_path=None, model_path=None, may_change=()):
    """Save the resolved config in runs/NAME and print a short echo of it. A rerun must use the
    same settings, except the fields in `may_change` (how the run executes, not what it computes:
    selfdistill.OPERATIONAL), whose changes are appended to RUN/settings.jsonl with the step the run
    resumes after; and the same train file and base model contents (RUN/inputs.json: their digests
    at the first start)."""
    run_dir = run_folder(cfg)
    path = os.path.join(run_dir, "config.yaml")
    resolved = dataclasses.asdict(cfg)
    inputs = {"train": file_digest(train_path) if train_path else None,
              "model": model_digest(model_path) if model_path else None}
    changes = {}
    if os.path.isfile(path) and checkpoint_dirs(run_dir):  # nothing to resume: nothing to refuse
        saved = options.read_yaml_config(path)
        changed = [k for k in resolved if saved.get(k) != resolved[k]]
        refused = [k for k in changed if k not in may_change]
        if refused:
            k = refused[0]
            raise UserError(f"run '{cfg.run}' exists with {k}={saved.get(k)!r} (now {resolved[k]!r}); "
                            f"resume with the same settings or choose another --run")
        check_inputs(run_dir, cfg.run, inputs, {"train": train_path, "model": model_path})
        changes = {k: [saved.get(k), resolved[k]] for k in changed}
    if changes:  # the step is the newest checkpoint's: the one a resume starts from unless it is damaged
        step = int(os.path.basename(checkpoint_dirs(run_dir)[-1])[len("step_"):])
        append_jsonl(os.path.join(run_dir, "settings.jsonl"), {"step": step, "changed": changes})
        print("resuming with other settings (how it runs, not what it computes): "
              + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    write_atomic(os.path.join(run_dir, "inputs.json"), json.dumps(inputs) + "\n")
    write_atomic(path, yaml.safe_dump(resolved, sort_keys=False))
    print(config_echo(cfg, path))
    return run_dir


def config_echo(cfg, path):
    """One short line: the arm, the fields that differ from the Config's defaults (derived values
    included) and where the whole config is."""
    differ = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
              if f.name != "arm" and getattr(cfg, f.name) != f.default]
    return f"config: {cfg.arm}" + (" " + " ".join(differ) if differ else "") + f" (the rest at defaults; all in {path})"


# ---------------------------------------------------------------------------------------------
# What a run was made from: digests of contents, not paths (a file rebuilt under the same name is
# another input; the same weights under two names are one).

def file_digest(path):
    """sha256 of a file's bytes, 16 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


DIGESTS = {}  # (name, size, mtime) of every file -> digest: a model folder is read once per process


def model_digest(path):
    """A digest of a model folder's files (weights, config, tokenizer) and their names; hidden names
    (a hub cache's .locks) are skipped. A hub id that is no folder is its own digest."""
    if not os.path.isdir(path):
        return path
    files = []
    for root, dirs, names in os.walk(os.path.abspath(path)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, name) for name in sorted(names) if not name.startswith(".")]
    stamp = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    if stamp not in DIGESTS:
        listing = [(os.path.relpath(f, path), file_digest(f)) for f in files]
        DIGESTS[stamp] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return DIGESTS[stamp]


def saved_inputs(run_dir):
    """RUN/inputs.json: {"train": digest, "model": digest} at the run's first start; {} for a run begun
    before the file existed."""
    path = os.path.join(run_dir, "inputs.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is damaged (not a JSON object); remove it to go on without its check")
    return saved


def check_inputs(run_dir, run, inputs, paths):
    """On resume: the train file and the base model must hold what they held at the first start."""
    saved = saved_inputs(run_dir)
    for what, digest in inputs.items():
        if saved.get(what) not in (None, digest) and digest is not None:
            raise UserError(f"run '{run}' was started with other contents of its {what} "
                            f"{'file' if what == 'train' else 'folder'} {paths[what]} (digest {saved[what]}, "
                            f"now {digest}); resuming would mix the two: use another --run")


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
# The step's log line, and stopping after a checkpoint.

def log_step(run_dir, record, total_steps, finite, sample_every, rollouts):
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
        for i, r in enumerate(rollouts.records):
            append_jsonl(os.path.join(run_dir, "samples.jsonl"),
                         {"step": step, "id": r["id"], "question": r["question"], "response": rollouts.texts[i],
                          "reward": rollouts.rewards[i].item(), "context": rollouts.contexts[i],
                          "valid": rollouts.verdicts[i] == "ok", "verdict": rollouts.verdicts[i],
                          "truncated": rollouts.truncated[i]})


def stop_if_asked(stop, give_up, nonfinite, step):
    """After the step's checkpoint: stop on too many non-finite steps, or on a signal."""
    if give_up:
        raise UserError(f"stopping: {nonfinite} steps in a row had a non-finite loss or gradient "
                        f"(last at step {step}); lower lr or check the data")
    if stop["signal"]:
        print(f"stopped by signal {stop['signal']} after step {step}; checkpoint saved, "
              f"rerun the same command to resume")
        sys.exit(128 + stop["signal"])


def drop_step_and_stop(trainer, step):
    """A stop signal came while the HTTP critic was waiting: nothing of this step is applied yet, so
    the checkpoint of the `step` finished steps is written (if not already) and we stop; a resume
    repeats this step in full, as if never begun. trainer: selfdistill.Trainer."""
    stop, state = trainer.stop, trainer.state
    if step == 0:
        print(f"stopped by signal {stop['signal']} during the first step; nothing to save yet")
        sys.exit(128 + stop["signal"])
    save_checkpoint(trainer.run_dir, step, trainer.model, trainer.optimizer, trainer.scheduler,
                    {"step": step, "ema": state["ema"], "nonfinite": state["nonfinite"]}, trainer.tokenizer)
    stop_if_asked(stop, False, state["nonfinite"], step)


def checkpoint_and_stop(cfg, trainer, step, total_steps, finite):
    """8. After `step` finished steps: a checkpoint every checkpoint_every steps, at the end, on a stop
    signal, and before giving up after max_nonfinite non-finite steps in a row; then stop if asked.
    trainer: selfdistill.Trainer."""
    stop, state = trainer.stop, trainer.state
    give_up = not finite and state["nonfinite"] >= cfg.max_nonfinite
    if trainer.rank == 0 and (step == total_steps or step % cfg.checkpoint_every == 0 or stop["signal"] or give_up):
        save_checkpoint(trainer.run_dir, step, trainer.model, trainer.optimizer, trainer.scheduler,
                        {"step": step, "ema": state["ema"], "nonfinite": state["nonfinite"]}, trainer.tokenizer)
    if stop["signal"] or give_up:
        ranks.barrier()  # under torchrun the others wait for rank 0's checkpoint before leaving
    stop_if_asked(stop, give_up, state["nonfinite"], step)
