"""Where one checkpoint's evaluation (`python eval.py RUN`, per step) spends its time: the parts of
eval.sample_answers and of the row eval.evaluate_steps builds from it, each timed by a light
wrapper (~1 µs a call) around the function that does it:

  prompts    contexts.student_prompt_ids: the chat template, once per question
  generate   sampler.generate: HF generate (prefill, decoding steps, sampling), 256 rows a call
  decode     tokenizer.decode of every sample
  answers    critic.extract_answer and critic.answers_match on every sample
  summarize  eval.question_scores and eval.summarize (Pass@k, Maj@k, bootstrap CIs)
  toy        world.toy_instruments (toy.trace_stats), the toy world's attribution

Each repeat evaluates the run's last checkpoint from the seed eval.py uses, so every repeat must
draw the same samples: the script checks a fingerprint of them (answers, verdicts, lengths, cuts,
texts) and prints it; equal fingerprints across code versions mean bit-identical eval rows.
Reported per part: median seconds [min–max] over --repeats, and its share of the median total.

    python benchmarks/bench_eval.py                     # trains a 10-step toy run in a temporary folder first
    python benchmarks/bench_eval.py --run runs/critique-s0 --repeats 5
"""
import argparse
import collections
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing import common  # noqa: E402
import contexts  # noqa: E402
import critic  # noqa: E402
import eval as evaluation  # noqa: E402
from toyworld import world  # noqa: E402

PARTS = ("prompts", "generate", "decode", "answers", "summarize", "toy")


def timed(seconds, part, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[part] += time.perf_counter() - start
    return wrapper


def one_evaluation(model, tokenizer, cfg, device, records, step):
    """eval.evaluate_steps' work for one step, minus the file I/O: (seconds per part, fingerprint)."""
    seconds = collections.Counter()
    patches = [(contexts, "student_prompt_ids", "prompts"), (common, "generate", "generate"),
               (tokenizer, "decode", "decode"), (critic, "extract_answer", "answers"),
               (critic, "answers_match", "answers")]
    originals = [getattr(owner, name) for owner, name, _ in patches]
    for owner, name, part in patches:
        setattr(owner, name, timed(seconds, part, getattr(owner, name)))
    torch.manual_seed(cfg.seed)  # as evaluate_steps does before every step
    start = time.perf_counter()
    try:
        scored = evaluation.sample_answers(model, tokenizer, cfg, device, records, cfg.eval_samples,
                                           cfg.temperature, f"step {step}")
    finally:
        for (owner, name, _), original in zip(patches, originals):
            setattr(owner, name, original)
    seconds["other"] = time.perf_counter() - start - sum(seconds.values())  # glue inside sample_answers
    start = time.perf_counter()
    exact = world.exact_answers(cfg)
    evaluation.summarize([evaluation.question_scores(*s[:5], cfg.eval_samples, exact) for s in scored])
    seconds["summarize"] = time.perf_counter() - start
    if cfg.model == "toy":
        start = time.perf_counter()
        world.toy_instruments(scored)
        seconds["toy"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())
    samples = json.dumps([[s[0], s[1], s[2], s[3], s[5]] for s in scored])
    return seconds, hashlib.sha256(samples.encode()).hexdigest()[:16]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run folder with checkpoints (default: train a 10-step toy run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads for the default toy run (its "
                        "config.yaml then sets them for the evaluation, as eval.py does)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run
        if run_dir is None:
            run_dir = os.path.join(tmp, "bench")
            subprocess.run([sys.executable, os.path.join(ROOT, "selfdistill.py"), "--context", "critique",
                            "max_steps=10", "eval_at_end=false", f"threads={args.threads}", "run=bench",
                            f"out_dir={tmp}"], check=True, stdout=subprocess.DEVNULL)
        cfg = evaluation.load_run_config(run_dir)
        device = common.pick_device(cfg)
        model_path, _, test_path = world.resolve_paths(cfg)
        records = common.load_jsonl(test_path, normalize=critic.normalize_answer)
        records = records[:cfg.eval_questions or len(records)]
        model, tokenizer = common.load_model(cfg, model_path, device)
        step, checkpoint = max(evaluation.checkpoint_steps(run_dir).items())
        evaluation.load_adapter(model, checkpoint)
        print(f"step {step} of {run_dir}: {len(records)} questions × {cfg.eval_samples} samples, "
              f"generation_batch {cfg.generation_batch}, ≤ {cfg.max_new_tokens} new tokens, "
              f"{torch.get_num_threads()} threads", flush=True)
        runs, fingerprints = [], set()
        for r in range(args.repeats):
            seconds, fingerprint = one_evaluation(model, tokenizer, cfg, device, records, step)
            runs.append(seconds)
            fingerprints.add(fingerprint)
            print(f"  repeat {r + 1}/{args.repeats}: {seconds['total']:.2f} s (generate "
                  f"{seconds['generate']:.2f} s), samples {fingerprint}, load {os.getloadavg()[0]:.2f}", flush=True)
    total = statistics.median(s["total"] for s in runs)
    for part in (*PARTS, "other", "total"):
        values = [s[part] for s in runs]
        print(f"  {part:10s} {statistics.median(values):8.3f} s [{min(values):.3f}–{max(values):.3f}] "
              f"{100 * statistics.median(values) / total:5.1f} %")
    print(f"same samples every repeat: {len(fingerprints) == 1}")
    print(f"eval_s={total:.3f} generate_share={statistics.median(s['generate'] for s in runs) / total:.3f} "
          f"samples={min(fingerprints)}")
    if len(fingerprints) != 1:
        sys.exit(1)


if __name__ == "__main__":
    main()
