"""Where one training step's time goes, and what it costs beyond the plain version of its parts.

Each repeat runs `selfdistill.train` for one step of a fresh run (seed r) and reads the phases it
logs (generate, critic, teacher, student, optimizer) and `time/step`. Then, on the same weights
(the base plus a fresh LoRA adapter, whose B = 0), with the same sampling seed and the same batch,
the bare parts run alone, written the plain way:
  generate  one `model.generate` of the same prompts with the same settings; its decoded texts
            must equal the step's (from samples.jsonl), or the repeat says NOT the same tokens
  teacher   one no-grad forward of the same teacher rows (the step's contexts and validity, read
            from samples.jsonl) with the adapter off, logits at every position
  student   one forward + backward of the same student rows: logits at every position,
            log-softmax, mean log-prob of the sampled tokens (grpo: every row, though the step
            skips rows whose advantage is 0)
overhead_ratio = median(step) / median(sum of the bare parts): what the critic, the divergence,
the optimizer and the Python glue add to plain generation, forward and backward. Compare totals,
not single phases: our teacher phase stops at hidden states and its LM head runs, chunked, inside
our student phase. One warm-up repeat (16 new tokens, not reported) comes first.

    python benchmarks/bench_step.py                               # the toy model, then a 20 M one
    python benchmarks/bench_step.py --model 20m --repeats 5 max_new_tokens=128
    bash benchmarks/gpu_check.sh                                  # Qwen3-1.7B's shapes on a GPU

Models: `toy` is the toy world's 1.08 M base (critique arm, rule critic); `20m` (21 M parameters)
and `qwen3-1.7b` are built here from a config with random weights (no download) and the toy
tokenizer. A random model writes no steps a critic could align to, so they default to the
reference arm; their questions are the toy world's. `--config FILE` and key=value arguments are
selfdistill config settings; the benchmark's own (model, data, one step, batch) win over a file.
"""
import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import common  # noqa: E402
import contexts  # noqa: E402
from plumbing import sampler  # noqa: E402
import selfdistill  # noqa: E402
from toyworld import toy  # noqa: E402
from toyworld import toy_build  # noqa: E402

