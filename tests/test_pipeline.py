"""The paper's pipeline in miniature, end to end on CPU, as a GPU user runs it at full size:

    prepare.py SHARDS --split cot --config CONFIG  →  selfdistill.py --context ARM --config CONFIG
    (grpo, reference, critique; 2 steps each)  →  eval.py RUN  →  compare.py RUNS

The inputs have OpenMathReasoning's shape: parquet shards named by split (`cot-*` and a `tir-*`
shard that must not be read), OMR's columns and types, several solutions per problem (one with its
text re-spaced), a proof and a problem with no extracted answer. The solver is a tiny random
Llama with a Qwen3-style thinking switch, trained here for a few seconds to write one wrong
step-tagged answer, so the filter has wrong stepped rollouts to hand to the critic. The critic is
an OpenAI-compatible server that thinks before its critique (and, for one problem, runs out of
tokens inside <think>).

Protects: each problem kept at most once and no test problem in train; prepare.json's counts add
up; the critic's budget is the config's (never a silent 1,024) and a critique cut inside <think>
is counted as critique_truncated; prepare, training and evaluation read the same settings (and
training warns when they differ); every program runs on what the one before it wrote."""
import json
import os
import sys

import pytest
import torch
import yaml

import compare
import contexts
import eval as ev
import prepare
import selfdistill

pyarrow = pytest.importorskip("pyarrow")
pytest.importorskip("datasets")
import pyarrow.parquet  # noqa: E402

from conftest import ROOT, make_char_tokenizer, make_tiny_model  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from paper_check import ThinkingCritic, omr_row  # noqa: E402  (the GPU check's critic and records)

WRONG = "<step_1> 1+1=3 <answer> 3"  # what the trained solver writes, whatever the question
CRITIC_BUDGET = 77  # critic_max_new_tokens in the config: the server must receive exactly this
CUT_ANSWER = "32"  # the problem whose critique runs out of tokens inside <think>


# ---------------------------------------------------------------------------------------------
# Inputs: OMR-shaped shards, a solver that writes steps, a critic that thinks.


def omr_shards(folder):
    """12 gradable problems × 3 solutions (the shortest right one differs per problem), one re-spaced
    copy of a problem, a proof, a problem without an extracted answer; and a tir shard."""
    rows = []
    for i in range(12):
        a, b = 10 + i, 20 + i
        problem = f"What is {a} plus {b}?"
        answer = str(a + b)
        rows += [omr_row(problem, answer, f"Adding, {a}+{b} = \\boxed{{{a + b}}}, checked twice over."),
                 omr_row(problem, answer, f"{a}+{b}=\\boxed{{{a + b}}}"),  # the shortest right one
                 omr_row(problem, answer, "x=\\boxed{0}")]  # shorter still, but wrong
    rows.append(omr_row("What  is 10 plus\n20?", "30", "\\boxed{30}"))  # a re-spaced copy of problem 0
    rows.append(omr_row("Prove that 2 is prime.", "2", "Suppose not. \\boxed{2}", "converted_proof"))
    rows.append(omr_row("Find x.", None, "x = 3", "no_answer_extracted"))
    os.makedirs(folder, exist_ok=True)
    table = pyarrow.Table.from_pylist(rows)
    pyarrow.parquet.write_table(table.slice(0, 20), os.path.join(folder, "cot-00000-of-00002.parquet"))
    pyarrow.parquet.write_table(table.slice(20), os.path.join(folder, "cot-00001-of-00002.parquet"))
    tir = [omr_row("What is 1 plus 1?", "2", "\\boxed{2}")]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(tir), os.path.join(folder, "tir-00000-of-00001.parquet"))
    return str(folder)


