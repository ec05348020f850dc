"""The toy worlds as folders: building them, the named worlds, damage, and a world used as model=.

Protects: every BuildSettings field is a range-checked `python -m toyworld.toy_build build` flag and
a bad or unbounded value is one line before a build starts; a built world records its settings and
refuses other ones (rebuild with --force; --force without flags keeps the world's own settings); a
build goes into a staging folder under a lock, so an interrupted or failed rebuild leaves the old
world and a second build is refused; a damaged world (missing or cut files, a build.json that is
garbage, empty, not UTF-8, a list, without settings or with a bad budget or setting) is one line
naming its rebuild, through ensure_built, training, evaluation and the build command, with build.json
kept byte for byte and nothing rebuilt; world files without a build.json are not rebuilt; a lost
transfer split warns once; the named worlds' shipped folders hold exactly their names' settings and
are complete; the transfer split's faulty facts lie on no train chain; model=<a world folder> (or its
model/ folder, or a world's name) gets that world's model, data, transfer split, budget, prompts and
alignment dial; GRPO with batch_size=4 draws 32 rollouts a step, as a self-distillation arm does."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import eval as ev
import selfdistill
from plumbing import runfolder
from plumbing import sampler
from plumbing.common import UserError
from toyworld import folders
from toyworld import toy
from toyworld import toy_build
from toyworld import world
from conftest import one_line_error, put, run_main
from test_eval_inputs import made_run


# ---------------------------------------------------------------------------------------------
# A tiny world of our own, and copies of the shipped one to damage


def tiny(**changes):
    return folders.BuildSettings(**{"steps": 2, "n_train": 3, "n_test": 2, "n_transfer": 2, "samples": 2,
                                "max_correct": 2, "max_new_tokens": 48, "score_batch": 8, **changes})


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny world built in its own folder (not a named one), as `toy_build.py build --root DIR` does."""
    root = str(tmp_path_factory.mktemp("v3") / "world")
    toy_build.ensure_built(root, progress=False, settings=tiny())
    return root


def no_build(monkeypatch):
    monkeypatch.setattr(toy_build, "build", lambda *a, **k: pytest.fail("a build started"))


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory):
    """A copy of the shipped headline world (toy_world/); each test damages a copy of this copy."""
    root = str(tmp_path_factory.mktemp("shipped") / "world")
    shutil.copytree(folders.WORLD, root, ignore=shutil.ignore_patterns(".lock", ".building"))
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
# Build flags: checked before any work


