"""Where one training step's time goes, and how much the step costs beyond the bare work.

Each repeat runs `selfdistill.train` for one step of a fresh run (seed r) and reads the phases it
logs (generate, critic, teacher, student, optimizer) and `time/step`, the whole step with its glue.
Then, on the same weights (the base plus a fresh LoRA adapter, whose B = 0) and with the same
sampling seed, the bare parts run alone on the same batch:
  generate  one plain `model.generate` of the same prompts with the same settings (so the same
            tokens; checked)
  teacher   one no-grad forward of the same teacher rows with the adapter off, logits everywhere
  student   one forward + backward of the same student rows: logits everywhere, log-softmax,
            mean log-prob of the sampled tokens (grpo: of every row, though the step skips the
            rows whose advantage is 0)
overhead_ratio = median(step) / median(sum of the bare parts): what the critic, the divergence,
the chunked LM head, the optimizer and the Python glue cost on top of work no implementation of
this step can skip. One warm-up repeat (not reported) comes first.

    python benchmarks/bench_step.py                               # the toy model, then a 20 M one
    python benchmarks/bench_step.py --model 20m --repeats 5 max_new_tokens=128
    bash benchmarks/gpu_check.sh                                  # Qwen3-1.7B's shapes on a GPU

Models: `toy` is the toy world's 1.08 M base (critique arm, rule critic); `20m` and `qwen3-1.7b`
are built here from a config with random weights (no download) and the toy tokenizer. A random
model writes no steps a critic could align to, so they default to the reference arm; their
questions are the toy world's. key=value arguments are selfdistill config overrides.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import contexts  # noqa: E402
import critic  # noqa: E402
import selfdistill  # noqa: E402
import toy  # noqa: E402

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


def build_random_model(name, folder, dtype):
    """A causal LM with `name`'s shapes and random weights, saved with the toy tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tokenizer = toy.make_tokenizer()
    shape = dict(SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **{"vocab_size": len(tokenizer), **shape},
                                  max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=selfdistill.DTYPES[dtype])
    model.generation_config.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    """(seconds, peak GiB on a GPU or None, result) of fn()."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return time.perf_counter() - start, peak, result


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bare_parts(cfg, model_path, train_path, device):
    """The same step's bare work: plain generate, teacher forward, student forward + backward."""
    model, tokenizer = selfdistill.load_model(cfg, model_path, device)
    records = selfdistill.load_jsonl(train_path)
    batch = [records[i] for i in selfdistill.batch_for_step(len(records), cfg.batch_size, 0, cfg.seed)]
    gold = [r for r in batch for _ in range(cfg.samples_per_question)]
    prompts = [contexts.student_prompt_ids(tokenizer, r["question"], cfg.prompts, cfg.student_thinking)
               for r in gold]
    stop = selfdistill.eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    rows = contexts.build_rows(prompts, [[] for _ in prompts], pad)  # left-padded prompts alone
    torch.manual_seed(cfg.seed * 1_000_003)  # the seed train() uses for step 0
    model.eval()

    def plain_generate():
        with torch.no_grad():
            return model.generate(input_ids=rows["input_ids"].to(device),
                                  attention_mask=rows["attention_mask"].to(device),
                                  generation_config=selfdistill.sampling_config(cfg, tokenizer, stop))

    seconds, peaks = {}, {}
    seconds["generate"], peaks["generate"], out = timed(device, plain_generate)
    responses, _ = selfdistill.cut_at_stop(out[:, rows["input_ids"].shape[1]:], stop)
    # the same rows as the step (not timed: the critic and prompt building are not bare work)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    keep, notes = list(range(len(gold))), None
    if cfg.context == "critique":
        judge = selfdistill.make_judge(cfg, device)
        notes = judge([r["question"] for r in gold], texts, [r.get("solution", "") for r in gold],
                      [r["answer"] for r in gold])
        keep = [i for i, (t, c, r) in enumerate(zip(texts, notes, gold))
                if c is not None and critic.validate_critique(t, c, r["answer"])[0]]
    elif cfg.context == "reference":
        notes = [selfdistill.teacher_context(cfg, r) for r in gold]
    parts = [keep[j:j + cfg.micro_batch] for j in range(0, len(keep), cfg.micro_batch)]
    students = [contexts.build_rows([prompts[i] for i in part], [responses[i] for i in part], pad)
                for part in parts]
    teachers = [] if notes is None else [contexts.build_rows(
        [contexts.teacher_prompt_ids(tokenizer, gold[i]["question"], notes[i], cfg.context, cfg.prompts,
                                     cfg.teacher_thinking, cfg.max_context_tokens) for i in part],
        [responses[i] for i in part], pad) for part in parts]

    def forward(rows):
        return model(input_ids=rows["input_ids"].to(device), attention_mask=rows["attention_mask"].to(device),
                     position_ids=rows["position_ids"].to(device), use_cache=False).logits

    def teacher_forward():
        with torch.no_grad(), model.disable_adapter():
            for teacher in teachers:
                forward(teacher)

    def student_forward_backward():
        model.train()
        for student in students:
            mask = student["response_mask"].to(device)
            T = mask.shape[1]
            logp = forward(student)[:, -T - 1:-1].float().log_softmax(-1)  # (B, T, V)
            ids = student["input_ids"][:, -T:].to(device)
            token_logp = logp.gather(-1, ids[..., None]).squeeze(-1)  # (B, T)
            (-(token_logp * mask).sum() / mask.sum()).backward()
        model.zero_grad(set_to_none=True)

    if teachers:
        seconds["teacher"], peaks["teacher"], _ = timed(device, teacher_forward)
    seconds["student"], peaks["student"], _ = timed(device, student_forward_backward)
    return seconds, peaks, sum(map(len, responses))


