"""Run identity: which settings make a run another experiment.

Protects: resuming with other operational settings (selfdistill.OPERATIONAL: threads, report_to,
micro_batch, the critic's address, ...) works and is recorded in RUN/settings.jsonl with the step
it came at, while another lr is still refused; the config echo is one short line of the settings
that differ from the defaults and names the file that holds them all; compare.py pools one arm's
seeds whatever their logging or memory knobs, labels arms by what differs between the runs given
(the world included), takes --label GLOB=NAME, refuses a copy of a run as a second seed, never shows
step 0 as an arm's checkpoint, counts an incomplete toy block as a skip, and refuses options the
chosen output would ignore (each a one-line error)."""
import json
import os

import pytest

import compare
from plumbing import common, runfolder
import selfdistill
from plumbing.common import UserError
from conftest import Tripwire, error_line, run_main, run_settings, trip
from test_compare import fake_run


# ---------------------------------------------------------------------------------------------
# Resuming


def start(argv, tmp_path, monkeypatch):
    """The first start, up to loading the model, then a checkpoint to resume from."""
    trip(monkeypatch, common, "load_model")
    with pytest.raises(Tripwire):
        selfdistill.main(argv)
    os.makedirs(tmp_path / "r" / "checkpoints" / "step_000010")


def test_operational_settings_may_change_on_resume_and_are_recorded(data, tmp_path, capsys, monkeypatch):
    argv = ["--context", "reference", "--run", "r", f"train_file={data}", f"test_file={data}",
            f"out_dir={tmp_path}", "model=some/model", "lr=0.001"]
    start(argv, tmp_path, monkeypatch)
    capsys.readouterr()
    changed = ["threads=1", "micro_batch=8", "report_to=tensorboard", "generation_batch=16", "chunk_size=64",
               "critic_batch=2", "critic_timeout=30", "eval_at_end=false", "sample_every=1", "device=cpu"]
    with pytest.raises(Tripwire):  # resumes: gets as far as the model again
        selfdistill.main(argv + changed)
    out = capsys.readouterr().out
    assert "resuming with other settings" in out and "threads 0 -> 1" in out
    [record] = runfolder.read_jsonl(str(tmp_path / "r" / "settings.jsonl"))
    assert record["step"] == 10 and record["changed"]["micro_batch"] == [32, 8]
    assert len(record["changed"]) == len(changed)
    # what the run computes is still refused, also beside an allowed change
    line = error_line(argv[:-1] + ["lr=0.01", "threads=2"], capsys)
    assert line == ("error: run 'r' exists with lr=0.001 (now 0.01); resume with the same settings or "
                    "choose another --run")


def test_every_operational_setting_is_a_config_field():
    fields = {f for f in selfdistill.Config.__dataclass_fields__}
    assert set(selfdistill.OPERATIONAL) <= fields
    assert not {"lr", "seed", "arm", "model", "batch_size", "samples_per_question"} & set(selfdistill.OPERATIONAL)


def test_a_real_resume_with_other_memory_knobs_trains_on(tiny_model_dir, data, tmp_path, capsys):
    settings = run_settings(tiny_model_dir, data, tmp_path, max_new_tokens=8, max_steps=2, checkpoint_every=1)
    code, out, err = run_main(["--context", "reference", "--run", "r", *settings], capsys)
    assert code == 0, err[-2000:]
    os.rename(tmp_path / "r" / "checkpoints" / "step_000002", tmp_path / "r" / "old_step_2")
    knobs = run_settings(tiny_model_dir, data, tmp_path, max_new_tokens=8, max_steps=2, checkpoint_every=1,
                         micro_batch=2, generation_batch=3, chunk_size=3)
    code, out, err = run_main(["--context", "reference", "--run", "r", *knobs], capsys)
    assert code == 0 and "resuming" in out, err[-2000:]
    assert os.path.isdir(tmp_path / "r" / "checkpoints" / "step_000002")
    [record] = runfolder.read_jsonl(str(tmp_path / "r" / "settings.jsonl"))
    assert record == {"step": 1, "changed": {"micro_batch": [4, 2], "generation_batch": [256, 3],
                                             "chunk_size": [128, 3]}}