@pytest.mark.bad_input
@pytest.mark.parametrize("flags, match", [
    (["--fault-rate", "nan"], "fault_rate must be a finite number"),
    (["--fault-rate", "1.5"], r"fault_rate=1.5 must lie in \[0, 1\]"),
    (["--faulty-share", "-0.1"], "faulty_share"),
    (["--recovery", "inf"], "recovery must be a finite number"),
    (["--copy-prob", "2"], "copy_prob"),
    (["--decay", "0"], "decay"),
    (["--lr", "0"], "lr"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--steps", "0"], "steps"),
    (["--warmup", "0"], "warmup"),
    (["--batch-size", "0"], "batch_size"),
    (["--mix", "1,2"], "mix"),
    (["--mix", "0,0,0"], "mix"),
    (["--mix", "1,nan,1"], "mix"),
    (["--styles", "plain,cursive"], "styles"),
    (["--critique-min-ops", "9"], "critique_min_ops"),
    (["--n-train", "0"], "n_train"),
    (["--n-test", "0"], "n_test"),
    (["--n-transfer", "-1"], "n_transfer"),
    (["--samples", "0"], "samples"),
    (["--samples", "4", "--max-correct", "5"], "max_correct"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--max-new-tokens", "5000"], "max_new_tokens"),
    (["--score-batch", "2"], "score_batch"),
    (["--seed", "-1"], "seed"),
    (["--threads", "0"], "--threads"),
])
def test_a_bad_build_flag_is_one_line_before_any_work(flags, match, tmp_path, monkeypatch):
    monkeypatch.setattr(toy_build, "build", lambda *a, **k: pytest.fail("a build started"))
    with pytest.raises(UserError, match=match) as error:
        toy_build.command_line(["build", "--root", str(tmp_path / "w"), *flags])
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "w" / "build.json")


@pytest.mark.bad_input
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


@pytest.mark.bad_input
@pytest.mark.parametrize("argv", [["build", "--steps", "1.5"], ["build", "--mix", "a,b,c"], ["fly"],
                                  ["build", "--world", "toy-v9"], ["build", "--world", "toy", "--root", "x"]])
def test_malformed_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        toy_build.command_line(argv)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.bad_input
def test_the_command_line_refuses_odd_roots_and_probe_flags(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    for argv, match in [(["build", "--root", str(afile)], "not a folder"), (["build", "--root", " "], "name a folder"),
                        (["probe", "--root", str(tmp_path)], "no built toy world"),
                        (["probe", "--root", str(tmp_path), "--fault-rate", "0.5"], "apply to `build` only"),
                        (["build", "--world", "toy-v2", "--fault-rate", "0.9"], "a folder of your own")]:
        with pytest.raises(UserError, match=match):
            toy_build.command_line(argv)


def test_every_build_setting_is_a_flag(tmp_path, monkeypatch):
    """Each field reaches BuildSettings (and so build.json) through its flag."""
    seen = {}
    monkeypatch.setattr(toy_build, "build", lambda root, out, settings, progress, threads: seen.update(vars(settings)))
    monkeypatch.setattr(toy_build, "summary", lambda root: "")
    values = {"seed": "3", "steps": "7", "batch_size": "5", "lr": "0.002", "warmup": "2", "decay": "0.5",
              "mix": "0.2,0.3,0.5", "styles": "plain,spaced", "faulty_share": "0.2", "fault_rate": "0.9",
              "recovery": "0.1", "copy_prob": "0.4", "critique_min_ops": "2", "n_train": "9", "n_test": "8",
              "n_transfer": "7", "samples": "6", "max_correct": "1", "max_new_tokens": "40", "score_batch": "60"}
    assert set(values) == {f for f in vars(folders.BuildSettings())}
    argv = ["build", "--root", str(tmp_path / "w")]
    for name, value in values.items():
        argv += ["--" + name.replace("_", "-"), value]
    toy_build.command_line(argv)
    assert seen["mix"] == (0.2, 0.3, 0.5) and seen["styles"] == ("plain", "spaced")
    assert seen["fault_rate"] == 0.9 and seen["n_transfer"] == 7 and seen["steps"] == 7


# ---------------------------------------------------------------------------------------------
# Builds: recorded settings, a staging folder, a lock


def test_a_missing_toy_world_says_it_is_built_and_how_long(tmp_path, capsys):
    settings_ = folders.BuildSettings(steps=2, n_train=2, n_test=1, n_transfer=1, samples=2, max_correct=2, score_batch=8)
    toy_build.ensure_built(str(tmp_path / "world"), progress=True, settings=settings_)
    assert "toy world is missing" in capsys.readouterr().err
    toy_build.ensure_built(str(tmp_path / "world"), progress=True, settings=settings_)
    assert "missing" not in capsys.readouterr().err  # complete now: said once, built once


@pytest.mark.bad_input
def test_a_built_world_refuses_other_settings_and_keeps_its_own(tiny_world):
    info = json.load(open(os.path.join(tiny_world, "build.json")))
    assert info["settings"]["fault_rate"] == 1.0 and info["n_transfer"] == 2
    stamp = os.path.getmtime(os.path.join(tiny_world, "build.json"))
    toy_build.ensure_built(tiny_world, progress=False, settings=tiny())  # the same settings: used as built
    toy_build.ensure_built(tiny_world, progress=False)  # no settings asked: a folder of one's own is used as built
    assert os.path.getmtime(os.path.join(tiny_world, "build.json")) == stamp
    with pytest.raises(UserError, match=r"built with fault_rate=1.0 \(asked 0.8\); rebuild it") as error:
        toy_build.ensure_built(tiny_world, progress=False, settings=tiny(fault_rate=0.8))
    assert "--force" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError, match="fault_rate=1.0"):
        toy_build.command_line(["build", "--root", tiny_world, "--fault-rate", "0.8", "--steps", "2", "--n-train", "3"])
    assert os.path.getmtime(os.path.join(tiny_world, "build.json")) == stamp


@pytest.mark.bad_input
def test_a_named_world_built_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "HERE", str(tmp_path))
    root = os.path.join(tmp_path, "toy_world")
    toy_build.ensure_built(root, progress=False, settings=tiny())  # a toy_world folder of other settings
    with pytest.raises(UserError, match="--world toy --force"):
        toy_build.ensure_built(root, progress=False)  # what model=toy asks: BuildSettings()


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


