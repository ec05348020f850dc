"""Protects report_to (tracking.py): TensorBoard's event files and an offline wandb run hold the
same numbers as metrics.jsonl under the same keys, and the evaluation rows as eval/<key>; a resumed
run continues the same TensorBoard folder (the redone steps replace the old ones) and the same wandb
run id; the toy world's transfer split is logged apart (eval/transfer/*, never under the test's
eval/avg) and the evaluation's constants (n, k, questions, temperature) go to the run's config, not
to curves; a missing package is a one-line error naming the install; ranks > 0 and report_to=none get
a tracker that does nothing. Both packages come from requirements-extras.txt (installed in CI);
nothing here touches the network (WANDB_MODE=offline)."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from plumbing import runfolder
import selfdistill
from plumbing import tracking
from plumbing.common import UserError
from conftest import run_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, **env):
    return subprocess.run([sys.executable, "selfdistill.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def train_args(model_dir, data, out_dir, **extra):
    return ["--context", "reference", "--run", "r",
            *run_settings(model_dir, data, out_dir, max_new_tokens=12, lr=0.05, max_steps=2,
                          checkpoint_every=1, eval_samples=2, **extra)]


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def evaluated(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "eval.jsonl"))]


def test_tensorboard_holds_the_metrics_lines_and_the_eval_rows_and_resumes(tiny_model_dir, data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = train_args(tiny_model_dir, data, tmp_path, report_to="tensorboard", eval_at_end=True)
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "r"

    def events():
        accumulator = EventAccumulator(str(run_dir / "tensorboard"))
        accumulator.Reload()
        return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}

    logged, lines = events(), metrics(run_dir)
    for key in ("train/loss", "train/reward", "train/kl", "train/grad_norm", "time/step"):
        assert logged[key] == {m["step"]: pytest.approx(m[key], rel=1e-6) for m in lines}, key
    assert logged["eval/avg"] == {r["step"]: pytest.approx(r["avg"], rel=1e-6) for r in evaluated(run_dir)}
    assert set(logged["eval/avg"]) == {0, 1, 2}
    # resume after step 1: step 2 is trained again and its old events are hidden (purge_step)
    shutil.rmtree(run_dir / "checkpoints" / "step_000002")
    again = run_cli(train_args(tiny_model_dir, data, tmp_path, report_to="tensorboard"))
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]
    assert len(glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))) == 3  # train, eval, resumed
    loss = events()["train/loss"]
    assert sorted(loss) == [1, 2] and loss[2] == pytest.approx(metrics(run_dir)[-1]["train/loss"], rel=1e-6)


def wandb_records(run_folder):
    """The records of an offline run's .wandb file: LevelDB's log format (32 KiB blocks, each record
    a 7-byte header: checksum, length, type) after wandb's 7-byte file header, holding the SDK's
    own protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    [path] = glob.glob(os.path.join(run_folder, "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, part, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # the rest of a block is padding
            pos += left
            continue
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return records


def wandb_history(run_folder):
    rows = []
    for record in wandb_records(run_folder):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics_and_the_eval_rows_and_resumes_the_same_id(tiny_model_dir, data,
                                                                                         tmp_path):
    pytest.importorskip("wandb")
    args = train_args(tiny_model_dir, data, tmp_path, report_to="wandb", eval_at_end=True)
    result = run_cli(args, WANDB_MODE="offline")
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "r"
    run_id = (run_dir / "wandb_id").read_text().strip()
    folders = sorted(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}*")))
    assert len(folders) == 2  # training, then the evaluation rows (one session each, the same id)
    history = [h for folder in folders for h in wandb_history(folder)]
    train_rows = [h for h in history if "train/loss" in h]
    for row, line in zip(train_rows, metrics(run_dir), strict=True):
        assert {k: row[k] for k in line} == pytest.approx(line, rel=1e-6)  # the same keys, the same values
    eval_rows = {h["eval/step"]: h for h in history if "eval/step" in h}
    assert {s: r["eval/avg"] for s, r in eval_rows.items()} == {r["step"]: pytest.approx(r["avg"])
                                                                  for r in evaluated(run_dir)}
    # resume: the same run id, a second offline folder (wandb sync joins them)
    shutil.rmtree(run_dir / "checkpoints" / "step_000002")
    again = run_cli(train_args(tiny_model_dir, data, tmp_path, report_to="wandb"), WANDB_MODE="offline")
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    resumed = [f for f in glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}*")) if f not in folders]
    assert len(resumed) == 1
    resumed = [h for h in wandb_history(resumed[0]) if "train/loss" in h]
    assert [h["step"] for h in resumed] == [2]


def test_missing_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match=r"report_to=wandb needs the wandb package: pip install wandb "
                                        r"\(or -r requirements-extras.txt\)"):
        selfdistill.load_config(["report_to=wandb"])


def test_other_ranks_and_none_get_a_tracker_that_does_nothing(tmp_path):
    cfg = selfdistill.Config(report_to="tensorboard", run="r")
    assert isinstance(tracking.start(cfg, str(tmp_path), rank=1), tracking.NoTracker)
    assert isinstance(tracking.start(selfdistill.Config(), str(tmp_path)), tracking.NoTracker)
    assert os.listdir(tmp_path) == []


def test_scalars_flatten_nested_numbers_and_drop_text():
    assert tracking.scalars({"step": 3, "avg": 0.5, "toy": {"step_arith": 0.25}, "ok": True, "name": "x"}) == \
        {"step": 3.0, "avg": 0.5, "toy/step_arith": 0.25, "ok": 1.0}


def test_transfer_rows_get_their_own_tags_and_constants_go_to_the_config(tmp_path):
    """Read back from TensorBoard's event files: eval/avg holds the test split only, each step once;
    eval/transfer/avg the transfer split; no constant is a curve; the setting is the "config" text."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = selfdistill.Config(report_to="tensorboard", run="r")
    path = tmp_path / "eval.jsonl"
    test = {"n": 4, "k": 4, "questions": 10, "temperature": 1.0, "pass": 0.5, "maj": 0.25, "ci": {"avg": [0, 1]}}
    with tracking.evaluation_rows(cfg, str(tmp_path)):  # what eval.py's child process writes
        for step, avg in ((0, 0.1), (1, 0.2), (3, 0.4)):
            runfolder.append_jsonl(str(path), {"step": step, **test, "avg": avg, "toy": {"step_arith": avg}})
        for step, avg in ((0, 0.05), (3, 0.5)):
            runfolder.append_jsonl(str(path), {"step": step, **test, "questions": 7, "avg": avg, "split": "transfer"})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    curves = {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in tags["scalars"]}
    assert curves["eval/avg"] == {0: pytest.approx(0.1), 1: pytest.approx(0.2), 3: pytest.approx(0.4)}
    assert curves["eval/transfer/avg"] == {0: pytest.approx(0.05), 3: pytest.approx(0.5)}
    assert curves["eval/toy/step_arith"][3] == pytest.approx(0.4)
    assert not {"eval/n", "eval/k", "eval/questions", "eval/temperature", "eval/transfer/questions"} & set(curves)
    [text] = [tag for tag in tags["tensors"] if tag.startswith("config")]
    config = accumulator.Tensors(text)[0].tensor_proto.string_val[0].decode()
    assert {line.strip() for line in config.splitlines()} == {
        "eval/n: 4", "eval/k: 4", "eval/questions: 10", "eval/temperature: 1.0", "eval/transfer/questions: 7"}
