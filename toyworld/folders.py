"""A toy world's folder: where its files are, the named worlds (model=toy, model=toy-v2), its build
settings and their ranges, and its build.json, checked whenever it is read (a damaged world is a
one-line error that names its rebuild command, never a silent default), and the last step of a
build: moving the finished world into place (move_into_place), which the next reader finishes when
a kill stopped it halfway (recover). Building the world itself is toy_build.py's."""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
from dataclasses import asdict, dataclass

from plumbing import common, options, runfolder
from toyworld.toy import MAX_OPS, MIN_OPS, STYLES


# ---------------------------------------------------------------------------------------------
# Build settings.


@dataclass
class BuildSettings:
    seed: int = 0
    steps: int = 2000             # pretraining steps: a fixed count, so the build is deterministic
    batch_size: int = 32
    lr: float = 1e-3              # lr 3e-3 stalled before v1 (docs/history.md); 2e-3 learned slower here
    warmup: int = 50              # linear warm-up steps
    decay: float = 0.25           # last share of the steps, lr decays linearly to lr / 10 (most of
                                  # the accuracy appears during this decay)
    mix: tuple = (0.5, 0.35, 0.15)  # shares of plain / critique / reference examples
    styles: tuple = ("plain",)    # the solver's surface styles. v1 had four, unequally hard
                                  # (plain 32 %, flipped 14 %), so GRPO could win by choosing a
                                  # style. One style leaves arithmetic the only lever.
    faulty_share: float = 0.3     # ASSUMPTION: the solver's misconceptions. This share of the step
    fault_rate: float = 1.0       # facts (a, op, b) has one wrong result, which the solver's own
                                  # traces write at this rate (faulty_facts). 1.0 (v3): it fails
                                  # them systematically, the paper's regime, where its own samples
                                  # rarely hold the fix; v2's 0.8 wrote them right a fifth of the
                                  # time, which GRPO's reward found (the toy-v2 world). Without
                                  # misconceptions one style made the 1 M solver 98 % right; random
                                  # slips instead were unlearned by every arm in 5 steps: noise.
    recovery: float = 0.3         # ASSUMPTION: share of critique examples whose response departs
                                  # from the critique at one step (a wrong result, no loss on it)
                                  # and continues correctly from its own state; 0 = v1's teacher,
                                  # which only ever saw the critique copied and so pasted the
                                  # critique's digits after a student's error
    copy_prob: float = 0.5        # ASSUMPTION: chance a reference-conditioned target copies it
    critique_min_ops: int = 3     # critique examples use chains of >= this many operations: the
                                  # filter keeps long chains, where copying a critique is hardest
    n_train: int = 320
    n_test: int = 200
    n_transfer: int = 200         # the transfer split: filtered problems none of whose faulty facts
                                  # lies on any train question's chain (build_transfer)
    samples: int = 16             # samples per problem for the difficulty filter (Avg@16)
    max_correct: int = 4          # keep problems with at most this many correct (Avg@16 < 5/16)
    max_new_tokens: int = 64      # THE length budget: filter, training and evaluation all use it
                                  # (v1 filtered at 96 but trained at 64, cutting its "words"
                                  # traces); a 4-step plain trace is about 46 tokens
    score_batch: int = 1024       # rows per generate() call when scoring


MAX_PROBLEMS = 5000  # train + test + transfer problems a world can hold (see check_settings)


