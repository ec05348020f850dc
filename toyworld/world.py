"""The toy world as the scripts see it: the one seam between the method (selfdistill.py), the
scripts that read runs (eval.py, compare.py, analyze.py, prepare.py) and the toy world (toy.py,
toy_build.py). Every question a script asks of the world goes through here: is this model a toy
world, where are its model and data, what is its length budget, are its answers checked exactly,
which critic judges it, what reference the teacher sees (the alignment dial), what its
instruments measure. Any other model answers "no" / "none" / the data files it was given.
"""
import json
import math
import os
import sys

from plumbing import common
import critic
from toyworld import toy
from toyworld import folders
from toyworld import toy_build
from toyworld import toy_critic
from plumbing.common import UserError


def is_world_model(model):
    """True for a named world (model=toy, model=toy-v2) and for any built world's folder or its
    model/ folder (build.json in the folder or beside it)."""
    return folders.world_root(model) is not None


def model_settings(cfg):
    """The settings a run's model decides, set in place: the prompt set (`prompts=auto`: toy for a
    toy-world model, instruct for any other) and the length budget (`max_new_tokens=0`: a toy
    world's build.json, 512 otherwise); the toy-only keys are refused on any other model."""
    toy_model = is_world_model(cfg.model)
    if cfg.prompts == "auto":
        cfg.prompts = "toy" if toy_model else "instruct"
    elif cfg.prompts == "toy" and not toy_model:  # a chat model would see a bare question
        raise UserError(f"prompts=toy is the toy world's prompt set (the question alone, no instruction); "
                        f"model={cfg.model} is not a toy-world model: leave prompts at auto (instruct)")
    if toy_model:  # model=toy, or a built world's model folder: that world's build.json
        budget = folders.budget(folders.world_root(cfg.model))
        if cfg.max_new_tokens == 0:
            cfg.max_new_tokens = budget
        elif cfg.max_new_tokens != budget:
            print(f"warning: max_new_tokens={cfg.max_new_tokens} differs from the toy world's budget "
                  f"{budget} (build.json), which its difficulty filter used", file=sys.stderr)
    elif cfg.max_new_tokens == 0:
        cfg.max_new_tokens = 512
    if not toy_model and (cfg.toy_order, cfg.toy_phrasing) != ("grouped", "other"):
        raise UserError("config keys 'toy_order' and 'toy_phrasing' apply to toy-world models only")


# ---------------------------------------------------------------------------------------------
# Where a run's model and data are.


def resolve_paths(cfg):
    """A run's model folder and data files. A toy world (named or a folder) gives its model and,
    for empty train_file / test_file, its data; any other model without data files gets the
    default world's data."""
    root = folders.world_root(cfg.model)
    model, train, test = cfg.model, cfg.train_file, cfg.test_file
    if root or not train or not test:
        built = toy_build.ensure_built(root or folders.WORLD)
        model = built["model_dir"] if root else model
        train, test = train or built["train"], test or built["test"]
    return model, train, test


TRANSFER_WARNED = set()  # worlds whose lost transfer split was reported (once per process)