# Shapes of the random models (Qwen3-1.7B's from its published config.json).
SHAPES = {
    "20m": dict(model_type="llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-1.7b": dict(model_type="qwen3", vocab_size=151_936, hidden_size=2048,
                       intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       rope_theta=1_000_000, rms_norm_eps=1e-6),
}
PHASES = ("generate", "critic", "teacher", "student", "optimizer")


# ---------------------------------------------------------------------------------------------
# The model, the step, the bare parts


def build_random_model(name, folder, dtype):
    """A causal LM with `name`'s shapes and random weights, saved with the toy tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tokenizer = toy.make_tokenizer()
    shape = dict(SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **{"vocab_size": len(tokenizer), **shape},
                                  max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=common.DTYPES[dtype])
    model.generation_config.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bare_parts(cfg, model_path, train_path, device, samples):
    """The step's parts written the plain way, on its batch: ({phase: s}, {phase: GiB}, same)."""
    timer = common.Timer(device)
    model, tokenizer = common.load_model(cfg, model_path, device)
    records = common.load_jsonl(train_path)
    batch = [records[i] for i in common.batch_for_step(len(records), cfg.batch_size, 0, cfg.seed)]
    gold = [r for r in batch for _ in range(cfg.samples_per_question)]
    prompts = [contexts.student_prompt_ids(tokenizer, r["question"], cfg.prompts, cfg.student_thinking)
               for r in gold]
    stop, pad = sampler.eos_ids(model, tokenizer), tokenizer.pad_token_id
    rows = contexts.build_rows(prompts, [[] for _ in prompts], pad)  # left-padded prompts alone
    torch.manual_seed(common.step_seed(cfg, 0))
    model.eval()
    with timer("generate"), torch.no_grad():
        out = model.generate(input_ids=rows["input_ids"].to(device),
                             attention_mask=rows["attention_mask"].to(device),
                             generation_config=sampler.sampling_config(tokenizer, stop, cfg.max_new_tokens,
                                                                      cfg.temperature, cfg.top_p, cfg.top_k))
    responses, _ = sampler.cut_at_stop(out[:, rows["input_ids"].shape[1]:], stop)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    same = texts == [s["response"] for s in samples]
    # the step's rows: its own contexts and validity, as samples.jsonl recorded them
    keep = [i for i, s in enumerate(samples) if s["valid"]]
    parts = [keep[j:j + cfg.micro_batch] for j in range(0, len(keep), cfg.micro_batch)]
    students = [contexts.build_rows([prompts[i] for i in part], [responses[i] for i in part], pad)
                for part in parts]
    teachers = [] if cfg.arm == "grpo" else [contexts.build_rows(
        [contexts.teacher_prompt_ids(tokenizer, gold[i]["question"], samples[i]["context"], cfg.arm,
                                     cfg.prompts, cfg.teacher_thinking, cfg.max_context_tokens)
         for i in part], [responses[i] for i in part], pad) for part in parts]

    def forward(rows):  # logits at every position, as a plain implementation computes them
        return model(input_ids=rows["input_ids"].to(device), attention_mask=rows["attention_mask"].to(device),
                     position_ids=rows["position_ids"].to(device), use_cache=False).logits

    if teachers:
        with timer("teacher"), torch.no_grad(), model.disable_adapter():
            for teacher in teachers:
                forward(teacher)
    model.train()
    with timer("student"):
        for student in students:
            mask = student["response_mask"].to(device)  # (B, T)
            T = mask.shape[1]
            logp = forward(student)[:, -T - 1:-1].float().log_softmax(-1)  # (B, T, V)
            ids = student["input_ids"][:, -T:].to(device)  # (B, T)
            token_logp = logp.gather(-1, ids[..., None]).squeeze(-1)  # (B, T)
            (-(token_logp * mask).sum() / mask.sum()).backward()
    return timer.seconds, timer.peak_gib, same


def one_step(cfg, device):
    """train() for one step of a fresh run: (its metrics record, its samples.jsonl rows)."""
    run_dir = os.path.join(cfg.out_dir, cfg.run)
    shutil.rmtree(run_dir, ignore_errors=True)  # a kept folder from an earlier call would resume
    selfdistill.train(cfg)
    free(device)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        return record, [json.loads(line) for line in f]


def spread(values):
    return f"{statistics.median(values):.3f} s [{min(values):.3f}–{max(values):.3f}]"


def step_config(args, model_name, model_path, train_path, context, r, folder):
    """The selfdistill config of repeat r: the user's file and overrides, then the benchmark's own."""
    argv = (["--config", args.config] if args.config else []) + [
        f"--context={args.context or context}", f"--run={model_name}-{r}", f"out_dir={folder}",
        f"threads={args.threads}", *args.overrides,  # the user's settings, then the benchmark's
        f"model={model_path}", f"train_file={train_path}", f"test_file={train_path}",
        f"seed={r}", "max_steps=1", "eval_at_end=false", f"batch_size={args.prompts}"]
    cfg = selfdistill.load_config(argv)
    if r == 0:  # the warm-up only has to touch every kernel once: short responses do
        cfg.max_new_tokens = min(16, cfg.max_new_tokens)
    return cfg


def bench(model_name, args, folder):
    if model_name == "toy":
        built = toy_build.ensure_built()
        model_path, train_path, context = built["model_dir"], built["train"], "critique"
    else:
        model_path, train_path, context = os.path.join(folder, model_name), toy_build.ensure_built()["train"], "reference"
        if not os.path.isdir(model_path):
            dtype = step_config(args, model_name, model_path, train_path, context, 1, folder).dtype
            n = build_random_model(model_name, model_path, dtype)
            print(f"built {model_name}: {n / 1e6:.1f} M parameters, random weights")
    steps, bares = [], []
    for r in range(args.repeats + 1):  # repeat 0 warms up
        cfg = step_config(args, model_name, model_path, train_path, context, r, folder)
        device = common.pick_device(cfg)
        record, samples = one_step(cfg, device)
        seconds, peaks, same = bare_parts(cfg, model_path, train_path, device, samples)
        free(device)  # the bare parts' model is gone once they return
        tokens = round(record["train/response_len"] * len(samples))
        bare = sum(seconds.values())
        print(f"{model_name} repeat {r}{' (warm-up)' if r == 0 else ''}: step {record['time/step']:.3f} s, "
              f"bare {bare:.3f} s, ratio {record['time/step'] / bare:.3f}; {tokens} generated tokens, "
              + ("the same texts" if same else "NOT the same tokens as the step"))
        if r:
            steps.append(record)
            bares.append((seconds, peaks))
    print(f"\n{model_name}: {args.repeats} repeats, median [min–max]")
    for phase in [p for p in PHASES if any(f"time/{p}" in s for s in steps)]:
        line = f"  {phase:<10} step {spread([s.get(f'time/{phase}', 0.0) for s in steps])}"
        if any(phase in seconds for seconds, _ in bares):
            line += f"   bare {spread([seconds[phase] for seconds, _ in bares])}"
        memory = [s[f"memory/{phase}"] for s in steps if f"memory/{phase}" in s]
        if memory:
            bare_memory = [peaks[phase] for _, peaks in bares if phase in peaks]
            line += f"   peak {max(memory):.2f} GiB" + (f" (bare {max(bare_memory):.2f})" if bare_memory else "")
        print(line)
    step_times = [s["time/step"] for s in steps]
    bare_times = [sum(seconds.values()) for seconds, _ in bares]
    glue = [s["time/step"] - sum(s.get(f"time/{p}", 0.0) for p in PHASES) for s in steps]
    print(f"  {'glue':<10} step {spread(glue)}")
    print(f"  {'total':<10} step {spread(step_times)}   bare {spread(bare_times)}")
    print(f"model={model_name} overhead_ratio={statistics.median(step_times) / statistics.median(bare_times):.3f}")


# ---------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["toy", *SHAPES], action="append",
                        help="repeatable; default: toy and 20m")
    parser.add_argument("--context", choices=selfdistill.ARMS,
                        help="default: critique for toy, reference for the random models")
    parser.add_argument("--prompts", type=int, default=32, help="questions per step (paper: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--keep", help="folder for the runs and built models (default: a temporary one)")
    parser.add_argument("--config", help="a selfdistill YAML file (e.g. configs/qwen3-1.7b.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()  # options may follow key=value (gpu_check.sh passes both)
    import platform
    print(f"{time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs | torch {torch.__version__}"
          + (f" | {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    with tempfile.TemporaryDirectory() as tmp, common.user_errors():
        folder = args.keep or tmp
        # bad settings or a missing GPU fail here, before a model is built
        common.pick_device(step_config(args, "check", "toy", "", "reference", 1, folder))
        for name in args.model or ["toy", "20m"]:
            bench(name, args, folder)


if __name__ == "__main__":
    main()