def check_settings(settings):
    """A one-line UserError for the first setting out of its range, before a build starts (a NaN
    or a share above 1 would otherwise cost a 6-minute build and give a world of nonsense)."""
    s, finite = settings, lambda x: isinstance(x, (int, float)) and math.isfinite(x)
    shares = ("decay", "faulty_share", "fault_rate", "recovery", "copy_prob")
    for name in ("lr", *shares):
        if not finite(getattr(s, name)):
            raise common.UserError(f"build setting {name} must be a finite number, got {getattr(s, name)}")
    for name in ("seed", "steps", "batch_size", "warmup", "critique_min_ops", "n_train", "n_test", "n_transfer",
                 "samples", "max_correct", "max_new_tokens", "score_batch"):
        if type(getattr(s, name)) is not int:
            raise common.UserError(f"build setting {name} must be a whole number, got {getattr(s, name)!r}")
    problems = s.n_train + s.n_test + s.n_transfer
    rules = [
        ("seed", 0 <= s.seed <= options.INT_LIMIT, f"must lie in 0..{options.INT_LIMIT}"),
        ("steps", 1 <= s.steps <= 10 ** 7, "must lie in 1..10000000"),
        ("batch_size", 1 <= s.batch_size <= 65536, "must lie in 1..65536"), ("lr", 0 < s.lr <= 1, "must lie in (0, 1]"),
        ("warmup", 1 <= s.warmup <= 10 ** 7, "must lie in 1..10000000 (steps of linear warm-up)"),
        ("decay", 0 < s.decay <= 1, "must lie in (0, 1] (the share of steps whose lr decays)"),
        *[(name, 0 <= getattr(s, name) <= 1, "must lie in [0, 1]") for name in shares[1:]],
        ("mix", len(s.mix) == 3 and all(finite(x) and x >= 0 for x in s.mix) and sum(s.mix) > 0,
         "must be three shares >= 0 (plain, critique, reference), not all 0"),
        ("styles", len(s.styles) > 0 and set(s.styles) <= set(STYLES), f"must name some of {','.join(STYLES)}"),
        ("critique_min_ops", MIN_OPS <= s.critique_min_ops <= MAX_OPS, f"must lie in {MIN_OPS}..{MAX_OPS}"),
        ("n_train", s.n_train >= 1, "must be >= 1"), ("n_test", s.n_test >= 1, "must be >= 1"),
        ("n_transfer", s.n_transfer >= 0, "must be >= 0 (0 = no transfer split)"),
        # the filter draws 40-100 distinct chains per kept problem, and the world has ~500,000
        ("n_train", problems <= MAX_PROBLEMS, f"+ n_test + n_transfer = {problems} must be at most {MAX_PROBLEMS}"),
        ("samples", 1 <= s.samples <= 1024, "must lie in 1..1024"),
        ("max_correct", 0 <= s.max_correct <= s.samples, f"must lie in 0..samples ({s.samples})"),
        ("max_new_tokens", 1 <= s.max_new_tokens <= 512, "must lie in 1..512 (a 4-step trace is ~46 tokens)"),
        ("score_batch", s.samples <= s.score_batch <= 2 ** 20, f"must lie in samples ({s.samples})..{2 ** 20}"),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise common.UserError(f"build setting {name}={getattr(s, name)!r} {rule}")
    return settings


def budget(root=None):
    """The toy world's one length budget: build.json's max_new_tokens, checked (read_build_info: a
    damaged record is a one-line error, never a silent default); for a world not built yet, the
    budget its build will use."""
    root = root or WORLD
    recover(root)
    if not os.path.lexists(os.path.join(root, "build.json")):
        return (named_settings(root) or BuildSettings()).max_new_tokens
    return read_build_info(root)["settings"]["max_new_tokens"]


# ---------------------------------------------------------------------------------------------
# Build once, cache in a folder. build.json is written last: a folder without it is incomplete.


def paths(root):
    return {"model_dir": os.path.join(root, "model"), "train": os.path.join(root, "train.jsonl"),
            "test": os.path.join(root, "test.jsonl"), "transfer": os.path.join(root, "transfer.jsonl")}


HERE = os.path.dirname(os.path.abspath(__file__))
WORLDS = {  # model=NAME: a folder beside this file, and the BuildSettings fields it changes
    "toy": ("toy_world", {}),  # v3, the headline: the solver fails its faulty facts systematically
    "toy-v2": ("toy_world_v2", {"fault_rate": 0.8}),  # the contrast: the fix is in its own samples
}
WORLD = os.path.join(HERE, WORLDS["toy"][0])


def world_root(model):
    """The folder of the toy world `model` names: a name of WORLDS, or a built world's folder or
    its model/ folder; None for any other model."""
    candidates = [os.path.join(HERE, WORLDS[model][0])] if model in WORLDS else \
        [os.path.abspath(model), os.path.dirname(os.path.abspath(model))]
    for root in candidates:
        recover(root)  # a build stopped in its last step leaves no build.json until this finishes it
    if model in WORLDS:
        return candidates[0]
    return next((root for root in candidates if os.path.isfile(os.path.join(root, "build.json"))), None)


def world_name(root):
    """The name (a key of WORLDS) of the named world whose folder `root` is; None for any other folder."""
    return next((name for name, (folder, _) in WORLDS.items()
                 if os.path.abspath(root) == os.path.join(HERE, folder)), None)


def named_settings(root):
    """The BuildSettings of the named world whose folder `root` is; None for any other folder."""
    name = world_name(root)
    return BuildSettings(**WORLDS[name][1]) if name else None


def settings_changes(saved, settings):
    """The fields where a built world's settings (build.json) differ from `settings`."""
    asked = json.loads(json.dumps(asdict(settings)))  # tuples as lists, as build.json holds them
    return {k: (saved.get(k), v) for k, v in asked.items() if saved.get(k) != v}


# ---------------------------------------------------------------------------------------------
# A built world is complete and self-consistent, or a one-line error that says how to rebuild it:
# never rebuilt silently (from defaults), and its build.json (the one record of its settings) is
# never touched by a reader, nor removed before a new build has succeeded.


def world_flag(root):
    """How the build commands name this folder: --world NAME for a named world, else --root ROOT."""
    name = world_name(root)
    return f"--world {name}" if name else f"--root {root}"


def rebuild_command(root):
    return f"python -m toyworld.toy_build build {world_flag(root)} --force"


def damaged(root, why, record_read=True):
    """The one-line error for a damaged world; the rebuild keeps a readable build.json's settings."""
    keeps = "it keeps the settings build.json records" if record_read else "add the flags it was built with"
    return common.UserError(f"the toy world in {root} is damaged: {why}; rebuild it: {rebuild_command(root)} ({keeps})")


def info_problem(info):
    """Why a parsed build.json is not a world's record (settings of the wrong type or out of range,
    no length budget), or None. Fields of other versions are kept as they are (settings_changes)."""
    if not isinstance(info, dict) or not isinstance(info.get("settings"), dict):
        return "build.json holds no 'settings' object"
    saved, fields = info["settings"], {f.name: f.default for f in dataclasses.fields(BuildSettings)}
    if "max_new_tokens" not in saved:  # the world's length budget: training and evaluation read it
        return "build.json's settings lack max_new_tokens (the length budget)"
    for key, value in saved.items():
        default = fields.get(key)
        if default is None:
            continue
        if isinstance(default, tuple):
            ok = isinstance(value, list) and all(type(x) is type(default[0]) for x in value)
        else:
            ok = type(value) is type(default) or type(default) is float and type(value) is int
        if not ok:
            return f"build.json's setting {key} is {value!r}, not {type(default).__name__} like {default!r}"
    try:
        check_settings(BuildSettings(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in saved.items() if k in fields}))
    except common.UserError as e:
        return f"build.json's {str(e).removeprefix('build ')}"
    return None


