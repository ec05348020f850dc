"""The toy world v3: named worlds, checked build flags, a world's folder used as model=, the
transfer split, and the rollout-matched GRPO arm's step accounting.

Protects: every BuildSettings field is a range-checked `python -m toyworld.toy_build build` flag and a bad value is a
one-line error before a build starts; asking a built world for other settings is an error that
says to rebuild (never silently ignored); the named worlds' shipped folders hold exactly their
names' settings; model=<a world folder> (or its model/ folder, or a world's name) gets that world's
model, data, transfer split, budget, prompts and alignment dial, not the default world's; the
transfer split's faulty facts lie on no train chain; GRPO with batch_size=4 draws 32 rollouts a
step, as a self-distillation arm does."""
import json
import os

import pytest

from plumbing import sampler
import selfdistill
from toyworld import toy
from toyworld import folders
from toyworld import toy_build
from toyworld import world
from plumbing.common import UserError


def tiny(**changes):
    return folders.BuildSettings(**{"steps": 2, "n_train": 3, "n_test": 2, "n_transfer": 2, "samples": 2,
                                "max_correct": 2, "max_new_tokens": 48, "score_batch": 8, **changes})


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny world built in its own folder (not a named one), as `toy_build.py build --root DIR` does."""
    root = str(tmp_path_factory.mktemp("v3") / "world")
    toy_build.ensure_built(root, progress=False, settings=tiny())
    return root


# ---------------------------------------------------------------------------------------------
# Build flags: checked before any work


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


@pytest.mark.parametrize("argv", [["build", "--steps", "1.5"], ["build", "--mix", "a,b,c"], ["fly"],
                                  ["build", "--world", "toy-v9"], ["build", "--world", "toy", "--root", "x"]])
def test_malformed_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        toy_build.command_line(argv)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err


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
# Built worlds: recorded settings, refused mismatches, the named worlds


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


def test_the_shipped_worlds_hold_their_names_settings():
    for name, (folder, changes) in folders.WORLDS.items():
        root = folders.world_root(name)
        assert os.path.basename(root) == folder and folders.named_settings(root) == folders.BuildSettings(**changes)
        saved = json.load(open(os.path.join(root, "build.json")))["settings"]
        assert folders.settings_changes(saved, folders.named_settings(root)) == {}, name
    assert folders.named_settings(folders.WORLD).fault_rate == 1.0  # v3: the paper's regime
    assert folders.named_settings(folders.world_root("toy-v2")).fault_rate == 0.8  # the contrast


def test_a_named_world_built_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "HERE", str(tmp_path))
    root = os.path.join(tmp_path, "toy_world")
    toy_build.ensure_built(root, progress=False, settings=tiny())  # a toy_world folder of other settings
    with pytest.raises(UserError, match="--world toy --force"):
        toy_build.ensure_built(root, progress=False)  # what model=toy asks: BuildSettings()


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


def test_a_chat_model_gets_no_dial(tiny_model_dir):
    with pytest.raises(UserError, match="toy-world models only"):
        selfdistill.load_config([f"model={tiny_model_dir}", "toy_order=chain"])


# ---------------------------------------------------------------------------------------------
# The rollout-matched GRPO arm


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


def test_a_named_world_is_an_analysis_target():
    """analyze.py toy-v2 (or a world's folder) analyses that world's base, as analyze.py toy does."""
    import eval as ev
    for target in ("toy-v2", folders.world_root("toy-v2")):
        cfg, run_dir = ev.target_config(target, ["threads=1"])
        assert run_dir is None and cfg.prompts == "toy" and world.is_world_model(cfg.model)
        assert world.resolve_paths(cfg)[0] == os.path.join(folders.world_root("toy-v2"), "model")
