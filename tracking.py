"""Where the step's metrics line goes besides RUN/metrics.jsonl: `report_to=none|tensorboard|wandb`.
The same record under the same keys, every step; then the evaluation rows (eval.jsonl, written by
eval.py in its own process, read back here after it ends) as eval/<key> against their checkpoint's
step. Rank 0 only; every other case gets a tracker that does nothing, so call sites never branch
(nanochat's DummyWandb). A resumed run continues the same record: TensorBoard writes to
RUN/tensorboard/ and hides the events after the checkpoint it resumed from (purge_step); wandb
reopens the run whose id is kept in RUN/wandb_id (offline, WANDB_MODE=offline, each session is its
own folder under RUN/wandb/ with that id, and `wandb sync` joins them into one run).
"""
import atexit
import contextlib
import dataclasses
import json
import os
import secrets

import runfolder
from common import UserError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to → the package it needs


def check_installed(report_to):
    """A missing package is a one-line error before anything runs."""
    if report_to == "none":
        return
    try:
        __import__(PACKAGES[report_to])
    except ImportError:
        raise UserError(f"report_to={report_to} needs the {PACKAGES[report_to]} package: "
                        f"pip install -r requirements-logging.txt") from None


def scalars(record, prefix=""):
    """The record's numbers, nested keys joined by '/' (eval rows' `toy` block); the rest (text,
    the confidence intervals' pairs) is left to the JSONL files."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):  # bools too (train/nonfinite is one)
            out[prefix + key] = float(value)
    return out


class NoTracker:
    def log(self, record):
        pass

    def add_config(self, values):
        pass

    def finish(self):
        pass


class TensorBoard:
    def __init__(self, cfg, run_dir, resumed_step):
        from torch.utils.tensorboard import SummaryWriter
        purge = resumed_step + 1 if resumed_step else None  # events after the checkpoint are redone
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge)
        atexit.register(self.writer.close)  # a run stopped by a signal still flushes its events

    def log(self, record, step_key="step"):
        for key, value in scalars(record).items():
            if key != step_key:
                self.writer.add_scalar(key, value, global_step=int(record[step_key]))

    def add_config(self, values):  # TensorBoard has no run config: a text summary under "config"
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in values.items()))

    def finish(self):
        self.writer.close()


class Wandb:
    def __init__(self, cfg, run_dir, resumed_step):
        import wandb
        id_path = os.path.join(run_dir, "wandb_id")
        run_id = open(id_path).read().strip() if os.path.isfile(id_path) else secrets.token_hex(4)
        runfolder.write_atomic(id_path, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "selfdistill"), name=cfg.run, id=run_id,
                              resume="allow", dir=os.path.abspath(run_dir), config=dataclasses.asdict(cfg),
                              settings=wandb.Settings(console="off", silent=True))  # our stdout stays ours
        self.run.define_metric("train/*", step_metric="step")  # x-axis: our step, not wandb's counter
        self.run.define_metric("time/*", step_metric="step")
        self.run.define_metric("eval/*", step_metric="eval/step")

    def log(self, record, step_key="step"):
        self.run.log(scalars(record))

    def add_config(self, values):
        self.run.config.update(values, allow_val_change=True)  # a later evaluation may use another n

    def finish(self):
        self.run.finish()


def env_rank():
    return int(os.environ.get("RANK", "0"))  # torchrun's; 0 alone


def start(cfg, run_dir, resumed_step=0, rank=0):
    """The run's tracker: rank 0's, a no-op on the others and for report_to=none."""
    if rank > 0 or cfg.report_to == "none":
        return NoTracker()
    check_installed(cfg.report_to)
    return {"tensorboard": TensorBoard, "wandb": Wandb}[cfg.report_to](cfg, run_dir, resumed_step)


EVAL_CONSTANTS = ("n", "k", "questions", "temperature")  # an evaluation's setting: config, not curves


@contextlib.contextmanager
def evaluation_rows(cfg, run_dir):
    """Around eval.py's child process: the eval.jsonl rows it adds are sent to the tracker against
    their checkpoint's step (eval/step): the test split as eval/<key> (eval/avg, eval/pass, eval/maj,
    eval/toy/...), the toy world's transfer split as eval/transfer/<key>. The evaluation's setting
    (eval/n, eval/k, eval/questions, eval/temperature; eval/transfer/questions) goes to the run's
    config: wandb's config, TensorBoard's "config" text."""
    path = os.path.join(run_dir, "eval.jsonl")
    seen = set() if cfg.report_to == "none" else {json.dumps(r, sort_keys=True) for r in runfolder.read_jsonl(path)}
    yield
    if cfg.report_to == "none" or env_rank() > 0:
        return
    rows = [row for row in runfolder.read_jsonl(path) if json.dumps(row, sort_keys=True) not in seen]
    if rows:
        tracker, setting = start(cfg, run_dir, rank=0), {}
        for row in rows:
            split = row.get("split", "test")
            prefix = "eval/" if split == "test" else f"eval/{split}/"
            setting.update({prefix + k: row[k] for k in EVAL_CONSTANTS  # a split's own: its size
                            if k in row and (split == "test" or k == "questions")})
            tracker.log({"eval/step": row.get("step"), **{prefix + k: v for k, v in row.items() if k not in (
                "step", "split", "ci", "base_key", *EVAL_CONSTANTS)}}, step_key="eval/step")
        tracker.add_config(setting)
        tracker.finish()
