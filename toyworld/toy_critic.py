"""The toy world's learned critic: a frozen model that writes the step-aligned critique, as the
paper's critic (QwQ-32B) does, so that its mistakes, its validation and its cost can be measured.

The rule critic (toy.rule_critique) is exact. This builds a separate model of the solver's family
(a tiny Llama), fine-tuned from the world's solver (or trained from scratch, `init`) on (question,
gold answer, the solver's own sampled attempt) -> the rule critique, through the toy critic prompt (contexts.PROMPTS["toy"]
["critic"]), so `critic=hf` and `critic=http` call it through critic.HFCritic / HTTPCritic exactly
as they call a real critic. The attempts are the world's solver's own samples at T = 1 (right
ones: case A; wrong ones: D; a share cut short at a random character: C; B is rare, as in the
solver's samples).

Strength is a dial: one training run, evaluated at steps spaced geometrically on a probe set of
attempts; the snapshots whose exact agreement with the rule critique lies nearest each target
(weak / medium / strong) are saved in WORLD/critics/NAME/. Their quality is then measured on
held-out attempts (the world's test questions, which the critic never trained on; and, under
"unfiltered", fresh problems of every difficulty, whose attempts are often right) and written to
WORLD/critics/build.json: per case A-D, exact agreement, the share valid under
critic.validate_critique with and without the gold check, the share whose fix is the rule
critique's (same first changed step, same text), and the teacher ceiling with its critiques.
The world's own model, data and build.json are not touched.

The critics serve through `transformers serve` (transformers' OpenAI-compatible server, the API
`vllm serve` gives a GPU user; extra: transformers[serving], in requirements-extras.txt), which answers for a model under
the path it was started with: critic_model must be that path, and /v1/models lists it.

    python -m toyworld.toy_critic build --world toy [--force] [--threads 1]    # build (or rebuild) them
    python selfdistill.py --context critique critic=hf critic_model=strong
    python -m toyworld.toy_critic serve strong --port 8000                     # then, in another shell:
    python selfdistill.py --context critique critic=http critic_url=http://127.0.0.1:8000/v1 \
        critic_model=toyworld/toy_world/critics/strong
"""
import copy
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch

import critic
from contexts import parse_steps, render_prompt, student_prompt_ids, teacher_prompt_ids
from plumbing import common
from plumbing import options
from plumbing import runfolder
from toyworld import toy_build
from toyworld import folders
from toyworld.toy import critique_case, generate_problems, make_model, make_tokenizer, parse_step

# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class CriticSettings:
    seed: int = 0
    init: str = "solver"          # solver (fine-tuned from the world's solver: it already copies after
                                  # `fix:`; a critic of the same family) | scratch (random weights,
                                  # `hidden` wide: 200 steps of 16 left its agreement at 0)
    hidden: int = 128             # the critic's width from scratch (4 layers, the solver's family: 1.1 M parameters)
    steps: int = 400              # training steps of the one run the three strengths are taken from
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    decay: float = 0.25           # last share of the steps: lr decays linearly to lr / 10
    n_attempts: int = 12800       # the solver's sampled attempts to train on (one per question; one pass)
    cut_share: float = 0.15       # share of attempts cut short at a random character (case C)
    n_probe: int = 160            # attempts that place the dial (agreement every eval_every steps)
    probe_growth: float = 1.25    # the probe runs at steps 0, 1, 2, ... about this factor apart, and at the end
    targets: tuple = (0.4, 0.7, 0.95)  # probe agreement the weak / medium / strong snapshots lie nearest
    heldout_samples: int = 2      # attempts per test question for the held-out quality
    n_unfiltered: int = 400       # held-out attempts on unfiltered fresh problems too: the test set's
                                  # attempts are nearly all wrong (case D), these hold right ones (A)


NAMES = ("weak", "medium", "strong")  # one per target, in order


def folder(root):
    return os.path.join(root, "critics")


# ---------------------------------------------------------------------------------------------
# Attempts and examples


def sample_attempts(solver, tok, questions, settings, budget, rng):
    """One attempt per question: the solver's own sample at T = 1 with the plain prompt, cut short
    at a random character with probability cut_share (an unfinished attempt, case C)."""
    prompts = [student_prompt_ids(tok, q, prompts="toy", thinking=False) for q in questions]
    texts = toy_build.sample(solver, tok, prompts, budget, 1.0, 1024)
    return [t[:rng.randrange(len(t))] if t and rng.random() < settings.cut_share else t for t in texts]