@pytest.mark.bad_input
@pytest.mark.parametrize("fail", [KeyboardInterrupt(), RuntimeError("out of memory"), OSError(28, "No space left")])
def test_an_interrupted_or_failed_rebuild_leaves_the_old_world(fail, world_copy, monkeypatch):
    monkeypatch.setattr(toy_build, "build", staged_build(fail=fail))
    before = {name: open(os.path.join(world_copy, name), "rb").read() for name in ("build.json", "train.jsonl")}
    with pytest.raises(type(fail)):
        toy_build.ensure_built(world_copy, progress=False, force=True)
    assert {name: open(os.path.join(world_copy, name), "rb").read() for name in before} == before
    assert folders.check_world(world_copy)["n_train"] == 320  # still complete, still itself
    runfolder.RunLock(world_copy, "checking").release()  # released: the OS lock is free again
    written = []
    monkeypatch.setattr(toy_build, "build", staged_build(written))
    toy_build.ensure_built(world_copy, progress=False, force=True)  # the next build clears the leftover
    assert not os.path.exists(os.path.join(world_copy, ".building"))
    assert folders.check_world(world_copy)["n_train"] == 1 and len(written) == 1


@pytest.mark.bad_input
def test_force_without_flags_rebuilds_with_the_worlds_own_settings(world_copy, monkeypatch):
    written = []
    monkeypatch.setattr(toy_build, "build", staged_build(written))
    monkeypatch.setattr(toy_build, "summary", lambda root: "")
    edit_info(world_copy, lambda i: i["settings"].update(fault_rate=0.9, n_test=150))  # its own, not the defaults
    toy_build.command_line(["build", "--root", world_copy, "--force", "--threads", "1"])
    assert written[0].fault_rate == 0.9 and written[0].n_test == 150 and written[0].mix == (0.5, 0.35, 0.15)


@pytest.mark.bad_input
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
    assert folders.check_world(world_copy)["n_train"] == 1


@pytest.mark.bad_input
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


@pytest.mark.bad_input
def test_a_build_json_of_another_version_gets_a_short_summary(world_copy, monkeypatch, capsys):
    no_build(monkeypatch)
    edit_info(world_copy, lambda i: [i.pop(k) for k in ("plain_avg", "seconds", "critique_accuracy")])
    toy_build.command_line(["build", "--root", world_copy])
    assert "lacks some of this version's measurements" in capsys.readouterr().out


@pytest.mark.bad_input
def test_probe_reads_a_bad_test_line_as_one_line(world_copy):
    lines = open(os.path.join(world_copy, "test.jsonl")).readlines()
    put(os.path.join(world_copy, "test.jsonl"), "".join(lines[:-1]) + "{not json\n")
    with pytest.raises(UserError, match="test.jsonl:200: not valid JSON"):
        toy_build.command_line(["probe", "--root", world_copy, "--threads", "1"])


# ---------------------------------------------------------------------------------------------
# Damaged worlds are reported, never rebuilt; build.json is kept byte for byte


@pytest.mark.bad_input
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


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", DAMAGES)
def test_training_on_a_damaged_world_is_one_line(damage, world_copy, tmp_path, monkeypatch, capsys):
    no_build(monkeypatch)
    DAMAGES[damage](world_copy)
    before = snapshot(world_copy)
    code, _, err = run_main(["--context", "grpo", f"model={world_copy}", f"out_dir={tmp_path / 'runs'}",
                             "threads=1", "eval_at_end=false"], capsys)
    one_line_error(code, err, "rebuild it")
    assert snapshot(world_copy) == before


@pytest.mark.bad_input
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


