"""Seconds per training step of the same self-distillation work done by our `selfdistill.train`
and by TRL's `SDFTTrainer` (trl.experimental.sdft), run alternately, on the toy world.

The work, identical on both sides (settings read from one `selfdistill.load_config` call):
  model    toy_world/model (1.08 M Llama, char tokenizer, chat template), float32, CPU
  LoRA     r, alpha, dropout and target modules of our defaults (peft); the base weights frozen
  data     toy_world/train.jsonl; each step the same 32 questions (our `batch_for_step` order,
           handed to TRL in that order with shuffling off), one sample each (G = 1)
  student  the chat template on the question; the teacher the chat template on
           "{question}\\nref: {solution}" (our `reference` prompt, as TRL's teacher_prompt_template;
           the first row's token ids are checked to be equal)
  sampling T = 1, top-p 1, top-k off, at most 64 new tokens, KV cache on
  loss     forward KL(teacher ‖ student) over the full vocabulary at every response token, mean over
           each sequence's tokens then over sequences; teacher = base model (LoRA off, no grad).
           TRL: distillation_mode="full_logits", distillation_alpha=0.0 (its alpha = 0 branch is
           KL(T‖S)), distillation_is_clip=None
  update   AdamW, constant lr, no warm-up, no weight decay, grad-norm clip 1.0, one step per batch
  threads  torch threads = 1 on both sides (OMP_NUM_THREADS=1 too): the machine is shared, so
           contention is the same for both

What still differs (all inside the trainers, none is a setting):
  - TRL applies the LM head to every position of the padded (B, T+1) grid, right pads after EOS
    included, and holds both sides' (B, T, V) logits at once; ours applies it to the real
    response tokens only, in chunks. Same values on the real tokens, less work for ours.
  - Ours also computes metrics TRL does not (reward, entropy, leak rate, 4-gram context overlap)
    inside the timed step; TRL computes completion-length statistics. This favours TRL slightly.
  - TRL's defaults would add gradient checkpointing and bf16 autocast; both are turned off here
    (gradient_checkpointing=False, bf16=False) because ours uses neither.
  - Samples are random on each side (different RNG streams), so response lengths differ a little;
    both sides' mean lengths and generated tokens/s are printed.
  - Minor: TRL samples with the model in train mode (dropout is off on both sides, so the same
    distribution) and passes no position_ids for left-padded rows (RoPE is relative: equal to
    ~1e-6); ours adds remove_invalid_values to sampling.

Timing: ours, the `time/step` it logs (sampling to metrics line, glue included); TRL, wall time from
on_step_begin to on_step_end of a TrainerCallback (generation, teacher, student, backward, clip,
optimizer; its data loading and logging fall outside, which favours TRL a little). The first step
of every run is warm-up and dropped. Each side runs as its own subprocess, alternating ours, TRL,
ours, TRL, ...; ours with this interpreter, TRL with --peer-python, so TRL never enters the project
environment. Reported: the median of each run's median step time, its min–max over runs, and
peer_ratio = ours / TRL (target <= 0.5).

Install the peer (a separate venv, only for this benchmark; torch pinned first, or pip pulls a
multi-GB CUDA build):
    python3 -m venv .venv-peer && .venv-peer/bin/pip install torch==2.13.0 \\
      && .venv-peer/bin/pip install -r requirements.txt trl==1.16.0
Run (1 min with the defaults, 2 min with --repeats 5 --steps 6, on 2 shared cores):
    .venv/bin/python benchmarks/bench_peer.py --peer-python .venv-peer/bin/python
    .venv/bin/python benchmarks/bench_peer.py --peer-python .venv-peer/bin/python --repeats 5 --steps 6

The figures and the date they were measured are in the README's Performance section.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
INSTALL = ("python3 -m venv .venv-peer && .venv-peer/bin/pip install torch==2.13.0 && "
           ".venv-peer/bin/pip install -r requirements.txt trl==1.16.0")


def our_config(args, out_dir):
    """The one config both sides read their settings from (our `reference` arm)."""
    import selfdistill
    return selfdistill.load_config([
        "--context", "reference", "--run", "peer", f"out_dir={out_dir}", f"seed={args.seed}",
        f"max_steps={args.steps}", f"batch_size={args.batch_size}", f"micro_batch={args.batch_size}",
        f"max_new_tokens={args.max_new_tokens}", f"threads={args.threads}", "support=full",
        "divergence=forward", "teacher=base", "eval_at_end=false", "checkpoint_every=100000"])


# ---------------------------------------------------------------------------------------------
# One side, in its own process: returns per-step seconds and mean response lengths.

def run_ours(args, out_dir):
    import selfdistill
    cfg = our_config(args, out_dir)
    run_dir, _ = selfdistill.train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return [m["time/step"] for m in metrics], [m["train/response_len"] for m in metrics]


def run_trl(args, out_dir):
    import torch
    try:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    except ImportError as e:
        sys.exit(f"error: trl is not importable by {sys.executable} ({e}); install the peer: {INSTALL}")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    import common
    import contexts
    import toy
    cfg = our_config(args, out_dir)
    torch.set_num_threads(cfg.threads)
    model_dir, train_path, _ = toy.resolve_paths(cfg)
    records = common.load_jsonl(train_path, need_solution=True)
    order = [i for step in range(cfg.max_steps)  # our questions, step by step, in our order
             for i in common.batch_for_step(len(records), cfg.batch_size, step, cfg.seed)]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": records[i]["question"]}],
                                  "privileged_context": records[i]["solution"]} for i in order])
    template = contexts.PROMPTS[cfg.prompts]["reference"].format(question="{prompt}",
                                                                 context="{privileged_context}")
    config = SDFTConfig(
        output_dir=out_dir, seed=cfg.seed, use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1, num_generations=1,
        max_steps=cfg.max_steps, shuffle_dataset=False, max_prompt_length=None,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, distillation_mode="full_logits", distillation_alpha=0.0,
        distillation_is_clip=None, teacher_model_kind="base", teacher_prompt_template=template,
        learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets.split(","), task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    clock = step_clock()
    trainer = SDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=lora, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    check_same_prompts(trainer, tokenizer, dataset[0], cfg)
    trainer.train()
    return [end - begin for begin, end in zip(clock.begin, clock.end)], clock.lengths


def check_same_prompts(trainer, tokenizer, row, cfg):
    """TRL's student and teacher prompt ids must equal ours, or the two sides do different work."""
    import contexts
    question = row["prompt"][0]["content"]
    ours = [contexts.student_prompt_ids(tokenizer, question, cfg.prompts),
            contexts.teacher_prompt_ids(tokenizer, question, row["privileged_context"], "reference",
                                        cfg.prompts, max_context_tokens=cfg.max_context_tokens)]
    teacher_prompt = trainer.teacher_context_builder.select_generation_prompts(
        [row["prompt"]], [row["privileged_context"]])[0]
    theirs = [list(trainer._tokenize_prompts([row["prompt"]])[0]),
              list(trainer._tokenize_prompts([teacher_prompt])[0])]
    assert theirs == ours, f"TRL's prompt ids differ from ours:\n{theirs}\n{ours}"