def one_step(cfg, device):
    """train() for one step of a fresh run; its logged record."""
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, model = selfdistill.train(cfg)
    del model
    free(device)
    with open(os.path.join(cfg.out_dir, cfg.run, "metrics.jsonl")) as f:
        return json.loads(f.readline())


def spread(values):
    return f"{statistics.median(values):.3f} s [{min(values):.3f}–{max(values):.3f}]"


def bench(model_name, args, overrides, folder):
    if model_name == "toy":
        built = toy.ensure_built()
        model_path, train_path, context = built["model_dir"], built["train"], "critique"
    else:
        model_path, train_path, context = os.path.join(folder, model_name), toy.ensure_built()["train"], "reference"
        if not os.path.isdir(model_path):
            n = build_random_model(model_name, model_path, selfdistill.load_config(overrides).dtype)
            print(f"built {model_name}: {n / 1e6:.1f} M parameters, random weights")
    steps, bares = [], []
    for r in range(args.repeats + 1):  # repeat 0 warms up
        argv = [f"--context={args.context or context}", f"--run={model_name}-{r}",
                f"model={model_path}", f"train_file={train_path}", f"test_file={train_path}",
                f"out_dir={folder}", f"seed={r}", "max_steps=1", "eval_at_end=false",
                f"batch_size={args.prompts}", f"micro_batch={args.prompts}",
                f"threads={args.threads}", *overrides]
        if r == 0:  # the warm-up only has to touch every kernel once: short responses do
            argv.append("max_new_tokens=16")
        cfg = selfdistill.load_config(argv)
        if not any(o.startswith("generation_batch=") for o in overrides):
            cfg.generation_batch = cfg.batch_size * cfg.samples_per_question  # one call, as the bare one
        device = selfdistill.pick_device(cfg)
        record = one_step(cfg, device)
        seconds, peaks, tokens = bare_parts(cfg, model_path, train_path, device)
        free(device)  # the bare parts' model is gone once they return
        step_tokens = round(record["train/response_len"] * args.prompts * cfg.samples_per_question)
        same = "same tokens" if tokens == step_tokens else f"NOT the same tokens ({tokens} vs {step_tokens})"
        bare = sum(seconds.values())
        print(f"{model_name} repeat {r}{' (warm-up)' if r == 0 else ''}: step {record['time/step']:.3f} s, "
              f"bare {bare:.3f} s, ratio {record['time/step'] / bare:.3f}; {step_tokens} generated "
              f"tokens, {same}")
        if r:
            steps.append(record)
            bares.append((seconds, peaks))
    print(f"\n{model_name}: {args.repeats} repeats, median [min–max]")
    for phase in [p for p in PHASES if any(f"time/{p}" in s for s in steps)]:
        values = [s.get(f"time/{phase}", 0.0) for s in steps]
        bare_values = [b[0][phase] for b in bares if phase in b[0]]
        line = f"  {phase:<10} step {spread(values)}"
        if bare_values:
            line += f"   bare {spread(bare_values)}"
        memory = [s[f"memory/{phase}"] for s in steps if f"memory/{phase}" in s]
        if memory:
            bare_memory = [b[1][phase] for b in bares if b[1].get(phase) is not None]
            line += f"   peak {max(memory):.2f} GiB" + (f" (bare {max(bare_memory):.2f})" if bare_memory else "")
        print(line)
    step_times = [s["time/step"] for s in steps]
    bare_times = [sum(b[0].values()) for b in bares]
    glue = [s["time/step"] - sum(s.get(f"time/{p}", 0.0) for p in PHASES) for s in steps]
    print(f"  {'glue':<10} step {spread(glue)}")
    print(f"  {'total':<10} step {spread(step_times)}   bare {spread(bare_times)}")
    ratio = statistics.median(step_times) / statistics.median(bare_times)
    print(f"model={model_name} overhead_ratio={ratio:.3f}")
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["toy", *SHAPES], action="append",
                        help="repeatable; default: toy and 20m")
    parser.add_argument("--context", choices=["grpo", "reference", "critique"],
                        help="default: critique for toy, reference for the random models")
    parser.add_argument("--prompts", type=int, default=32, help="questions per step (paper: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--keep", help="folder for the runs and built models (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    import platform
    print(f"{time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs | torch {torch.__version__}"
          + (f" | {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        with selfdistill.user_errors():
            selfdistill.pick_device(selfdistill.load_config(args.overrides))  # bad overrides fail first
            for name in args.model or ["toy", "20m"]:
                bench(name, args, args.overrides, folder)


if __name__ == "__main__":
    main()
