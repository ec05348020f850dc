"""Where the step's metrics line goes besides RUN/metrics.jsonl: `report_to=none|tensorboard|wandb`.
The same record under the same keys, every step; then the evaluation rows (eval.jsonl), which
eval.py sends after it evaluates (evaluation_rows), as eval/<key> against their checkpoint's step. Rank 0 only; every other case gets a tracker that does nothing, so call sites never branch
(nanochat's DummyWandb). A resumed run continues the same record: TensorBoard writes to
RUN/tensorboard/ and hides the events after the checkpoint it resumed from (purge_step); wandb
reopens the run whose id is kept in RUN/wandb_id (offline, WANDB_MODE=offline, each session is its
own folder under RUN/wandb/ with that id, and `wandb sync` joins them into one run).
"""
import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import sys

from plumbing import runfolder
from plumbing.common import UserError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to → the package it needs
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # … and what its tracker imports


def check_installed(report_to):
    """A missing package is a one-line error before anything runs; so is one whose import fails in
    any other way (a broken install, a version clash), which would otherwise fail at the first log."""
    if report_to == "none":
        return
    try:
        __import__(MODULES[report_to])
    except ImportError:
        raise UserError(f"report_to={report_to} needs the {PACKAGES[report_to]} package: "
                        f"pip install {PACKAGES[report_to]} (or -r requirements-extras.txt)") from None
    except Exception as e:  # noqa: BLE001 (any failure of a third-party import is the install's)
        said = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"report_to={report_to}: the {PACKAGES[report_to]} package is installed but does not "
                        f"import ({type(e).__name__}: {said}); reinstall it: pip install "
                        f"--force-reinstall {PACKAGES[report_to]}") from None


WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # wandb.Settings' own choices


def check_ready(cfg, run_dir=None):
    """Training's check of its logging, before anything runs: the package imports, and for wandb
    what wandb.init would refuse with a traceback (a WANDB_MODE or WANDB_PROJECT it rejects, a stored
    RUN/wandb_id it rejects, no API key outside offline mode) is one line. wandb validates the
    values itself (wandb.Settings); we only say which of ours they came from."""
    check_installed(cfg.report_to)
    if cfg.report_to != "wandb" or env_rank() > 0:
        return
    import wandb
    mode = os.environ.get("WANDB_MODE", "online")
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):  # wandb's older switch
        mode = "disabled"
    if mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE={mode!r} is not a wandb mode; use one of {', '.join(WANDB_MODES)} "
                        f"(offline needs no account)")
    id_path = os.path.join(run_dir or os.path.join(cfg.out_dir, cfg.run), "wandb_id")
    stored = stored_run_id(id_path)
    asked = [(f"WANDB_PROJECT={project()!r}", {"project": project()}, "set another project name")]
    if stored is not None:
        asked.append((f"the run id stored in {id_path} ({stored!r})", {"run_id": stored},
                      "remove that file to start a new wandb run"))
    for what, values, fix in asked:
        try:
            wandb.Settings(**values)
        except Exception as e:  # noqa: BLE001 (wandb's UsageError or pydantic's ValidationError)
            errors = getattr(e, "errors", None)
            said = errors()[0]["msg"] if callable(errors) else (str(e).splitlines() or [""])[0]
            raise UserError(f"report_to=wandb: {what} is refused by wandb ({said}); {fix}") from None
    if mode in ("online", "shared", "run") and not wandb_key_found():
        raise UserError("report_to=wandb needs a W&B API key to log online: run `wandb login`, set "
                        "WANDB_API_KEY, or log offline with WANDB_MODE=offline (then `wandb sync`)")


def project():
    return os.environ.get("WANDB_PROJECT", "selfdistill")


def stored_run_id(id_path):
    """The wandb run id kept in RUN/wandb_id (None: no file yet, a new run gets one)."""
    if not os.path.isfile(id_path):
        return None
    with open(id_path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def wandb_key_found():
    """An API key where wandb looks for one without asking: WANDB_API_KEY, an identity token file,
    or the netrc entry `wandb login` writes for the server's host."""
    import netrc
    from urllib.parse import urlsplit
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.path.expanduser(os.environ.get("NETRC") or "~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


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
        run_id = stored_run_id(id_path) or secrets.token_hex(4)
        runfolder.write_atomic(id_path, run_id + "\n")
        self.run = wandb.init(project=project(), name=cfg.run, id=run_id,
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
    """Around an evaluation (eval.py, also when the trainer starts it): the eval.jsonl rows that
    report_to has not had yet are sent after it against their checkpoint's step (eval/step): the
    test split as eval/<key> (eval/avg, eval/pass, eval/maj, eval/toy/...), the toy world's transfer
    split as eval/transfer/<key>; the rows of an earlier, interrupted evaluation included:
    RUN/eval_sent.json records which rows each backend got. The evaluation's setting (eval/n,
    eval/k, eval/questions, eval/temperature; eval/transfer/questions) goes to the run's config:
    wandb's config, TensorBoard's "config" text. Evaluation only reads a run, so a logging package
    that is missing (or a wandb that refuses) is a warning, never a refusal; the rows wait for a
    later evaluation."""
    path, record = os.path.join(run_dir, "eval.jsonl"), os.path.join(run_dir, "eval_sent.json")
    active = cfg.report_to != "none" and env_rank() == 0
    if active and not os.path.isfile(record):  # a run from before the record: the trainer sent what is there
        mark_sent(record, cfg.report_to, runfolder.read_jsonl(path))
    yield
    if not active:
        return
    sent = set(read_sent(record).get(cfg.report_to, []))
    rows = [row for row in runfolder.read_jsonl(path) if row_digest(row) not in sent]
    if not rows:
        return
    try:
        check_ready(cfg, run_dir)
    except UserError as e:
        print(f"warning: {len(rows)} eval row(s) not sent to {cfg.report_to} ({e}); a later "
              f"`python eval.py {run_dir}` sends them", file=sys.stderr)
        return
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
    mark_sent(record, cfg.report_to, rows)


def row_digest(row):
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]


def read_sent(record):
    """RUN/eval_sent.json: {backend: [row digests sent]}; a damaged file counts as nothing sent."""
    try:
        with open(record) as f:
            sent = json.load(f)
    except (OSError, ValueError):
        return {}
    return sent if isinstance(sent, dict) and all(isinstance(v, list) for v in sent.values()) else {}


def mark_sent(record, backend, rows):
    sent = read_sent(record)
    sent[backend] = sorted(set(sent.get(backend, [])) | {row_digest(row) for row in rows})
    runfolder.write_atomic(record, json.dumps(sent) + "\n")
