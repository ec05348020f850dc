"""Protects the fixes of issue 30, "Reliability IV" (the parts of toy_build.py, world.py, eval.py,
analyze.py, tracking.py, options.py and selfdistill.py): every bad input or damaged state below ends
in one `error:` line and exit code 2, a counted skip with a warning, or a documented recovery; never
a traceback, a hang, a silent wrong result or a destroyed file.

| input | how it ends |
|---|---|
| a built world missing model/, config.json, train/test.jsonl, or with a cut train.jsonl | one line "is damaged ...; rebuild it: python -m toyworld.toy_build build ... --force"; build.json byte for byte |
| build.json garbage, empty, not UTF-8, a list, a folder, no settings, budget as text / bool / 0 / huge, a bad setting | the same, through ensure_built, training, `python -m toyworld.toy_build build` and `probe` |
| a folder with a world's files but no build.json | one line: no record of its settings; nothing rebuilt |
| `build --force` interrupted (Ctrl-C) or failing halfway | the old world intact, build.json byte for byte; the next build clears the leftover |
| a second build while one runs (a live lock); a stale lock | one line "in use by process N"; the stale one is taken over |
| `build --root DIR --force` with no flags | rebuilt with the settings its build.json records |
| transfer.jsonl gone or emptied | one warning per process, no transfer rows |
| a build.json of another version (no measurements) | `python -m toyworld.toy_build build` prints a short summary |
| a base model replaced in place under the same path | eval.py and analyze.py: one line |
| a finished run whose report_to package is missing | eval.py / compare.py / analyze.py read it; eval warns its rows wait |
| a bad WANDB_MODE / WANDB_PROJECT, a bad stored run id, no API key online, a package that fails to import | one line at start |
| eval rows written by an interrupted evaluation | sent to TensorBoard by the next `eval.py RUN` |
| --explain 0 / -3, temperature 1e-300, grpo_* on a self-distillation arm, huge lora_r / threads / seeds / sizes, device=mps, critic_max_new_tokens=0, a key twice | one line |
| Ctrl-C while selfdistill.py / toy_build.py import torch | exit 130, no traceback |
| analyze.py with the rule critic on non-toy data | one line |
| a test question longer than the model's context | counted and skipped with a warning; all too long: one line |
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import analyze
import compare
import eval as ev
from plumbing import runfolder
import selfdistill
from toyworld import toy_build
from plumbing import tracking
from toyworld import world
from plumbing.common import UserError
from conftest import make_char_tokenizer, make_tiny_model, one_line_error, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def no_build(monkeypatch):
    monkeypatch.setattr(toy_build, "build", lambda *a, **k: pytest.fail("a build started"))


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory):
    """A copy of the shipped headline world (toy_world/); each test damages a copy of this copy."""
    root = str(tmp_path_factory.mktemp("shipped") / "world")
    shutil.copytree(toy_build.WORLD, root, ignore=shutil.ignore_patterns(".lock", ".building"))
    return root


@pytest.fixture
def world_copy(shipped_copy, tmp_path):
    root = str(tmp_path / "world")
    shutil.copytree(shipped_copy, root)
    return root


def edit_info(root, change):
    path = os.path.join(root, "build.json")
    info = json.load(open(path))
    change(info)
    with open(path, "w") as f:
        json.dump(info, f)


def put(path, content):
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


# Each damage: (name, function of the world's folder). build.json is the record that must survive.
DAMAGES = {
    "no train.jsonl": lambda r: os.remove(os.path.join(r, "train.jsonl")),
    "no test.jsonl": lambda r: os.remove(os.path.join(r, "test.jsonl")),
    "no model folder": lambda r: shutil.rmtree(os.path.join(r, "model")),
    "no model config": lambda r: os.remove(os.path.join(r, "model", "config.json")),
    "train.jsonl cut": lambda r: put(os.path.join(r, "train.jsonl"),
                                     "".join(open(os.path.join(r, "train.jsonl")).readlines()[:100])),
    "test.jsonl empty": lambda r: put(os.path.join(r, "test.jsonl"), ""),
    "build.json garbage": lambda r: put(os.path.join(r, "build.json"), "{settings: oops"),
    "build.json empty": lambda r: put(os.path.join(r, "build.json"), ""),
    "build.json not UTF-8": lambda r: put(os.path.join(r, "build.json"), b'{"settings": "\xff\xfe"}'),
    "build.json a list": lambda r: put(os.path.join(r, "build.json"), "[1, 2]"),
    "build.json no settings": lambda r: edit_info(r, lambda i: i.pop("settings")),
    "settings null": lambda r: edit_info(r, lambda i: i.update(settings=None)),
    "budget as text": lambda r: edit_info(r, lambda i: i["settings"].update(max_new_tokens="64")),
    "budget missing": lambda r: edit_info(r, lambda i: i["settings"].pop("max_new_tokens")),
    "budget zero": lambda r: edit_info(r, lambda i: i["settings"].update(max_new_tokens=0)),
    "budget true": lambda r: edit_info(r, lambda i: i["settings"].update(max_new_tokens=True)),
    "budget huge": lambda r: edit_info(r, lambda i: i["settings"].update(max_new_tokens=10 ** 9)),
    "budget decimal": lambda r: edit_info(r, lambda i: i["settings"].update(max_new_tokens=64.5)),
    "fault_rate text": lambda r: edit_info(r, lambda i: i["settings"].update(fault_rate="high")),
    "fault_rate above 1": lambda r: edit_info(r, lambda i: i["settings"].update(fault_rate=3.0)),
    "mix not a list": lambda r: edit_info(r, lambda i: i["settings"].update(mix=0.5)),
}
CONFIG_DAMAGES = [name for name in DAMAGES if name.startswith(("build.json", "settings", "budget", "fault", "mix"))]


def snapshot(root):
    path = os.path.join(root, "build.json")
    return open(path, "rb").read() if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------
# 1. Damaged worlds are reported, never rebuilt; build.json is kept byte for byte.


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_world_is_one_line_and_keeps_its_build_json(damage, world_copy, monkeypatch):
    no_build(monkeypatch)
    DAMAGES[damage](world_copy)
    before = snapshot(world_copy)
    with pytest.raises(UserError, match="is damaged") as error:
        toy_build.ensure_built(world_copy, progress=False)
    message = str(error.value)
    assert "\n" not in message and f"build --root {world_copy} --force" in message
    assert snapshot(world_copy) == before  # byte for byte


@pytest.mark.parametrize("damage", DAMAGES)
def test_training_on_a_damaged_world_is_one_line(damage, world_copy, tmp_path, monkeypatch, capsys):
    no_build(monkeypatch)
    DAMAGES[damage](world_copy)
    before = snapshot(world_copy)
    code, _, err = run_main(["--context", "grpo", f"model={world_copy}", f"out_dir={tmp_path / 'runs'}",
                             "threads=1", "eval_at_end=false"], capsys)
    one_line_error(code, err, "rebuild it")
    assert snapshot(world_copy) == before


@pytest.mark.parametrize("command", ["build", "probe"])
@pytest.mark.parametrize("damage", ["no train.jsonl", "no model folder", "build.json garbage", "budget as text",
                                    "build.json no settings"])
def test_the_build_command_reports_a_damaged_world(command, damage, world_copy, monkeypatch):
    no_build(monkeypatch)
    DAMAGES[damage](world_copy)
    before = snapshot(world_copy)
    with pytest.raises(UserError, match="is damaged"):
        toy_build.command_line([command, "--root", world_copy, "--threads", "1"])
    assert snapshot(world_copy) == before


@pytest.mark.parametrize("via", ["ensure_built", "training"])
@pytest.mark.parametrize("damage", ["no test.jsonl", "build.json garbage", "budget as text"])
def test_a_damaged_named_world_names_its_rebuild(damage, via, shipped_copy, tmp_path, monkeypatch, capsys):
    """model=toy on a damaged toy_world/: the message says `--world toy --force`."""
    no_build(monkeypatch)
    monkeypatch.setattr(toy_build, "HERE", str(tmp_path))
    root = os.path.join(tmp_path, "toy_world")
    shutil.copytree(shipped_copy, root)
    DAMAGES[damage](root)
    before = snapshot(root)
    if via == "ensure_built":
        with pytest.raises(UserError, match="build --world toy --force"):
            toy_build.ensure_built(root, progress=False)
    else:
        code, _, err = run_main(["model=toy", f"out_dir={tmp_path / 'runs'}", "threads=1", "eval_at_end=false"], capsys)
        one_line_error(code, err, "build --world toy --force")
    assert snapshot(root) == before


@pytest.mark.parametrize("damage", ["no test.jsonl", "no model folder", "build.json garbage", "budget as text"])
def test_evaluating_a_run_of_a_damaged_world_is_one_line(damage, world_copy, data, tmp_path, monkeypatch, capsys):
    no_build(monkeypatch)
    run_dir = made_run(tmp_path, world_copy, "", test_file="", train_file="", prompts="auto")
    DAMAGES[damage](world_copy)
    before = snapshot(world_copy)
    code, _, err = run_main([run_dir], capsys, script=ev)
    one_line_error(code, err, "rebuild it")
    assert snapshot(world_copy) == before


@pytest.mark.parametrize("left", [["model"], ["train.jsonl"], ["model", "train.jsonl", "test.jsonl", "transfer.jsonl"]])
def test_world_files_without_a_record_are_not_rebuilt(left, world_copy, tmp_path, monkeypatch):
    no_build(monkeypatch)
    root = str(tmp_path / "bare")
    os.makedirs(root)
    for name in left:
        (shutil.copytree if os.path.isdir(os.path.join(world_copy, name)) else shutil.copy)(
            os.path.join(world_copy, name), os.path.join(root, name))
    with pytest.raises(UserError, match="no build.json"):
        toy_build.ensure_built(root, progress=False)
    assert sorted(os.listdir(root)) == sorted(left)


def test_the_shipped_worlds_are_complete():
    """A control: the named worlds pass the check every reader now makes."""
    for name in toy_build.WORLDS:
        assert toy_build.check_world(toy_build.world_root(name))["settings"]["max_new_tokens"] == 64


def test_a_budget_read_from_a_damaged_record_is_an_error_not_a_default(world_copy):
    DAMAGES["build.json garbage"](world_copy)
    with pytest.raises(UserError, match="is damaged"):
        toy_build.budget(world_copy)
    with pytest.raises(UserError, match="is damaged"):
        selfdistill.load_config([f"model={world_copy}/model"])


# ---------------------------------------------------------------------------------------------
# 2. Builds go into a staging folder, under a lock, and replace the old world only when complete.


def staged_build(written=None, fail=None):
    """A stand-in for build(): writes a complete (small) world into its staging folder, or raises
    `fail` halfway (after the model folder and a train file are written)."""
    def fake(root, out, settings, progress, threads):
        os.makedirs(out["model_dir"])
        put(os.path.join(out["model_dir"], "config.json"), "{}")
        put(out["train"], '{"question": "1+1", "answer": "2"}\n')
        if fail:
            raise fail
        put(out["test"], '{"question": "2+2", "answer": "4"}\n')
        put(out["transfer"], "")
        info = {"settings": json.loads(json.dumps(vars(settings))), "n_train": 1, "n_test": 1, "n_transfer": 0}
        put(os.path.join(root, "build.json"), json.dumps(info))
        if written is not None:
            written.append(settings)
    return fake


@pytest.mark.parametrize("fail", [KeyboardInterrupt(), RuntimeError("out of memory"), OSError(28, "No space left")])
def test_an_interrupted_or_failed_rebuild_leaves_the_old_world(fail, world_copy, monkeypatch):
    monkeypatch.setattr(toy_build, "build", staged_build(fail=fail))
    before = {name: open(os.path.join(world_copy, name), "rb").read() for name in ("build.json", "train.jsonl")}
    with pytest.raises(type(fail)):
        toy_build.ensure_built(world_copy, progress=False, force=True)
    assert {name: open(os.path.join(world_copy, name), "rb").read() for name in before} == before
    assert toy_build.check_world(world_copy)["n_train"] == 320  # still complete, still itself
    runfolder.RunLock(world_copy, "checking").release()  # released: the OS lock is free again
    written = []
    monkeypatch.setattr(toy_build, "build", staged_build(written))
    toy_build.ensure_built(world_copy, progress=False, force=True)  # the next build clears the leftover
    assert not os.path.exists(os.path.join(world_copy, ".building"))
    assert toy_build.check_world(world_copy)["n_train"] == 1 and len(written) == 1


def test_force_without_flags_rebuilds_with_the_worlds_own_settings(world_copy, monkeypatch):
    written = []
    monkeypatch.setattr(toy_build, "build", staged_build(written))
    monkeypatch.setattr(toy_build, "summary", lambda root: "")
    edit_info(world_copy, lambda i: i["settings"].update(fault_rate=0.9, n_test=150))  # its own, not the defaults
    toy_build.command_line(["build", "--root", world_copy, "--force", "--threads", "1"])
    assert written[0].fault_rate == 0.9 and written[0].n_test == 150 and written[0].mix == (0.5, 0.35, 0.15)


def test_a_second_build_into_the_same_folder_is_refused(world_copy, monkeypatch):
    monkeypatch.setattr(toy_build, "build", staged_build())
    from conftest import ROOT
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from plumbing import runfolder; runfolder.RunLock(sys.argv[2], 'building'); print('held', "
                               "flush=True); time.sleep(60)", ROOT, world_copy], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another process holds the world's OS lock
        before = snapshot(world_copy)
        with pytest.raises(UserError, match=f"toy world folder {world_copy} is in use by process {holder.pid}"):
            toy_build.ensure_built(world_copy, progress=False, force=True)
        assert snapshot(world_copy) == before
    finally:
        holder.kill()
        holder.wait()
    toy_build.ensure_built(world_copy, progress=False, force=True)  # its process gone: the OS lock with it
    assert toy_build.check_world(world_copy)["n_train"] == 1


def test_an_empty_folder_is_built_once(tmp_path, monkeypatch, capsys):
    written = []
    monkeypatch.setattr(toy_build, "build", staged_build(written))
    root = str(tmp_path / "new")
    os.makedirs(os.path.join(root, ".building", "model"))  # the leftover of an interrupted first build
    toy_build.ensure_built(root, progress=True)
    toy_build.ensure_built(root, progress=True)
    assert len(written) == 1 and "toy world is missing" in capsys.readouterr().err
    assert sorted(set(os.listdir(root)) - {".lock"}) == ["build.json", "model", "test.jsonl", "train.jsonl",
                                                         "transfer.jsonl"]


# ---------------------------------------------------------------------------------------------
# 3. The transfer split, the summary and the probe.


@pytest.mark.parametrize("how", ["removed", "emptied"])
def test_a_lost_transfer_split_warns_once(how, world_copy, monkeypatch, capsys):
    path = os.path.join(world_copy, "transfer.jsonl")
    os.remove(path) if how == "removed" else put(path, "")
    monkeypatch.setattr(world, "TRANSFER_WARNED", set())
    cfg = selfdistill.Config(model=world_copy)
    assert world.transfer_path(cfg) is None and world.transfer_path(cfg) is None
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "transfer split of 200 problems" in err and "--force" in err


def test_a_world_without_a_transfer_split_is_silent(world_copy, monkeypatch, capsys):
    os.remove(os.path.join(world_copy, "transfer.jsonl"))
    edit_info(world_copy, lambda i: i.update(n_transfer=0))
    monkeypatch.setattr(world, "TRANSFER_WARNED", set())
    assert world.transfer_path(selfdistill.Config(model=world_copy)) is None
    assert "warning" not in capsys.readouterr().err


def test_a_build_json_of_another_version_gets_a_short_summary(world_copy, monkeypatch, capsys):
    no_build(monkeypatch)
    edit_info(world_copy, lambda i: [i.pop(k) for k in ("plain_avg", "seconds", "critique_accuracy")])
    toy_build.command_line(["build", "--root", world_copy])
    assert "lacks some of this version's measurements" in capsys.readouterr().out


def test_probe_reads_a_bad_test_line_as_one_line(world_copy):
    lines = open(os.path.join(world_copy, "test.jsonl")).readlines()
    put(os.path.join(world_copy, "test.jsonl"), "".join(lines[:-1]) + "{not json\n")
    with pytest.raises(UserError, match="test.jsonl:200: not valid JSON"):
        toy_build.command_line(["probe", "--root", world_copy, "--threads", "1"])


# ---------------------------------------------------------------------------------------------
# A run on a tiny model, made without training: config.yaml and inputs.json as training writes
# them, and a checkpoint folder whose adapter names its base.


@pytest.fixture
def base_copy(tiny_model_dir, tmp_path):
    path = str(tmp_path / "base")
    shutil.copytree(tiny_model_dir, path)
    return path


def made_run(tmp_path, model_dir, data, name="r", checkpoint=False, **extra):
    values = dict(model=model_dir, train_file=data, test_file=data, prompts="instruct", run=name,
                  out_dir=str(tmp_path / "runs"), eval_samples=1, eval_questions=2, max_new_tokens=4, threads=1)
    cfg = selfdistill.resolve(selfdistill.Config(**{**values, **extra}))
    run_dir = runfolder.prepare_run_dir(cfg, data or None, model_dir)
    if checkpoint:
        step = os.path.join(run_dir, "checkpoints", "step_000001")
        os.makedirs(step)
        put(os.path.join(step, "adapter_config.json"), json.dumps({"base_model_name_or_path": os.path.abspath(model_dir)}))
    return run_dir


def replace_weights(path):
    make_tiny_model(make_char_tokenizer(), seed=7).save_pretrained(path)


def edit_model_config(path):
    config = json.load(open(os.path.join(path, "config.json")))
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    put(os.path.join(path, "config.json"), json.dumps(config))


# ---------------------------------------------------------------------------------------------
# 4. The adapter's base is compared by contents in every program that loads a checkpoint.


@pytest.mark.parametrize("change", [replace_weights, edit_model_config], ids=["weights", "config"])
def test_eval_refuses_a_base_replaced_in_place(change, base_copy, data, tmp_path, capsys):
    run_dir = made_run(tmp_path, base_copy, data, checkpoint=True)
    change(base_copy)
    code, _, err = run_main([run_dir], capsys, script=ev)
    one_line_error(code, err, "whose files have changed since the run started")


@pytest.mark.parametrize("change", [replace_weights, edit_model_config], ids=["weights", "config"])
def test_analyze_refuses_a_base_replaced_in_place(change, base_copy, data, tmp_path, capsys):
    run_dir = made_run(tmp_path, base_copy, data, checkpoint=True)
    change(base_copy)
    code, _, err = run_main([run_dir, "--step", "1"], capsys, script=analyze)
    one_line_error(code, err, "whose files have changed since the run started")


def test_an_unchanged_base_under_its_own_path_passes(base_copy, data, tmp_path):
    run_dir = made_run(tmp_path, base_copy, data, checkpoint=True)
    ev.check_adapter_base(os.path.join(run_dir, "checkpoints", "step_000001"), base_copy, run_dir)


# ---------------------------------------------------------------------------------------------
# 5. Programs that only read a run check only what they read; training checks its logging at start.


@pytest.fixture
def without(monkeypatch):
    """without(name, error): importing `name` raises `error` (a missing or broken package)."""
    import builtins
    real = builtins.__import__

    def block(name, error):
        def fake(module, *args, **kwargs):
            if module == name or module.startswith(name + "."):
                raise error
            return real(module, *args, **kwargs)
        monkeypatch.setattr(builtins, "__import__", fake)
        for key in [k for k in sys.modules if k.removeprefix("torch.utils.") == name
                    or k.removeprefix("torch.utils.").startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, key)
    return block


@pytest.mark.parametrize("report_to", ["wandb", "tensorboard"])
def test_eval_reads_a_run_whose_logging_package_is_missing(report_to, without, tiny_model_dir, data, tmp_path,
                                                           capsys):
    run_dir = made_run(tmp_path, tiny_model_dir, data, report_to=report_to)
    without(report_to, ImportError(f"No module named '{report_to}'"))
    code, out, err = run_main([run_dir], capsys, script=ev)
    assert code in (0, None) and "Traceback" not in err and "error:" not in err, err
    assert f"eval row(s) not sent to {report_to}" in err and "later `python eval.py" in err
    assert len(runfolder.read_jsonl(os.path.join(run_dir, "eval.jsonl"))) == 1  # step 0 evaluated


@pytest.mark.parametrize("report_to", ["wandb", "tensorboard"])
def test_compare_and_analyze_read_a_run_whose_logging_package_is_missing(report_to, without, tmp_path, capsys):
    run_dir = str(tmp_path / "r")
    os.makedirs(run_dir)
    cfg = vars(selfdistill.resolve(selfdistill.Config(run="r", report_to=report_to)))
    put(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg))
    row = {"step": 0, "n": 4, "k": 4, "questions": 10, "temperature": 1.0, **{m: 0.5 for m in ev.METRICS},
           "ci": {m: [0.4, 0.6] for m in ev.METRICS}}
    for step in (0, 10):  # the base and a checkpoint (compare refuses a run evaluated at step 0 only)
        runfolder.append_jsonl(os.path.join(run_dir, "eval.jsonl"), {**row, "step": step})
    without(report_to, ImportError(f"No module named '{report_to}'"))
    code, out, err = run_main([run_dir], capsys, script=compare)
    assert code in (0, None) and "error:" not in err, err
    assert ev.target_config(run_dir, [])[0].report_to == report_to  # analyze.py's reading of a run
    with pytest.raises(UserError, match=f"report_to={report_to} needs the"):  # training still checks
        selfdistill.load_config([f"report_to={report_to}"])


@pytest.mark.parametrize("report_to, error", [
    ("tensorboard", RuntimeError("protobuf version mismatch")),
    ("tensorboard", AttributeError("module 'numpy' has no attribute 'object'")),
    ("wandb", TypeError("Descriptors cannot be created directly")),
    ("wandb", OSError("libssl.so: cannot open shared object file")),
])
def test_a_logging_package_that_fails_to_import_fails_the_check(report_to, error, without, capsys):
    without(report_to, error)
    code, _, err = run_main([f"report_to={report_to}", "threads=1"], capsys)
    one_line_error(code, err, f"the {report_to} package is installed but does not import ({type(error).__name__}")


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No API key anywhere, online by default; WANDB_* cleared."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    put(str(tmp_path / "netrc"), "")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return monkeypatch


@pytest.mark.parametrize("env, stored, fragment", [
    ({"WANDB_MODE": "bogus"}, None, "WANDB_MODE='bogus' is not a wandb mode"),
    ({"WANDB_MODE": ""}, None, "WANDB_MODE='' is not a wandb mode"),
    ({"WANDB_MODE": "offline", "WANDB_PROJECT": "a/b"}, None, "WANDB_PROJECT='a/b' is refused by wandb"),
    ({"WANDB_MODE": "offline", "WANDB_PROJECT": "p" * 200}, None, "exceeded 128 characters"),
    ({"WANDB_MODE": "offline", "WANDB_PROJECT": "what?"}, None, "is refused by wandb"),
    ({"WANDB_MODE": "offline"}, "", "Run ID cannot be empty"),
    ({"WANDB_MODE": "offline"}, "  \n", "Run ID cannot be empty"),
    ({"WANDB_MODE": "offline"}, "a:b", "Run ID cannot contain"),
    ({"WANDB_MODE": "offline"}, "x/y", "remove that file to start a new wandb run"),
    ({}, None, "needs a W&B API key"),
    ({"WANDB_MODE": "online"}, None, "WANDB_MODE=offline"),
    ({"WANDB_MODE": "shared"}, None, "wandb login"),
])
def test_wandb_settings_it_would_refuse_are_one_line_at_start(env, stored, fragment, wandb_env, tmp_path, capsys):
    for key, value in env.items():
        wandb_env.setenv(key, value)
    out_dir = tmp_path / "runs"
    if stored is not None:
        os.makedirs(out_dir / "r")
        put(str(out_dir / "r" / "wandb_id"), stored)
    code, _, err = run_main(["report_to=wandb", "run=r", f"out_dir={out_dir}", "threads=1"], capsys)
    one_line_error(code, err, fragment)


@pytest.mark.parametrize("env", [{"WANDB_MODE": "offline"}, {"WANDB_MODE": "disabled"},
                                 {"WANDB_API_KEY": "k" * 40}, {"WANDB_MODE": "offline", "WANDB_PROJECT": "my-proj"}])
def test_wandb_settings_it_accepts_pass(env, wandb_env, tmp_path):
    for key, value in env.items():
        wandb_env.setenv(key, value)
    cfg = selfdistill.load_config(["report_to=wandb", "run=r", f"out_dir={tmp_path}"])
    tracking.check_ready(cfg)


def test_wandb_finds_a_key_in_netrc(wandb_env, tmp_path):
    put(str(tmp_path / "netrc"), "machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert tracking.wandb_key_found()


def eval_row(step, avg=0.5):
    return {"step": step, "n": 1, "k": 1, "questions": 2, "temperature": 1.0, **{m: avg for m in ev.METRICS},
            "ci": {m: [0.0, 1.0] for m in ev.METRICS}}


def tensorboard_steps(run_dir, tag="eval/avg"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return sorted(e.step for e in events.Scalars(tag)) if tag in events.Tags()["scalars"] else []


def test_rows_of_an_interrupted_evaluation_reach_tensorboard_on_the_next(tmp_path):
    run_dir = str(tmp_path / "r")
    os.makedirs(run_dir)
    cfg = selfdistill.Config(run="r", report_to="tensorboard")
    path = os.path.join(run_dir, "eval.jsonl")
    with tracking.evaluation_rows(cfg, run_dir):  # the trainer's evaluation: step 0 sent
        runfolder.append_jsonl(path, eval_row(0))
    with pytest.raises(KeyboardInterrupt):
        with tracking.evaluation_rows(cfg, run_dir):  # interrupted after writing step 10's row
            runfolder.append_jsonl(path, eval_row(10))
            raise KeyboardInterrupt
    assert tensorboard_steps(run_dir) == [0]
    with tracking.evaluation_rows(cfg, run_dir):  # `python eval.py RUN` finishes it
        runfolder.append_jsonl(path, eval_row(20))
    assert tensorboard_steps(run_dir) == [0, 10, 20]
    with tracking.evaluation_rows(cfg, run_dir):  # nothing new: nothing sent twice
        pass
    assert tensorboard_steps(run_dir) == [0, 10, 20]


def test_a_run_from_before_the_record_is_not_sent_twice(tmp_path):
    run_dir = str(tmp_path / "r")
    os.makedirs(run_dir)
    runfolder.append_jsonl(os.path.join(run_dir, "eval.jsonl"), eval_row(0))  # the trainer sent it then
    with tracking.evaluation_rows(selfdistill.Config(run="r", report_to="tensorboard"), run_dir):
        runfolder.append_jsonl(os.path.join(run_dir, "eval.jsonl"), eval_row(10))
    assert tensorboard_steps(run_dir) == [10]


# ---------------------------------------------------------------------------------------------
# 6. Values read loosely: one line each, before anything runs.


@pytest.mark.parametrize("argv, fragment", [
    (["--explain", "0"], "--explain N shows N rollouts of one step: N must be at least 1, got 0"),
    (["--explain=-3"], "N must be at least 1, got -3"),
    (["--explain", "-1"], "N must be at least 1"),
    (["temperature=1e-300"], "'temperature' must be at least 0.001"),
    (["temperature=0.0005"], "'temperature' must be at least 0.001"),
    (["logit_temperature=1e-9"], "'logit_temperature' must be at least 0.001"),
    (["--context", "critique", "grpo_beta=0.1"], "'grpo_beta' shapes GRPO's policy-gradient loss, which the critique arm"),
    (["--context", "reference", "grpo_norm=constant"], "'grpo_norm' shapes GRPO's"),
    (["--context", "critique_quoting", "grpo_norm=sequence_mean"], "does not use"),
    (["--context", "critique_no_prefix", "grpo_beta=1", "grpo_norm=constant"], "'grpo_beta'"),
    (["threads=100000"], "'threads' must lie in 0..1024"),
    (["lora_r=100000"], "'lora_r' must lie in 1..4096"),
    (["lora_r=0"], "'lora_r' must lie in 1..4096"),
    (["lora_dropout=1"], "'lora_dropout' must lie in [0, 1)"),
    (["ema_rate=0"], "'ema_rate' must lie in (0, 1]"),
    (["top_p=0"], "'top_p' must lie in (0, 1]"),
    (["jsd_alpha=1.5"], "'jsd_alpha' must lie in [0, 1]"),
    (["lr=0"], "'lr' must be positive"),
    (["samples_per_question=5000"], "'samples_per_question' must lie in 1..1024"),
    (["max_new_tokens=10000000"], "'max_new_tokens' must lie in 1..1048576"),
    (["critic_max_new_tokens=0"], "'critic_max_new_tokens' must lie in 1..1048576"),
    (["critic_max_new_tokens=99999999"], "'critic_max_new_tokens' must lie in 1..1048576"),
    (["seed=99999999999"], "'seed' must lie in 0..2147483647"),
    (["lr=0.1", "lr=0.2"], "config key 'lr' is given twice on the command line"),
    (["seed=1", "seed=1"], "'seed' is given twice"),
    (["run=a", "--run", "b"], "--run and run= both set the run name"),
    (["arm=grpo", "--context", "critique"], "--context and arm= both set the arm"),
    (["--context", "grpo", "--context=critique"], "--context is given twice on the command line"),
    (["--run", "a", "--run", "b"], "--run is given twice"),
    (["--explain", "1", "--explain", "2"], "--explain is given twice"),
    (["epochs=-1"], "'epochs' must be at least 0"),
    (["ema_rate=1.5"], "'ema_rate' must lie in (0, 1]"),
    (["top_p=1.0001"], "'top_p' must lie in (0, 1]"),
    (["logit_temperature=0"], "'logit_temperature' must be at least 0.001"),
    (["--context", "grpo", "grpo_beta=-1"], "'grpo_beta' must be at least 0"),
    (["micro_batch=0"], "'micro_batch' must be at least 1"),
    (["lora_alpha=0"], "'lora_alpha' must be at least 1"),
])
def test_values_out_of_range_are_one_line(argv, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(selfdistill, "train", lambda cfg: pytest.fail("training started"))
    code, _, err = run_main([*argv, f"out_dir={tmp_path}"], capsys)
    one_line_error(code, err, fragment)
    assert not os.listdir(tmp_path)  # nothing written


def test_a_finished_run_with_a_setting_its_arm_ignored_is_still_read(tmp_path, capsys):
    """Runs made before the rule (grpo_norm on a critique arm did nothing) stay readable."""
    run_dir = str(tmp_path / "r")
    os.makedirs(run_dir)
    cfg = vars(selfdistill.resolve(selfdistill.Config(run="r", arm="critique", grpo_norm="constant")))
    put(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg))
    assert ev.load_run_config(run_dir).grpo_norm == "constant"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_device_mps_without_mps_is_one_line(tiny_model_dir, data, tmp_path, capsys):
    code, _, err = run_main([f"model={tiny_model_dir}", f"train_file={data}", f"test_file={data}", "device=mps",
                             "prompts=instruct", f"out_dir={tmp_path}", "threads=1"], capsys)
    one_line_error(code, err, "device=mps but no Apple GPU (MPS) is available")


@pytest.mark.parametrize("flags, fragment", [
    (["--seed", str(2 ** 40)], "seed=1099511627776 must lie in 0..2147483647"),
    (["--threads", "100000"], "--threads must lie in 1..1024"),
    (["--n-train", str(10 ** 9)], "must be at most 5000"),
    (["--n-test", "4900"], "must be at most 5000"),
    (["--n-transfer", str(10 ** 6)], "must be at most 5000"),
    (["--samples", "5000", "--max-correct", "4"], "samples=5000 must lie in 1..1024"),
    (["--score-batch", str(2 ** 30)], "score_batch"),
    (["--steps", str(10 ** 9)], "steps=1000000000 must lie in 1..10000000"),
    (["--batch-size", str(10 ** 6)], "batch_size=1000000 must lie in 1..65536"),
    (["--warmup", str(10 ** 9)], "warmup"),
])
def test_unbounded_build_flags_are_one_line(flags, fragment, tmp_path, monkeypatch):
    no_build(monkeypatch)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        toy_build.command_line(["build", "--root", str(tmp_path / "w"), *flags])
    assert not os.path.exists(tmp_path / "w")


# ---------------------------------------------------------------------------------------------
# 7. Ctrl-C while the programs import torch: exit 130, no traceback.


@pytest.mark.parametrize("script", [["selfdistill.py"], ["-m", "toyworld.toy_build"]])
def test_early_ctrl_c_exits_130_without_a_traceback(script):
    """Ctrl-C while torch is half imported (-X importtime names each module as it finishes)."""
    child = subprocess.Popen([sys.executable, "-X", "importtime", *script, "--help"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in child.stderr:
        if re.search(rb"\|\s+torch\.", line):  # a part of torch is imported, torch itself not yet
            break
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130 and b"Traceback" not in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# 8. From before: the rule critic on non-toy data, and test questions past the model's context.


def test_analyze_with_the_rule_critic_on_non_toy_data_is_one_line(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "words.jsonl"
    put(str(path), json.dumps({"question": "What is two plus two?", "answer": "4", "solution": "2+2=4"}) + "\n")
    code, _, err = run_main([tiny_model_dir, f"test_file={path}", f"train_file={path}", "--out",
                             str(tmp_path / "a")], capsys, script=analyze)
    one_line_error(code, err, "critic=rule critiques toy arithmetic chains only")


def test_a_test_question_past_the_context_is_counted_and_skipped(tiny_model_dir, tmp_path, capsys):
    path = str(tmp_path / "test.jsonl")
    put(path, "".join(json.dumps({"id": f"q{i}", "question": q, "answer": "2"}) + "\n"
                      for i, q in enumerate(["1+1", "9" * 2000, "2+0", "8" * 1500])))
    run_dir = made_run(tmp_path, tiny_model_dir, path, eval_questions=0)
    code, out, err = run_main([run_dir], capsys, script=ev)
    assert code in (0, None) and "Traceback" not in err, err
    assert "2 of 4 questions (first: id q1) do not fit the model's context of 1024 tokens" in err
    [row] = runfolder.read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    assert row["questions"] == 2


def test_a_test_set_that_never_fits_is_one_line(tiny_model_dir, tmp_path, capsys):
    path = str(tmp_path / "test.jsonl")
    put(path, json.dumps({"question": "7" * 3000, "answer": "7"}) + "\n")
    run_dir = made_run(tmp_path, tiny_model_dir, path)
    code, _, err = run_main([run_dir], capsys, script=ev)
    one_line_error(code, err, "fits the model's context of 1024 tokens")