def transfer_path(cfg):
    """The toy world's transfer split (toy_build.build_transfer) for a run on a toy world with the
    world's own test set; None otherwise, or when the world has none (built before v3, or
    n_transfer=0). A world whose build.json records a transfer split that is gone says so, once."""
    root = folders.world_root(cfg.model)
    if not root or cfg.test_file:
        return None
    path = folders.paths(root)["transfer"]
    if os.path.isfile(path) and os.path.getsize(path):
        return path
    recorded = folders.read_build_info(root).get("n_transfer")
    if recorded and root not in TRANSFER_WARNED:
        TRANSFER_WARNED.add(root)
        print(f"warning: the toy world in {root} built a transfer split of {recorded} problems (build.json), "
              f"but {path} is gone or empty: no transfer rows are evaluated; rebuild the world to get it back: "
              f"{folders.rebuild_command(root)}", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------------------------
# What the teacher sees and who judges.


def toy_dial(cfg):
    """True when the toy world's references are rebuilt with non-default alignment knobs."""
    return is_world_model(cfg.model) and (cfg.toy_order, cfg.toy_phrasing) != ("grouped", "other")


def load_records(cfg, path, need_solution=False):
    """A data file's records (common.load_jsonl, gold answers checked). Under the alignment dial
    (toy_order / toy_phrasing) each record's `solution` is rewritten here, once, into the reference
    the dial asks for (a route that follows the chain and/or the solver's wording): the reference
    the teacher sees in the `reference` arm is then always the record's `solution`."""
    dial = toy_dial(cfg)
    records = common.load_jsonl(path, need_solution and not dial, critic.normalize_answer)
    if dial:
        for r in records:
            r["solution"] = toy.reference_solution(r["question"], cfg.toy_order, cfg.toy_phrasing)
    return records


def exact_answers(cfg):
    """The toy world's answers are integers, checked exactly; any other model's go to math-verify."""
    return is_world_model(cfg.model)


def critic_folder(cfg):
    """critic=hf's model: on a toy world, a name of its learned critics (weak / medium / strong,
    toy_critic.py) is that critic's folder; any other critic_model is used as given (a folder or a
    hub id). A toy critic that is not built, or an unknown name, is a one-line error."""
    root = folders.world_root(cfg.model)
    name = cfg.critic_model
    if cfg.critic != "hf" or not root or os.path.exists(name) or "/" in name or os.sep in name:
        return name
    path = toy_critic.resolve(root, name)
    if path is None:
        raise UserError(f"critic_model={name} is neither a folder nor a toy critic; the toy world's learned "
                        f"critics are {', '.join(toy_critic.NAMES)} (or give a critic's folder)")
    if not os.path.isfile(os.path.join(toy_critic.folder(root), "build.json")):
        raise UserError(f"the toy world in {root} has no learned critics yet; build them (about 10 CPU "
                        f"minutes): python -m toyworld.toy_critic build {folders.world_flag(root)}")
    return path


def make_judge(cfg, device, records=()):
    """The frozen critic: the toy world's rule critic (which reads toy chains only: `records` it
    could not critique are a one-line error), or a model critic (critic.py; on a toy world
    critic=hf critic_model=weak|medium|strong names its learned critics, critic_folder)."""
    if cfg.critic != "rule":
        return critic.from_config(cfg, device, critic_folder(cfg))
    toy.check_rule_critic(records)
    return toy.RuleCritic()


def toy_restyle(cfg):
    """The no-prefix critique control's rewrite of a step: on toy chains (the rule critic reads
    nothing else), the reference-only wording; a model critic's steps are kept as written."""
    return toy.restyle_step if cfg.critic == "rule" else None


# ---------------------------------------------------------------------------------------------
# The world's instruments.


def toy_instruments(scored):
    """The toy world's attribution of a checkpoint's accuracy (toy.trace_stats over all samples)."""
    return toy.trace_stats([t for s in scored for t in s[5]], [c for s in scored for c in s[1]])


def teacher_ceiling(config):
    """The toy world's measured accuracy of the base teacher with this arm's context (build.json's
    `ceilings`, toy_build.follow_rates; with a learned toy critic, critics/build.json's, measured
    on its held-out attempts): with a fixed base teacher the student at best becomes it.
    None for GRPO, a moving teacher, a dial setting not measured, or a model that is no toy world."""
    root = folders.world_root(config.get("model", ""))
    dial = (config.get("toy_order"), config.get("toy_phrasing"))
    key = {("grouped", "other"): config["arm"], ("chain", "same"): "reference_aligned"}.get(dial)
    if not root or config["arm"] == "grpo" or config.get("teacher") != "base" or key is None:
        return None
    if config["arm"] != "reference" and dial != ("grouped", "other"):
        return None
    path, key_path = os.path.join(root, "build.json"), ("ceilings", key)
    if config.get("critic", "rule") != "rule":  # a learned toy critic's own (toy_critic.quality); any other: unknown
        name = toy_critic.name_of(root, config.get("critic_model", ""))
        if name is None or config["arm"] != "critique":
            return None
        path, key_path = os.path.join(toy_critic.folder(root), "build.json"), ("critics", name)
    try:
        with open(path) as f:
            value = json.load(f).get(key_path[0], {}).get(key_path[1])
        value = value.get("ceiling") if isinstance(value, dict) else value
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