def critic_ids(tok, problem, attempt):
    """The toy critic's prompt, as HFCritic renders it (chat template, no thinking switch)."""
    text = critic.critic_prompt(problem["question"], attempt, problem["solution"], problem["answer"], prompts="toy")
    return render_prompt(tok, text, thinking=True)


def examples(tok, problems, attempts):
    """(prompt_ids, target_ids + eos, None) rows for toy_build.response_loss, and each attempt's case."""
    rows, cases = [], []
    for p, attempt in zip(problems, attempts):
        case, target = critique_case(p["question"], attempt, p["answer"])
        rows.append((critic_ids(tok, p, attempt), tok(target, add_special_tokens=False)["input_ids"]
                     + [tok.eos_token_id], None))
        cases.append(case)
    return rows, cases


def write_critiques(model, tok, problems, attempts, budget):
    """The critic's greedy critiques, through the same generation and cleaning as critic.HFCritic."""
    texts = toy_build.sample(model, tok, [critic_ids(tok, p, a) for p, a in zip(problems, attempts)], budget, 0, 1024)
    return [critic.clean_critique(t) for t in texts]


def agreement(model, tok, problems, attempts, budget):
    rule = [critique_case(p["question"], a, p["answer"])[1] for p, a in zip(problems, attempts)]
    written = write_critiques(model, tok, problems, attempts, budget)
    return sum(w == r for w, r in zip(written, rule)) / len(rule)


# ---------------------------------------------------------------------------------------------
# Training: one run, snapshots kept at every probe


