"""The toy world's learned critic (toy_critic.py, issue 28). Protects: the critic build (its record in
critics/build.json, per case A-D; a rebuild bit for bit; the world's own model and data untouched),
the dial's choice of snapshots, the toy critic prompt that critic=hf and critic=http share, the
names weak / medium / strong resolving inside a toy world (and a missing or unknown critic being
one line), and the shipped critics being what their build.json says (ordered weak < medium < strong
and the strong one agreeing with the rule critic)."""
import hashlib
import json
import os
import shutil

import pytest

from conftest import ROOT, one_line_error, run_main

import critic
from plumbing import runfolder
from toyworld import toy, toy_build, toy_critic
from contexts import PROMPTS, render_steps

SHIPPED = os.path.join(ROOT, "toyworld", "toy_world")
TINY = toy_critic.CriticSettings(steps=3, batch_size=4, n_attempts=24, n_probe=6, heldout_samples=1, n_unfiltered=8)


def digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture(scope="module")
def world_copy(tmp_path_factory):
    """The shipped world's model and data with 6 test questions (the held-out attempts), no critics."""
    root = str(tmp_path_factory.mktemp("world") / "w")
    shutil.copytree(SHIPPED, root, ignore=shutil.ignore_patterns("critics"))
    lines = open(os.path.join(root, "test.jsonl")).readlines()[:6]
    open(os.path.join(root, "test.jsonl"), "w").writelines(lines)
    return root


def test_a_critic_build_records_its_quality_and_rebuilds_bit_for_bit(world_copy):
    before = {**digest(world_copy), **digest(os.path.join(world_copy, "model"))}
    out = toy_critic.build_critics(world_copy, TINY, progress=False)
    info = json.load(open(os.path.join(out, "build.json")))
    assert set(info["critics"]) == set(toy_critic.NAMES)
    for quality in info["critics"].values():
        assert quality["n"] == 6 and sum(c["n"] for c in quality["by_case"].values()) == 6
        assert {"exact", "valid", "valid_format", "fix_right", "ceiling", "ceiling_rule"} <= set(quality)
        assert quality["valid"] <= quality["valid_format"]  # the gold check only removes critiques
        assert quality["unfiltered"]["n"] == 8
    assert [s for s, _ in info["probe_curve"]] == [0, 1, 2, 3]
    weights = {name: digest(os.path.join(out, name))["model.safetensors"] for name in toy_critic.NAMES}
    toy_critic.build_critics(world_copy, TINY, force=True, progress=False)
    assert {name: digest(os.path.join(out, name))["model.safetensors"] for name in toy_critic.NAMES} == weights
    assert json.load(open(os.path.join(out, "build.json")))["critics"] == info["critics"]
    after = {**digest(world_copy), **digest(os.path.join(world_copy, "model"))}
    assert after == before  # the world's model, data and build.json: untouched


def test_the_dial_takes_the_snapshot_nearest_each_target():
    snapshots = [(0, 0.0, "a"), (5, 0.35, "b"), (10, 0.5, "c"), (20, 0.72, "d"), (40, 0.9, "e"), (80, 0.97, "f")]
    assert [s[2] for s in toy_critic.pick(snapshots, (0.4, 0.7, 0.95))] == ["b", "d", "f"]
    assert toy_critic.pick([(1, 0.25, "x"), (2, 0.75, "y")], (0.5,))[0][2] == "x"  # a tie: the earlier step
    steps = sorted(toy_critic.probe_steps(toy_critic.CriticSettings(steps=50)))
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[-1] == 50 and len(steps) == len(set(steps))


def test_the_toy_critic_prompt_is_the_prompt_sets():
    """critic=hf and critic=http on a toy world send the short toy form; a real critic the full one."""
    toy_form = critic.critic_prompt("2+7-5", "<step_1> 2+7=9", "sol", "4", prompts="toy")
    assert toy_form == PROMPTS["toy"]["critic"].format(question="2+7-5", answer="4", response="<step_1> 2+7=9")
    full = critic.critic_prompt("2+7-5", "<step_1> 2+7=9", "sol", "4")
    assert full.startswith("You are reviewing") and "sol" in full


def test_a_missing_or_unknown_critic_is_one_line(tmp_path, capsys):
    bare = str(tmp_path / "bare")
    shutil.copytree(SHIPPED, bare, ignore=shutil.ignore_patterns("critics"))  # a sound world, no critics
    base = ["--context", "critique", "critic=hf", "max_steps=1", "eval_at_end=false", "threads=1",
            f"out_dir={tmp_path}"]
    code, _, err = run_main(base + [f"model={bare}", "critic_model=strong"], capsys)
    assert code == 2 and "python -m toyworld.toy_critic build --root" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(base + ["model=toy", "critic_model=strongest"], capsys)
    assert code == 2 and "weak, medium, strong" in err and len(err.strip().splitlines()) == 1


def test_the_shipped_critics_span_weak_to_strong():
    """build.json's dial: exact agreement on held-out attempts rises weak < medium < strong, and the
    strong critic, called as critic=hf calls it, writes the rule critique on fresh attempts."""
    info = json.load(open(os.path.join(SHIPPED, "critics", "build.json")))
    exact = [info["critics"][name]["exact"] for name in toy_critic.NAMES]
    assert exact == sorted(exact) and exact[0] < 0.6 and exact[-1] > 0.9
    problems = toy.generate_problems(12, 777)
    attempts = [toy.solve(p["question"], "plain") for p in problems[:4]]  # right: case A
    for p in problems[4:8]:  # the second step's result off by one, carried on: case D
        texts, value = toy_build.written_steps(p["question"], "plain",
                                               lambda i, a, op, b: toy.apply(a, op, b) + (i == 1))
        attempts.append(render_steps(texts, str(value)))
    attempts += [toy.solve(p["question"], "plain")[:20] for p in problems[8:]]  # cut short: case C
    strong = critic.HFCritic(os.path.join(SHIPPED, "critics", "strong"), max_new_tokens=128, prompts="toy")
    written = strong([p["question"] for p in problems], attempts, [""] * 12, [p["answer"] for p in problems])
    rule = [toy.rule_critique(p["question"], a, p["answer"]) for p, a in zip(problems, attempts)]
    assert sum(w == r for w, r in zip(written, rule)) >= 9