@pytest.mark.bad_input
@pytest.mark.parametrize("via", ["ensure_built", "training"])
@pytest.mark.parametrize("damage", ["no test.jsonl", "build.json garbage", "budget as text"])
def test_a_damaged_named_world_names_its_rebuild(damage, via, shipped_copy, tmp_path, monkeypatch, capsys):
    """model=toy on a damaged toy_world/: the message says `--world toy --force`."""
    no_build(monkeypatch)
    monkeypatch.setattr(folders, "HERE", str(tmp_path))
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


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["no test.jsonl", "no model folder", "build.json garbage", "budget as text"])
def test_evaluating_a_run_of_a_damaged_world_is_one_line(damage, world_copy, data, tmp_path, monkeypatch, capsys):
    no_build(monkeypatch)
    run_dir = made_run(tmp_path, world_copy, "", test_file="", train_file="", prompts="auto")
    DAMAGES[damage](world_copy)
    before = snapshot(world_copy)
    code, _, err = run_main([run_dir], capsys, script=ev)
    one_line_error(code, err, "rebuild it")
    assert snapshot(world_copy) == before


@pytest.mark.bad_input
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
    for name in folders.WORLDS:
        assert folders.check_world(folders.world_root(name))["settings"]["max_new_tokens"] == 64


@pytest.mark.bad_input
def test_a_budget_read_from_a_damaged_record_is_an_error_not_a_default(world_copy):
    DAMAGES["build.json garbage"](world_copy)
    with pytest.raises(UserError, match="is damaged"):
        folders.budget(world_copy)
    with pytest.raises(UserError, match="is damaged"):
        selfdistill.load_config([f"model={world_copy}/model"])


# ---------------------------------------------------------------------------------------------
# The named worlds and the transfer split


def test_the_shipped_worlds_hold_their_names_settings():
    for name, (folder, changes) in folders.WORLDS.items():
        root = folders.world_root(name)
        assert os.path.basename(root) == folder and folders.named_settings(root) == folders.BuildSettings(**changes)
        saved = json.load(open(os.path.join(root, "build.json")))["settings"]
        assert folders.settings_changes(saved, folders.named_settings(root)) == {}, name
    assert folders.named_settings(folders.WORLD).fault_rate == 1.0  # v3: the paper's regime
    assert folders.named_settings(folders.world_root("toy-v2")).fault_rate == 0.8  # the contrast


def test_transfer_split_of_the_shipped_worlds_lies_off_the_train_chains():
    for name in folders.WORLDS:
        root = folders.world_root(name)
        info = json.load(open(os.path.join(root, "build.json")))
        load = lambda split: [json.loads(line) for line in open(folders.paths(root)[split])]
        train, test, transfer = load("train"), load("test"), load("transfer")
        faults = set(toy_build.faulty_facts(info["settings"]["seed"], info["settings"]["faulty_share"]))
        on_train = set().union(*(toy_build.chain_facts(p["question"]) for p in train))
        assert len(transfer) == info["n_transfer"] == 200
        for p in transfer:
            facts = toy_build.chain_facts(p["question"])
            assert facts & faults and not facts & faults & on_train, p
            assert p["answer"] == str(toy.chain_steps(p["question"])[-1][3])
        questions = [p["question"] for p in transfer]
        assert len(set(questions)) == len(questions)
        assert not set(questions) & {p["question"] for p in train + test}
        # the test split, by contrast, mostly repeats train chains' faulty facts
        test_faults = [toy_build.chain_facts(p["question"]) & faults for p in test]
        assert sum(bool(f) and f <= on_train for f in test_faults) > 0.9 * len(test)


def test_a_tiny_worlds_transfer_split_is_disjoint_too(tiny_world):
    load = lambda split: [json.loads(line) for line in open(folders.paths(tiny_world)[split])]
    faults = set(toy_build.faulty_facts(0, tiny().faulty_share))
    on_train = set().union(*(toy_build.chain_facts(p["question"]) for p in load("train")))
    assert len(load("transfer")) == 2
    assert all(toy_build.chain_facts(p["question"]) & faults and not toy_build.chain_facts(p["question"]) & faults & on_train
               for p in load("transfer"))


@pytest.mark.bad_input
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


# ---------------------------------------------------------------------------------------------
# model=<a world>: everything model=toy gets