@pytest.fixture(scope="module")
def solver_dir(tmp_path_factory):
    """A tiny random Llama (Qwen3-style thinking switch in its chat template) trained for a few
    seconds to answer every instruct prompt with WRONG: a solver whose samples are wrong and in step
    format, so the filter has something to hand to the critic."""
    folder = str(tmp_path_factory.mktemp("solver"))
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, hidden=32, layers=2, seed=3)
    target = tokenizer(WRONG, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompts = [contexts.student_prompt_ids(tokenizer, f"What is {10 + i} plus {20 + i}?", "instruct", False)
               for i in range(12)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(60):
        ids = torch.tensor([prompts[(step + k) % 12] + target for k in range(4)])  # equal lengths here
        labels = ids.clone()
        labels[:, :len(prompts[0])] = -100  # learn the answer only
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the tiny solver did not learn its answer (loss {loss.item():.3f})"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def thinking_critic():
    server = ThinkingCritic(cut=CUT_ANSWER)
    yield server
    server.close()


def write_config(path, solver_dir, critic_url, data_dir):
    """configs/qwen3-1.7b.yaml's keys, at miniature sizes."""
    config = {"model": solver_dir, "dtype": "float32", "student_thinking": False, "teacher_thinking": True,
              "lora_r": 4, "lora_alpha": 8, "lr": 1e-3, "batch_size": 2, "micro_batch": 2,
              "temperature": 1.1, "max_new_tokens": 32, "generation_batch": 16, "max_context_tokens": 256,
              "checkpoint_every": 1, "train_file": f"{data_dir}/train.jsonl", "test_file": f"{data_dir}/test.jsonl",
              "eval_samples": 2, "critic": "http", "critic_url": critic_url, "critic_model": "critic-model",
              "critic_max_new_tokens": CRITIC_BUDGET, "critic_timeout": 10, "critic_batch": 4, "threads": 1}
    path.write_text(yaml.safe_dump(config))
    return str(path)


# ---------------------------------------------------------------------------------------------


def test_the_paper_pipeline_in_miniature(solver_dir, thinking_critic, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.chdir(tmp_path)
    shards = omr_shards(tmp_path / "omr")
    config = write_config(tmp_path / "paper.yaml", solver_dir, thinking_critic.url, "data/omr")

    # 1. prepare.py at the config's settings; the output folder is the config's data folder
    prepare.main([shards, "--split", "cot", "--config", config, "--test-size", "3", "--samples", "4",
                  "--max-correct", "1"])
    summary = json.loads((tmp_path / "data/omr/prepare.json").read_text())
    counts = summary["counts"]
    train = [json.loads(line) for line in open("data/omr/train.jsonl")]
    test = [json.loads(line) for line in open("data/omr/test.jsonl")]
    assert counts["input"] == 39  # the cot shards only: 36 + 3 rows, not the tir shard
    assert counts["missing_fields"] == 1 and counts["duplicate_records"] == 25  # 2 per problem + the re-spaced copy
    assert counts["problems"] == 13 and counts["problem_type"] == 1  # the proof is not gradable
    assert counts["critic/critique_truncated"] == 1  # the critique cut inside <think>
    dropped = sum(v for k, v in counts.items() if k in ("too_easy", "no_wrong_stepped_rollout", "too_long")
                  or k.startswith("critic/"))
    assert counts["kept"] + dropped + counts["not_sampled"] == counts["problems"] - counts["problem_type"]
    assert counts["kept"] == 11 and (counts["train"], counts["test"]) == (8, 3)
    questions = [r["question"] for r in train + test]
    assert len(set(questions)) == len(questions)  # each problem at most once ...
    assert not {r["question"] for r in test} & {r["question"] for r in train}  # ... and never in both
    shortest_right = {f"What is {10 + i} plus {20 + i}?": f"{10 + i}+{20 + i}=\\boxed{{{30 + 2 * i}}}"
                      for i in range(12)}
    shortest_right["What is 10 plus 20?"] = "\\boxed{30}"  # the re-spaced copy's solution is shorter
    assert all(r["solution"] == shortest_right[r["question"]] for r in train + test)
    assert set(thinking_critic.max_tokens) == {CRITIC_BUDGET}  # the config's budget, every request
    settings = summary["settings"]
    assert (settings["temperature"], settings["max_new_tokens"], settings["critic_max_new_tokens"]) == \
        (1.1, 32, CRITIC_BUDGET)

    # 2. each arm trains 2 steps on what prepare wrote, with the same settings
    runs = []
    for arm in ("grpo", "reference", "critique"):
        thinking_critic.max_tokens.clear()
        selfdistill.main(["--context", arm, "--config", config, "max_steps=2", "eval_at_end=false",
                          "out_dir=runs"])
        err = capsys.readouterr().err
        assert "other settings than this run's" not in err  # the data were filtered at these settings
        run = os.path.join("runs", f"{arm}-s0")
        metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        assert [m["step"] for m in metrics] == [1, 2]
        saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
        assert all(saved[k] == settings[k] for k in ("temperature", "max_new_tokens", "model", "dtype"))
        if arm == "critique":  # every rollout is critiqued at the config's budget and enters the loss
            assert set(thinking_critic.max_tokens) == {CRITIC_BUDGET} and len(thinking_critic.max_tokens) == 4
            assert all(m["train/critique_invalid"] == 0 and m["train/kl"] >= 0 for m in metrics)
        runs.append(run)

    # 3. eval.py on every checkpoint, then compare.py over the three arms
    for run in runs:
        ev.main([run])
        rows = [json.loads(line) for line in open(os.path.join(run, "eval.jsonl"))]
        assert sorted(r["step"] for r in rows) == [0, 1, 2] and all(r["questions"] == 3 for r in rows)
    capsys.readouterr()
    compare.main(runs)
    table = capsys.readouterr().out
    assert all(arm in table for arm in ("grpo", "reference", "critique"))

    # a run that samples otherwise than the filter did is warned, with the reason
    selfdistill.main(["--context", "reference", "--config", config, "max_steps=1", "eval_at_end=false",
                      "out_dir=runs", "run=hot", "temperature=1.3"])
    assert "temperature 1.1 -> 1.3" in capsys.readouterr().err


def test_old_style_input_leaks_no_problem(solver_dir, thinking_critic, tmp_path, monkeypatch):
    """Issue 27's case: 12 problems × 2 solutions in two shards, --test-size 3: 3 test problems,
    none of them in train, no duplicate in train."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    rows = [omr_row(f"What is {10 + i} plus {20 + i}?", str(30 + 2 * i), s)
            for i in range(12) for s in (f"{10 + i}+{20 + i}=\\boxed{{{30 + 2 * i}}}", "\\boxed{0}")]
    folder = tmp_path / "omr"
    folder.mkdir()
    for k in range(2):
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows[12 * k:12 * (k + 1)]),
                                    str(folder / f"train-0000{k}-of-00002.parquet"))
    config = write_config(tmp_path / "paper.yaml", solver_dir, thinking_critic.url, str(tmp_path / "data"))
    prepare.main([str(folder), "--config", config, "--test-size", "3", "--samples", "2", "--max-correct", "1",
                  "--max-kept", "9"])
    train = [json.loads(line)["question"] for line in open(tmp_path / "data/train.jsonl")]
    test = [json.loads(line)["question"] for line in open(tmp_path / "data/test.jsonl")]
    assert len(test) == 3 and len(train) == 6 and len(set(train)) == 6 and not set(test) & set(train)