def test_the_config_echo_is_short_and_says_where_the_rest_is(data, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, common, "load_model")
    with pytest.raises(Tripwire):
        selfdistill.main(["--context", "reference", "--run", "r", f"train_file={data}", f"test_file={data}",
                          f"out_dir={tmp_path}", "model=some/model", "lr=0.001"])
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("config: ")]
    assert line.startswith("config: reference run=r ") and "lr=0.001" in line
    assert line.endswith(f"(the rest at defaults; all in {tmp_path / 'r' / 'config.yaml'})")
    assert "divergence=" not in line and "lora_targets" not in line  # defaults are not echoed
    assert len(line) < 400 + 3 * len(str(tmp_path)) + 2 * len(data)


# ---------------------------------------------------------------------------------------------
# compare.py: arms, labels, copies


def test_one_arms_seeds_pool_whatever_their_logging_and_memory_knobs(tmp_path):
    runs = [fake_run(tmp_path, "c0", 0, {0: 0.1, 10: 0.3}),
            fake_run(tmp_path, "c1", 1, {0: 0.1, 10: 0.5}, report_to="tensorboard", threads=2, micro_batch=8,
                     critic_timeout=30.0, eval_at_end=False)]
    arms, _ = compare.compare_runs(runs)
    assert [(a["label"], a["seeds"]) for a in arms] == [("critique", [0, 1])]


def test_runs_of_two_worlds_are_labelled_apart_and_their_bases_too(tmp_path):
    runs = [fake_run(tmp_path, "v3", 0, {0: 0.1, 10: 0.3}), fake_run(tmp_path, "v2", 0, {0: 0.2, 10: 0.4}, model="toy-v2")]
    arms, shared = compare.compare_runs(runs)
    assert [a["label"] for a in arms] == ["critique", "critique model=toy-v2"]
    table = compare.comparison_table(arms, shared, markdown=True)
    assert "| base of critique |" in table and "| base of critique model=toy-v2 |" in table


@pytest.mark.bad_input  # issue 30's count: compare.py's cluster
def test_labels_name_arms_and_fall_back_to_every_difference(tmp_path):
    runs = [fake_run(tmp_path, "grpo-s0", 0, {0: 0.1, 10: 0.3}, arm="grpo"),
            fake_run(tmp_path, "grpo-small-s0", 0, {0: 0.1, 10: 0.2}, arm="grpo", batch_size=4, max_steps=70)]
    arms, _ = compare.compare_runs(runs, [("grpo-small-*", "grpo, rollout-matched")])
    assert [a["label"] for a in arms] == ["grpo", "grpo, rollout-matched"]
    for names, message in (([("nothing-*", "x")], "matches none of the runs"),
                           ([("grpo*", "x")], "matches runs of 2 arms"),
                           ([("grpo-s0", "same"), ("grpo-small-s0", "same")], "the same label")):
        with pytest.raises(UserError, match=message):
            compare.compare_runs(runs, names)
    # two arms whose own settings are at their defaults still get labels apart
    assert compare.arm_labels([{"arm": "critique", "max_new_tokens": 96}, {"arm": "critique", "max_new_tokens": 64}],
                              [{}, {}], {}) == ["critique max_new_tokens=96", "critique max_new_tokens=64"]


@pytest.mark.bad_input  # issue 30's count: compare.py's cluster
def test_the_label_flag_on_the_command_line(tmp_path, capsys):
    runs = [fake_run(tmp_path, "a-s0", 0, {0: 0.1, 10: 0.3}), fake_run(tmp_path, "b-s0", 0, {0: 0.1, 10: 0.2}, lr=1e-3)]
    code, out, err = run_main([*runs, "--markdown", "--label", f"{tmp_path}/b-*=low lr"], capsys, compare)
    assert code == 0, err
    assert "| low lr | 1 | 10 |" in out
    line = error_line([*runs, "--label", "b-s0"], capsys, compare)
    assert line == "error: --label wants GLOB=NAME (e.g. 'runs/grpo-s*=grpo'), got 'b-s0'"