def test_critic_hf_with_a_critic_name_trains(tmp_path, capsys):
    """model=toy critic=hf critic_model=weak: one step end to end, the critic's time logged."""
    code, _, err = run_main(["--context", "critique", "model=toy", "critic=hf", "critic_model=weak", "max_steps=1",
                             "batch_size=4", "micro_batch=4", "eval_at_end=false", "threads=1",
                             f"out_dir={tmp_path}", "run=weak"], capsys)
    assert code in (0, None), err
    metrics = json.loads(open(tmp_path / "weak" / "metrics.jsonl").readline())
    assert metrics["time/critic"] > 0 and metrics["step"] == 1


def test_compare_shows_what_each_critic_dropped_and_cost(tmp_path):
    """compare.py on two critique arms that differ in their critic: the critic table (dropped share
    by reason, critic seconds per step, training seconds) and the budget table's wall-clock column
    from hand-written metrics, and each arm's
    teacher ceiling: the rule critic's from build.json, the learned critic's from critics/build.json."""
    import compare
    from toyworld import world
    from test_compare import write_run

    def log(invalid, reasons, critic_s):
        return [{"step": i + 1, "train/reward": 0.5, "train/response_len": 30, "train/critique_invalid": invalid,
                 **{f"train/dropped/{r}": n for r, n in reasons.items()}, "time/critic": critic_s,
                 "time/step": critic_s + 1.0} for i in range(2)]
    evals = {0: (0.1, 0.0), 2: (0.5, 0.0)}
    rule = write_run(tmp_path, "rule", "critique", 0, evals, log(0, {}, 0.01), model="toy")
    weak = write_run(tmp_path, "weak", "critique", 0, evals, log(16, {"wrong_answer": 12, "bad_format": 4}, 2.0),
                     model="toy", critic="hf", critic_model="weak")
    arms, _ = compare.compare_runs([rule, weak])
    lines = "\n".join(compare.critic_table(arms, markdown=True))
    row = next(line for line in lines.splitlines() if line.startswith("| critique critic=hf"))
    # 16 of 32 rollouts dropped per step (batch 32, G 1); wrong_answer 12/32, bad_format 4/32
    assert "| weak | full | 50.0 | wrong_answer 37.5, bad_format 12.5 | 2.00 | 6 |" in row, row
    assert "| rule | full | 0.0 | — | 0.01 | 2 |" in lines
    budget = "\n".join(compare.budget_table(arms, markdown=True))  # the wall-clock column: 2 steps of 3 s, 2 s critic
    assert "train s (critic s)" in budget and "| 6 (4) |" in budget and "| 2 (0) |" in budget
    info = json.load(open(os.path.join(SHIPPED, "critics", "build.json")))
    assert [a["ceiling"] for a in arms] == [json.load(open(os.path.join(SHIPPED, "build.json")))["ceilings"]["critique"],
                                            info["critics"]["weak"]["ceiling"]]
    assert world.teacher_ceiling({"model": "toy", "arm": "critique", "teacher": "base", "toy_order": "grouped",
                                  "toy_phrasing": "other", "critic": "http",
                                  "critic_model": os.path.join(SHIPPED, "critics", "strong")}) \
        == info["critics"]["strong"]["ceiling"]
    assert world.teacher_ceiling({"model": "toy", "arm": "critique", "teacher": "base", "toy_order": "grouped",
                                  "toy_phrasing": "other", "critic": "hf", "critic_model": "some/model"}) is None


def test_the_shipped_critics_record_the_solver_they_were_built_on():
    info = json.load(open(os.path.join(SHIPPED, "critics", "build.json")))
    assert info["solver"] == runfolder.model_digest(os.path.join(SHIPPED, "model"))
    toy_critic.check_current(SHIPPED)  # passes


@pytest.mark.bad_input
def test_critics_of_another_build_of_the_solver_are_one_line(tmp_path, capsys):
    """A world rebuilt after its critics were built (another solver) is refused where a named critic
    is used, with the rebuild command; critics built before the record existed pass."""
    root = str(tmp_path / "w")
    shutil.copytree(SHIPPED, root)
    record = os.path.join(root, "critics", "build.json")
    info = json.load(open(record))
    json.dump({**info, "solver": "0" * 16}, open(record, "w"))
    base = ["--context", "critique", "critic=hf", "critic_model=strong", "max_steps=1", "eval_at_end=false",
            "threads=1", f"model={root}", f"out_dir={tmp_path / 'runs'}"]
    code, _, err = run_main(base, capsys)
    one_line_error(code, err, f"python -m toyworld.toy_critic build --root {root} --force")
    assert "another build of this world's solver" in err
    json.dump({k: v for k, v in info.items() if k != "solver"}, open(record, "w"))
    toy_critic.check_current(root)  # no record: nothing to compare
    assert toy_critic.resolve(root, "strong") == os.path.join(root, "critics", "strong")