@pytest.mark.parametrize("form", ["root", "model_dir"])
def test_a_world_folder_is_a_toy_model_everywhere(tiny_world, form):
    target = tiny_world if form == "root" else os.path.join(tiny_world, "model")
    cfg = selfdistill.load_config([f"model={target}", "toy_order=chain", "toy_phrasing=same"])
    assert cfg.prompts == "toy" and cfg.max_new_tokens == 48  # its build.json's budget, not toy_world's
    model, train, test = world.resolve_paths(cfg)
    assert (model, train, test) == (os.path.join(tiny_world, "model"), folders.paths(tiny_world)["train"], folders.paths(tiny_world)["test"])
    assert world.transfer_path(cfg) == folders.paths(tiny_world)["transfer"]
    assert world.toy_dial(cfg) and world.exact_answers(cfg)
    records = world.load_records(cfg, train)  # the dial applies, once, as the records are loaded
    assert all(r["solution"] == toy.reference_solution(r["question"], "chain", "same") for r in records)
    ceiling = json.load(open(os.path.join(tiny_world, "build.json")))["ceilings"]["reference_aligned"]
    assert world.teacher_ceiling({**vars(cfg), "arm": "reference"}) == ceiling


def test_named_worlds_resolve_to_their_folders():
    cfg = selfdistill.load_config(["model=toy-v2"])
    assert world.resolve_paths(cfg)[0] == os.path.join(folders.HERE, "toy_world_v2", "model")
    assert cfg.max_new_tokens == folders.budget(folders.world_root("toy-v2"))
    assert world.transfer_path(cfg).endswith(os.path.join("toy_world_v2", "transfer.jsonl"))
    assert world.transfer_path(selfdistill.load_config(["model=toy", "test_file=x.jsonl"])) is None  # own test set


def test_a_named_world_is_an_analysis_target():
    """analyze.py toy-v2 (or a world's folder) analyses that world's base, as analyze.py toy does."""
    import eval as ev
    for target in ("toy-v2", folders.world_root("toy-v2")):
        cfg, run_dir = ev.target_config(target, ["threads=1"])
        assert run_dir is None and cfg.prompts == "toy" and world.is_world_model(cfg.model)
        assert world.resolve_paths(cfg)[0] == os.path.join(folders.world_root("toy-v2"), "model")


def test_rollout_matched_grpo_draws_a_self_distillation_arms_rollouts(tiny_world, tmp_path, monkeypatch):
    """batch_size=4 with G = 8: 32 rollouts a step, what a self-distillation arm draws with its 32
    questions × 1; 4 questions a step, an eighth of theirs."""
    drawn, generate = [], sampler.generate
    monkeypatch.setattr(sampler, "generate", lambda model, tok, prompts, *a, **k: (
        drawn.append(len(prompts)), generate(model, tok, prompts, *a, **k))[1])
    cfg = selfdistill.load_config(["--context", "grpo", f"model={tiny_world}", f"out_dir={tmp_path}", "run=m",
                                   "batch_size=4", "max_steps=2", "threads=1", "eval_at_end=false"])
    run_dir, _ = selfdistill.train(cfg)
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2] and drawn == [32, 32]
    sd = selfdistill.load_config(["--context", "critique"])
    assert cfg.batch_size * cfg.samples_per_question == sd.batch_size * sd.samples_per_question == 32

# ---------------------------------------------------------------------------------------------
# A build's last step, moving the finished world into place, stopped by a kill at every rename
# (os.replace raising stands in for SIGKILL: move_into_place has no cleanup that a kill would skip).
# Whatever the stop, the next reader sees one whole world, the old or the new, never a folder
# without its build.json rebuilt from defaults; the new world's settings survive a rebuild.


def world_with_a_staged_build(shipped_copy, tmp_path):
    """ROOT: the shipped world (the old one); ROOT/.building: a finished build of other settings
    (seed 7; its test split one problem shorter, so old and new files differ) with its build.json."""
    root = str(tmp_path / "world")
    shutil.copytree(shipped_copy, root)
    staging = os.path.join(root, folders.STAGING)
    shutil.copytree(shipped_copy, staging, ignore=shutil.ignore_patterns("critics"))  # what a build writes
    with open(os.path.join(staging, "test.jsonl")) as f:
        lines = f.readlines()[:-1]
    with open(os.path.join(staging, "test.jsonl"), "w") as f:
        f.writelines(lines)
    with open(os.path.join(staging, "build.json")) as f:
        info = json.load(f)
    info["settings"]["seed"], info["n_test"] = 7, len(lines)
    with open(os.path.join(staging, "build.json"), "w") as f:
        json.dump(info, f)
    return root, info