def train(tok, rows, probe, settings, budget, solver_dir, progress=True):
    """Train a critic from scratch on `rows`; returns [(step, probe agreement, state_dict)]."""
    from tqdm import tqdm
    if settings.init == "solver":  # the solver's own weights: it already copies a critique after `fix:`
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(solver_dir)
    else:
        model = make_model(tok, settings.seed + 7, settings.hidden)
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    decay_start = settings.steps * (1 - settings.decay)
    scale = lambda s: min((s + 1) / settings.warmup, 1.0,
                          1.0 - 0.9 * (s - decay_start) / (settings.steps - decay_start))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
    order, snapshots, probe_at = [], [], probe_steps(settings)
    model.eval()
    snapshots.append((0, agreement(model, tok, *probe, budget), copy.deepcopy(model.state_dict())))
    for step in tqdm(range(settings.steps), desc="critic", mininterval=5,
                     disable=not progress or not common.progress_bars()):
        if not order:  # a new pass: length-bucketed batches in a shuffled order
            index = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
            order = [index[i:i + settings.batch_size] for i in range(0, len(index), settings.batch_size)]
            rng.shuffle(order)
        model.train()
        loss = toy_build.response_loss(model, [rows[i] for i in order.pop()], tok.pad_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step + 1 in probe_at:
            model.eval()
            score = agreement(model, tok, *probe, budget)
            snapshots.append((step + 1, score, copy.deepcopy(model.state_dict())))
            if progress:
                print(f"critic step {step + 1}: loss {loss.item():.4f}, probe agreement {score:.3f}", flush=True)
    return model, snapshots


def probe_steps(settings):
    """The steps after which the probe runs: about probe_growth apart (dense early, where a critic
    fine-tuned from the solver changes fastest), and the last step."""
    steps, x = {settings.steps}, 1.0
    while x < settings.steps:
        steps.add(int(round(x)))
        x = max(x * settings.probe_growth, int(round(x)) + 1)
    return steps


def pick(snapshots, targets):
    """For each target, the snapshot whose probe agreement lies nearest (the earlier on a tie)."""
    return [min(snapshots, key=lambda s: (abs(s[1] - target), s[0])) for target in targets]


# ---------------------------------------------------------------------------------------------
# Quality on held-out attempts


def first_change(steps, attempt_steps):
    """(index, text) of the first step where a critique leaves the attempt; None when it never does."""
    n = min(len(steps), len(attempt_steps))
    k = next((i for i in range(n) if steps[i] != attempt_steps[i]), n)
    return (k, steps[k]) if k < len(steps) else None


def steps_of(text):
    try:
        return parse_steps(text)[0] if isinstance(text, str) else []
    except ValueError:
        return None


def quality(model, tok, solver, problems, attempts, budget):
    """The critic against the rule critique on held-out attempts, overall and per case A-D:
    exact (the same text), valid (critic.validate_critique with the gold answer; valid_format
    without it), fix_right (its first departure from the attempt is the rule critique's: same step,
    same text), and the teacher ceiling with its critiques (the base solver's accuracy at T = 1
    after `fix: <critique>` on the wrong attempts; an invalid critique counts, as under
    critique_validation=off) beside the same with the rule critiques."""
    is_correct = toy_build.is_correct
    written = write_critiques(model, tok, problems, attempts, budget)
    rows = []
    for p, a, w in zip(problems, attempts, written):
        case, rule = critique_case(p["question"], a, p["answer"])
        attempt_steps, rule_steps, steps = steps_of(a) or [], steps_of(rule), steps_of(w)
        rows.append({"case": case, "exact": w == rule,
                     "valid": critic.validate_critique(a, w, p["answer"])[0],
                     "valid_format": critic.validate_critique(a, w)[0],
                     "fix_right": steps is not None and first_change(steps, attempt_steps)
                     == first_change(rule_steps, attempt_steps)})
    wrong = [i for i, (p, a) in enumerate(zip(problems, attempts)) if not is_correct(a, p["answer"])]
    contexts_ = [(i, c) for i in wrong for c in (written[i], critique_case(problems[i]["question"], attempts[i],
                                                                            problems[i]["answer"])[1])]
    prompts = [teacher_prompt_ids(tok, problems[i]["question"], c, "critique", prompts="toy", thinking=False)
               for i, c in contexts_]
    texts = toy_build.sample(solver, tok, prompts, budget, 1.0, 1024)
    right = [is_correct(t, problems[i]["answer"]) for t, (i, _) in zip(texts, contexts_)]
    mean = lambda flags: round(sum(flags) / len(flags), 4) if flags else None
    keys = ("exact", "valid", "valid_format", "fix_right")
    by_case = {case: {"n": sum(r["case"] == case for r in rows),
                      **{k: mean([r[k] for r in rows if r["case"] == case]) for k in keys}} for case in "ABCD"}
    return {"n": len(rows), **{k: mean([r[k] for r in rows]) for k in keys}, "by_case": by_case,
            "ceiling": mean(right[0::2]), "ceiling_rule": mean(right[1::2]), "ceiling_n": len(wrong)}


# ---------------------------------------------------------------------------------------------
# Build


def build_critics(root, settings=None, force=False, threads=1, progress=True):
    """Build WORLD/critics/{weak,medium,strong}/ and critics/build.json beside a built world; a
    complete folder (build.json present) is kept unless `force`."""
    from transformers import AutoModelForCausalLM
    settings = settings or CriticSettings()
    out = folder(root)
    if os.path.isfile(os.path.join(out, "build.json")) and not force:
        return out
    paths = folders.paths(root)
    if not os.path.isfile(os.path.join(root, "build.json")):
        raise common.UserError(f"no built toy world in {root}; build it first: python -m toyworld.toy_build build")
    previous = torch.get_num_threads()
    torch.set_num_threads(min(threads, os.cpu_count() or 1))
    try:
        start, budget = time.time(), folders.budget(root)
        shutil.rmtree(out, ignore_errors=True)  # from here on the folder reads incomplete
        tok = make_tokenizer()
        solver = AutoModelForCausalLM.from_pretrained(paths["model_dir"]).eval()
        held = [json.loads(line) for line in open(paths["test"])]
        taken = {json.loads(line)["question"] for split in ("test", "transfer") if os.path.isfile(paths[split])
                 for line in open(paths[split])}
        rng = random.Random(settings.seed)
        torch.manual_seed(settings.seed)
        fresh = [p for p in generate_problems(settings.n_attempts + settings.n_probe + len(taken), settings.seed + 50)
                 if p["question"] not in taken][:settings.n_attempts + settings.n_probe]
        attempts = sample_attempts(solver, tok, [p["question"] for p in fresh], settings, budget, rng)
        train_set, probe = fresh[:settings.n_attempts], fresh[settings.n_attempts:]
        rows, cases = examples(tok, train_set, attempts[:settings.n_attempts])
        held = [p for p in held for _ in range(settings.heldout_samples)]
        held_attempts = sample_attempts(solver, tok, [p["question"] for p in held], settings, budget, rng)
        seen = taken | {p["question"] for p in fresh}  # sampled after the rest: it changes none of it
        unfiltered = [p for p in generate_problems(settings.n_unfiltered + len(seen), settings.seed + 60)
                      if p["question"] not in seen][:settings.n_unfiltered]
        unfiltered_attempts = sample_attempts(solver, tok, [p["question"] for p in unfiltered], settings, budget, rng)
        sampled_s = time.time() - start
        model, snapshots = train(tok, rows, (probe, attempts[settings.n_attempts:]), settings, budget,
                                 paths["model_dir"], progress)
        critics = {}
        for name, (step, score, state) in zip(NAMES, pick(snapshots, settings.targets)):
            model.load_state_dict(state)
            model.eval()
            torch.manual_seed(settings.seed + 3)  # the ceiling samples at T = 1
            critics[name] = {"step": step, "probe_agreement": round(score, 4),
                             **quality(model, tok, solver, held, held_attempts, budget)}
            torch.manual_seed(settings.seed + 4)
            critics[name]["unfiltered"] = quality(model, tok, solver, unfiltered, unfiltered_attempts, budget)
            model.save_pretrained(os.path.join(out, name))
            tok.save_pretrained(os.path.join(out, name))
        import transformers
        info = {"settings": asdict(settings), "solver": runfolder.model_digest(paths["model_dir"]),
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_cases": dict(sorted(Counter(cases).items())),
                "probe_curve": [[step, round(score, 4)] for step, score, _ in snapshots],
                "critics": critics,
                "seconds": {"attempts": round(sampled_s), "total": round(time.time() - start)},
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "threads": torch.get_num_threads()}
        runfolder.write_atomic(os.path.join(out, "build.json"), json.dumps(info, indent=1))  # last: complete
    finally:
        torch.set_num_threads(previous)
    return out


def summary(root):
    info = json.load(open(os.path.join(folder(root), "build.json")))
    lines = [f"toy critics in {folder(root)}/ ({info['parameters'] / 1e6:.2f} M parameters each), "
             f"built in {info['seconds']['total']} s; on {next(iter(info['critics'].values()))['n']} held-out attempts:"]
    for name, q in info["critics"].items():
        lines.append(f"  {name:6s} step {q['step']:5d}: exact {q['exact']:.3f}, valid {q['valid']:.3f} "
                     f"(format only {q['valid_format']:.3f}), fix right {q['fix_right']:.3f}, "
                     f"teacher ceiling {q['ceiling']:.3f} (rule {q['ceiling_rule']:.3f})")
    return "\n".join(lines)


def resolve(root, name):
    """A critic's folder: a name of a world's critics (weak / medium / strong), or None. Named
    critics must have been built on the world's solver as it is now (check_current)."""
    path = os.path.join(folder(root), name)
    if name not in NAMES:
        return None
    check_current(root)
    return path


def check_current(root):
    """critics/build.json records the digest of the solver the critics were trained from and
    sampled (`solver`); a world rebuilt since (another solver) makes their quality figures and
    their training attempts another model's: a one-line error that says how to rebuild them.
    Critics without the record, or not built yet, pass (nothing to compare)."""
    try:
        with open(os.path.join(folder(root), "build.json"), encoding="utf-8") as f:
            recorded = json.load(f).get("solver")
    except (OSError, ValueError, AttributeError):
        return
    if recorded and recorded != runfolder.model_digest(folders.paths(root)["model_dir"]):
        raise common.UserError(f"the learned critics in {folder(root)} were built on another build of this "
                               f"world's solver (its model changed since); rebuild them: python -m "
                               f"toyworld.toy_critic build {folders.world_flag(root)} --force")


def inspect(root, name, seed=5):
    """How a critic's critiques differ from the rule's, on one fresh attempt per test question
    (sampled after torch.manual_seed(seed)): {kind: count}. Kinds: exact; echo (a wrong attempt
    reproduced verbatim, as if right); wrong_fix (its first departure from the attempt is not the
    rule's); later_step (the same fix, a later step differs); ending (the same steps, another
    length or answer); unparseable. `faulty` counts the wrong_fix / later_step whose step writes the
    solver's own faulty value for the fact (toy_build.faulty_facts): a blind spot it shares."""
    from transformers import AutoModelForCausalLM
    paths, budget = folders.paths(root), folders.budget(root)
    info = json.load(open(os.path.join(root, "build.json")))["settings"]
    faults = toy_build.faulty_facts(info["seed"], info["faulty_share"])
    tok, problems = make_tokenizer(), [json.loads(line) for line in open(paths["test"])]
    solver = AutoModelForCausalLM.from_pretrained(paths["model_dir"]).eval()
    torch.manual_seed(seed)
    attempts = sample_attempts(solver, tok, [p["question"] for p in problems], CriticSettings(), budget,
                               random.Random(seed))
    model = AutoModelForCausalLM.from_pretrained(resolve(root, name) or name).eval()
    kinds = Counter()
    for p, a, w in zip(problems, attempts, write_critiques(model, tok, problems, attempts, budget)):
        rule = critique_case(p["question"], a, p["answer"])[1]
        mine, theirs, own = steps_of(w), steps_of(rule), steps_of(a) or []
        if w == rule or mine is None:
            kinds["exact" if w == rule else "unparseable"] += 1
            continue
        if w.strip() == a.strip() and not toy_build.is_correct(a, p["answer"]):
            kinds["echo"] += 1
            continue
        fix = first_change(mine, own)
        k = next((i for i in range(min(len(mine), len(theirs))) if mine[i] != theirs[i]), None)
        kind, step = ("wrong_fix", fix and fix[1]) if fix != first_change(theirs, own) else \
            ("ending", None) if k is None else ("later_step", mine[k])
        kinds[kind] += 1
        fact = parse_step(step) if step else None
        kinds["faulty"] += bool(fact and faults.get(fact[:3]) == fact[3])
    return dict(kinds)


def name_of(root, critic_model):
    """The name (weak / medium / strong) a run's critic_model gives one of a world's critics, as a
    name or as its folder (critic=http names the served folder); None for any other model."""
    if critic_model in NAMES:
        return critic_model
    path = os.path.realpath(critic_model) if critic_model else ""
    return next((name for name in NAMES if path == os.path.realpath(os.path.join(folder(root), name))), None)


# ---------------------------------------------------------------------------------------------
# Serving a critic: `transformers serve`, the OpenAI-compatible API that `vllm serve` speaks


SERVING_EXTRA = 'pip install "transformers[serving]==5.24.0"'


def check_serving():
    """A one-line error when transformers' serving extra (FastAPI, uvicorn) is not installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise common.UserError(f"serving a critic needs transformers' serving extra: {SERVING_EXTRA}") from None


def serve_command(path, port, host="127.0.0.1"):
    """`transformers serve PATH` on the CPU, pinned to one model: the server answers for it under the
    name PATH exactly as written here (so critic_model=PATH), and lists it at /v1/models."""
    launcher = "import sys; from transformers.cli.transformers import main; sys.exit(main())"
    return [sys.executable, "-c", launcher, "serve", path, "--device", "cpu", "--host", host, "--port", str(port)]


def command_line(argv=None):
    """python -m toyworld.toy_critic build [--world toy | --root DIR] [--force] [--threads N]: build a world's
    critics (a complete critics/ folder is kept unless --force).
    python -m toyworld.toy_critic serve NAME|FOLDER [--world toy] [--port 8000]: serve one on 127.0.0.1 and
    print the training command that uses it.
    python -m toyworld.toy_critic inspect NAME|FOLDER [--world toy]: how its critiques differ from the rule's."""
    parser = options.Parser(description="Build or serve a toy world's learned critics.")
    parser.add_argument("command", choices=["build", "serve", "inspect"])
    parser.add_argument("critic", nargs="?", help=f"serve, inspect: one of {', '.join(NAMES)}, or a critic's folder")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--world", choices=sorted(folders.WORLDS), help="a named world (default toy)")
    where.add_argument("--root", help="build: a built world's folder of your own")
    parser.add_argument("--force", action="store_true", help="build: rebuild complete critics too")
    parser.add_argument("--threads", type=int, default=1, help="build: torch threads (the build is "
                        "bit-identical at the same count; the shipped critics: 1)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    world = args.world or "toy"
    root = args.root or folders.world_root(world)
    if args.command == "build":
        if not os.path.isfile(os.path.join(root, "build.json")):
            raise common.UserError(f"no built toy world in {root}; build it first: python -m toyworld.toy_build build")
        if args.threads < 1:
            raise common.UserError(f"--threads must be >= 1, got {args.threads}")
        build_critics(root, force=args.force, threads=args.threads)
        print(summary(root))
        return
    if not args.critic:
        raise common.UserError(f"{args.command} needs a critic: one of {', '.join(NAMES)}, or a critic's folder")
    path = resolve(root, args.critic) or args.critic
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise common.UserError(f"no critic in {path}: name one of {', '.join(NAMES)} (built with python "
                               f"-m toyworld.toy_critic build --world {world}) or a critic's folder")
    if args.command == "inspect":
        torch.set_num_threads(1)
        print(json.dumps(inspect(root, path)))
        return
    check_serving()
    path = os.path.relpath(path)  # the name the server answers for, as the user will type it
    print(f"serving {path} on http://127.0.0.1:{args.port}/v1; train against it with:\n"
          f"  python selfdistill.py --context critique model={world} critic=http "
          f"critic_url=http://127.0.0.1:{args.port}/v1 critic_model={path}", flush=True)
    command = serve_command(path, args.port)
    os.execv(command[0], command)

if __name__ == "__main__":
    with common.user_errors():
        command_line()