def step_clock():
    """A TrainerCallback (transformers is imported only inside the side's process)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time of each optimizer step, and the mean completion length TRL logs for it."""
        def __init__(self):
            self.begin, self.end, self.lengths = [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])
    return Clock()


# ---------------------------------------------------------------------------------------------
# The driver: alternate the two sides, then summarise.

def run_side(side, python, args, seed):
    command = [python, os.path.abspath(__file__), "--side", side, "--seed", str(seed),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        sys.exit(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                 else f"error: the {side} run failed (exit {result.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(name, runs, batch_size):
    """Per run: median s/step, mean response length and generated tokens/s over the kept steps."""
    medians, lengths, rates = [], [], []
    for run in runs:
        seconds, length = run["seconds"][1:], run["lengths"][1:]  # step 1 is warm-up
        medians.append(statistics.median(seconds))
        lengths.append(statistics.mean(length))
        rates.append(sum(length) * batch_size / sum(seconds))
    median = statistics.median(medians)
    print(f"{name:>4}: median {median:.3f} s/step (runs {min(medians):.3f}-{max(medians):.3f}: "
          + ", ".join(f"{m:.3f}" for m in medians) + f") | mean response {statistics.mean(lengths):.1f} "
          f"tokens | {statistics.median(rates):.0f} generated tokens per step-second")
    return median, statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-python", default=sys.executable,
                        help="interpreter of the venv with trl installed (see the docstring)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is dropped")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per step (G = 1)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    if args.side:  # one run, in this process
        with tempfile.TemporaryDirectory() as out_dir:
            seconds, lengths = (run_ours if args.side == "ours" else run_trl)(args, out_dir)
        print("RESULT " + json.dumps({"seconds": seconds, "lengths": lengths}))
        return
    check = subprocess.run([args.peer_python, "-c", "import trl"], capture_output=True)
    if check.returncode != 0:
        sys.exit(f"error: trl is not importable by {args.peer_python}; install the peer: {INSTALL}")
    start, runs = time.time(), {"ours": [], "trl": []}
    for repeat in range(args.repeats):
        for side, python in (("ours", sys.executable), ("trl", args.peer_python)):
            runs[side].append(run_side(side, python, args, seed=repeat))
            seconds = runs[side][-1]["seconds"]
            print(f"repeat {repeat + 1}/{args.repeats} {side}: s/step " + " ".join(f"{s:.2f}" for s in seconds),
                  flush=True)
    print(f"{args.repeats} runs per side, {args.steps - 1} timed steps each (step 1 dropped), "
          f"{args.batch_size} questions x 1 sample, <= {args.max_new_tokens} new tokens, "
          f"threads={args.threads}, {time.time() - start:.0f} s in all")
    ours, ours_rate = summarise("ours", runs["ours"], args.batch_size)
    trl, trl_rate = summarise("trl", runs["trl"], args.batch_size)
    print(f"peer_ratio={ours / trl:.3f} tokens_per_s_ratio={ours_rate / trl_rate:.3f}")


if __name__ == "__main__":
    main()