def stop_at_rename(monkeypatch, n):
    """os.replace fails on its n-th call (1-based) from here on: the process "dies" there."""
    calls, real = [0], os.replace

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt("killed")  # not an OSError: nothing in the move may catch it
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    return calls


RENAMES = 1 + 2 * len(folders.WORLD_ENTRIES) + 1  # old build.json aside; each entry aside and in; the new build.json


def test_renames_counts_every_rename_of_a_move(shipped_copy, tmp_path, monkeypatch):
    root, _ = world_with_a_staged_build(shipped_copy, tmp_path)
    calls = stop_at_rename(monkeypatch, 0)  # never fails: counts
    folders.move_into_place(os.path.join(root, folders.STAGING), root)
    assert calls[0] == RENAMES


@pytest.mark.bad_input
@pytest.mark.parametrize("n", range(1, RENAMES + 1))
def test_a_move_stopped_at_any_rename_reads_as_one_whole_world(n, shipped_copy, tmp_path, monkeypatch, capsys):
    root, new = world_with_a_staged_build(shipped_copy, tmp_path)
    stop_at_rename(monkeypatch, n)
    with pytest.raises(KeyboardInterrupt):
        folders.move_into_place(os.path.join(root, folders.STAGING), root)
    monkeypatch.undo()
    monkeypatch.setattr(toy_build, "build", lambda *a, **k: pytest.fail("a build started"))
    moved_aside = n > 1  # from the second rename on, ROOT's build.json is in .building/.old
    assert folders.interrupted_move(root) == moved_aside
    out = toy_build.ensure_built(root, progress=False)  # what every reader of the world calls
    info = folders.check_world(root)  # whole: the files agree with the record
    assert info["settings"]["seed"] == (7 if moved_aside else 0)
    assert out["train"] == os.path.join(root, "train.jsonl")
    assert ("finished that move" in capsys.readouterr().err) == moved_aside
    if moved_aside:
        assert not os.path.exists(os.path.join(root, folders.STAGING, "build.json"))
        assert info == new


@pytest.mark.bad_input
def test_a_model_folder_after_a_stopped_move_is_still_a_world(shipped_copy, tmp_path, monkeypatch):
    """model=DIR/model names a world by the build.json beside it: the stopped move is finished
    before that is asked, so the run gets its world's budget, not 512 and another model kind."""
    root, new = world_with_a_staged_build(shipped_copy, tmp_path)
    stop_at_rename(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        folders.move_into_place(os.path.join(root, folders.STAGING), root)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(root, "build.json"))
    assert world.is_world_model(os.path.join(root, "model"))
    assert folders.budget(root) == new["settings"]["max_new_tokens"]


@pytest.mark.bad_input
def test_a_rebuild_after_a_stopped_move_keeps_the_new_worlds_settings(shipped_copy, tmp_path, monkeypatch):
    """`build --force` with no flags rebuilds with the settings build.json records: after a stopped
    move those are the staged world's (seed 7), which the move is finished to recover first."""
    root, _ = world_with_a_staged_build(shipped_copy, tmp_path)
    stop_at_rename(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        folders.move_into_place(os.path.join(root, folders.STAGING), root)
    monkeypatch.undo()
    asked = []
    monkeypatch.setattr(toy_build, "build_in_place", lambda root, settings, *a, **k: asked.append(settings))
    toy_build.ensure_built(root, progress=False, force=True)
    assert [s.seed for s in asked] == [7]


@pytest.mark.bad_input
def test_a_staged_world_without_its_record_is_never_moved(shipped_copy, tmp_path):
    """A staging folder without build.json is an unfinished build: the old world stays, untouched."""
    root, _ = world_with_a_staged_build(shipped_copy, tmp_path)
    os.remove(os.path.join(root, folders.STAGING, "build.json"))
    os.makedirs(os.path.join(root, folders.STAGING, folders.OLD))
    assert not folders.interrupted_move(root)
    folders.recover(root)
    assert folders.check_world(root)["settings"]["seed"] == 0