def read_build_info(root):
    """A built world's build.json, checked (info_problem); anything else is a one-line error that
    says how to rebuild. The file itself is only read."""
    try:
        with open(os.path.join(root, "build.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:  # garbage, not UTF-8, a folder in its place
        raise damaged(root, f"build.json cannot be read as JSON ({type(e).__name__})", record_read=False) from None
    problem = info_problem(info)
    if problem:
        raise damaged(root, problem, record_read=False)
    return info


def check_world(root):
    """build.json (read_build_info), then the files it records: the model folder, and train and test
    sets of the sizes it says (a missing or cut file is damage, not a reason to rebuild). Returns
    build.json's contents."""
    info, out = read_build_info(root), paths(root)
    if not os.path.isfile(os.path.join(out["model_dir"], "config.json")):
        raise damaged(root, "its model folder (model/) is missing or has no config.json")
    for split in ("train", "test"):
        if not os.path.isfile(out[split]):
            raise damaged(root, f"{split}.jsonl is missing")
        expected = info.get(f"n_{split}")
        if isinstance(expected, int):
            with open(out[split], "rb") as f:
                lines = sum(1 for line in f if line.strip())
            if lines != expected:
                raise damaged(root, f"{split}.jsonl has {lines} problems, build.json says {expected}")
    return info


STAGING, OLD = ".building", ".old"  # a build's staging folder in ROOT, and the old entries inside it


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block ends (a few renames), then arrive."""
    held = {signal.SIGINT, signal.SIGTERM}
    mask = getattr(signal, "pthread_sigmask", None)
    if mask:
        mask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if mask:
            mask(signal.SIG_UNBLOCK, held)


def move_into_place(staging, root):
    """The staged world replaces the old one: the old build.json goes first (from then on the folder
    reads as having no record, never as the old record over new files), the other entries are
    renamed over theirs, the new build.json comes last. Signals wait for these renames; a kill among
    them (SIGKILL, power) leaves a move that recover() finishes, since what is staged is complete.
    Called again on such a folder, it moves what is still staged."""
    if not os.path.isfile(os.path.join(staging, "build.json")):
        return  # build() writes build.json last: without it nothing complete was staged, the old world stays
    trash = os.path.join(staging, OLD)
    names = sorted((name for name in os.listdir(staging) if name != OLD), key=lambda name: name == "build.json")
    with signals_held():
        os.makedirs(trash, exist_ok=True)
        if os.path.lexists(os.path.join(root, "build.json")):
            os.replace(os.path.join(root, "build.json"), os.path.join(trash, "build.json"))
        for name in names:  # build.json last
            target = os.path.join(root, name)
            if os.path.lexists(target):
                os.replace(target, os.path.join(trash, name))  # folders cannot be renamed over folders
            os.replace(os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)


def interrupted_move(root):
    """True when a build was stopped in its last step, moving its finished world into place: ROOT's
    build.json already moved aside (into ROOT/.building/.old), the new one still staged."""
    staging = os.path.join(root, STAGING)
    return (os.path.isdir(os.path.join(staging, OLD)) and os.path.isfile(os.path.join(staging, "build.json"))
            and not os.path.lexists(os.path.join(root, "build.json")))


def recover(root):
    """Finish an interrupted move (interrupted_move) under the world's build lock, saying so: the
    staged world is complete and its build.json is the only record of its settings, so it is moved
    into place, never cleared or rebuilt from defaults. Anything else: nothing to do."""
    if not root or not interrupted_move(root):
        return
    lock = runfolder.RunLock(root, "finishing its interrupted build", noun="toy world folder")
    try:
        if interrupted_move(root):  # the lock's last holder may have finished it just before
            move_into_place(os.path.join(root, STAGING), root)
            print(f"the toy world in {root}: its build was stopped while moving into place; finished that "
                  f"move (the staged world was complete)", file=sys.stderr)
    finally:
        lock.release()


WORLD_ENTRIES = ("model", "train.jsonl", "test.jsonl", "transfer.jsonl")  # what a build writes besides build.json
