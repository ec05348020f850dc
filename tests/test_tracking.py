"""Protects report_to (tracking.py): TensorBoard's event files and an offline wandb run hold the
same numbers as metrics.jsonl under the same keys, and the evaluation rows as eval/<key>; a resumed
run continues the same TensorBoard folder (the redone steps replace the old ones) and the same wandb
run id; the toy world's transfer split is logged apart (eval/transfer/*, never under the test's
eval/avg) and the evaluation's constants (n, k, questions, temperature) go to the run's config, not
to curves; a missing package is a one-line error naming the install; ranks > 0 and report_to=none get
a tracker that does nothing. Programs that only read a run (eval.py, compare.py, analyze.py) read
one whose report_to package is missing, while training checks its logging at start: a package that
fails to import, a bad WANDB_MODE / WANDB_PROJECT, a bad stored run id or no API key online is one
line; eval rows written by an interrupted evaluation reach TensorBoard on the next, once. Both packages come from requirements-extras.txt (installed in CI);
nothing here touches the network (WANDB_MODE=offline)."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import yaml

import compare
import eval as ev

from plumbing import runfolder
import selfdistill
from plumbing import tracking
from plumbing.common import UserError
from conftest import one_line_error, put, run_main, run_settings
from test_eval_inputs import made_run

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


# ---------------------------------------------------------------------------------------------
# Programs that only read a run check only what they read; training checks its logging at start


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


@pytest.mark.bad_input
@pytest.mark.parametrize("report_to", ["wandb", "tensorboard"])
def test_eval_reads_a_run_whose_logging_package_is_missing(report_to, without, tiny_model_dir, data, tmp_path,
                                                           capsys):
    run_dir = made_run(tmp_path, tiny_model_dir, data, report_to=report_to)
    without(report_to, ImportError(f"No module named '{report_to}'"))
    code, out, err = run_main([run_dir], capsys, script=ev)
    assert code in (0, None) and "Traceback" not in err and "error:" not in err, err
    assert f"eval row(s) not sent to {report_to}" in err and "later `python eval.py" in err
    assert len(runfolder.read_jsonl(os.path.join(run_dir, "eval.jsonl"))) == 1  # step 0 evaluated


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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


# ---------------------------------------------------------------------------------------------
# Evaluation rows reach TensorBoard once, even after an interrupted evaluation


def eval_row(step, avg=0.5):
    return {"step": step, "n": 1, "k": 1, "questions": 2, "temperature": 1.0, **{m: avg for m in ev.METRICS},
            "ci": {m: [0.0, 1.0] for m in ev.METRICS}}


def tensorboard_steps(run_dir, tag="eval/avg"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return sorted(e.step for e in events.Scalars(tag)) if tag in events.Tags()["scalars"] else []


@pytest.mark.bad_input
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


@pytest.mark.bad_input
def test_a_run_from_before_the_record_is_not_sent_twice(tmp_path):
    run_dir = str(tmp_path / "r")
    os.makedirs(run_dir)
    runfolder.append_jsonl(os.path.join(run_dir, "eval.jsonl"), eval_row(0))  # the trainer sent it then
    with tracking.evaluation_rows(selfdistill.Config(run="r", report_to="tensorboard"), run_dir):
        runfolder.append_jsonl(os.path.join(run_dir, "eval.jsonl"), eval_row(10))
    assert tensorboard_steps(run_dir) == [10]