@pytest.mark.bad_input  # issue 30's count: compare.py's cluster
def test_a_copy_of_a_run_is_not_a_second_seed(tmp_path, capsys):
    original = fake_run(tmp_path, "critique-s0", 0, {0: 0.1, 10: 0.3})
    copy = tmp_path / "backup"
    copy.mkdir()
    for name in ("config.yaml", "eval.jsonl"):
        (copy / name).write_bytes((tmp_path / "critique-s0" / name).read_bytes())
    copy = str(copy / ".." / "backup")
    with pytest.raises(UserError, match=r"are one experiment \(the same settings and seed 0\): a copy"):
        compare.compare_runs([original, copy])
    # a copy whose seed was edited pools, but not silently
    config = tmp_path / "backup" / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: 1"))
    compare.compare_runs([original, copy])
    assert "has the very evaluation rows of" in capsys.readouterr().err
    compare.compare_runs([original, fake_run(tmp_path, "critique-s1", 1, {0: 0.1, 10: 0.31})])
    assert "warning" not in capsys.readouterr().err


@pytest.mark.bad_input  # issue 30's count: compare.py's cluster
def test_step_0_is_never_an_arms_checkpoint(tmp_path, capsys):
    base_only = fake_run(tmp_path, "b", 0, {0: 0.4})
    line = error_line([base_only], capsys, compare)
    assert "is evaluated at step 0 (the base model) only" in line
    arms, _ = compare.compare_runs([fake_run(tmp_path, "c", 0, {0: 0.9, 10: 0.3})])
    assert arms[0]["avg"]["best"]["step"] == 10 and arms[0]["avg"]["final"]["step"] == 10


@pytest.mark.bad_input  # issue 30's count: compare.py's cluster
@pytest.mark.parametrize("toy", [{}, {"step_arith": 0.5, "step_chain": 1.0, "styles": {}},
                                 {"step_arith": 0.5, "step_chain": 1.0, "answer_own": 1.0}])
def test_an_incomplete_toy_block_is_a_counted_skip(toy, tmp_path, capsys):
    run = fake_run(tmp_path, "t", 0, {0: 0.1, 10: 0.3})
    path = os.path.join(run, "eval.jsonl")
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        f.writelines(json.dumps({**row, "toy": toy}) + "\n" for row in rows)
    code, out, err = run_main([run], capsys, compare)
    assert code == 0 and "Traceback" not in err, err
    assert "2 rows with an incomplete toy block (step 0 first): left out of the toy table" in err
    assert "Toy world, what moved" not in out and "30.0" in out  # the scores stay


@pytest.mark.bad_input  # issue 30's count: compare.py's cluster
@pytest.mark.parametrize("argv, message", [
    (["--x", "rollouts"], "--x goes with --plot"),
    (["--plot", "--markdown"], "--markdown goes with the tables, not with --plot"),
    (["--plot", "--reach", "40"], "--reach goes with the tables, not with --plot"),
    (["--plot", "--ci", "--reach", "40"], "--ci and --reach go with the tables, not with --plot"),
    (["--per-step", "--reach", "40"], "--reach goes with the comparison table, not with --per-step"),
    (["--per-step", "--ci"], "--ci goes with the comparison table, not with --per-step"),
])
def test_options_the_output_would_ignore_are_refused(argv, message, tmp_path, capsys, monkeypatch):
    trip(monkeypatch, compare, "compare_runs")
    trip(monkeypatch, compare, "plot_rows")
    line = error_line([str(tmp_path), *argv], capsys, compare)
    assert line.startswith(f"error: {message}")
