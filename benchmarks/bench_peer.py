"""Seconds per training step and peak memory of the same work done by our `selfdistill.train` and by
TRL 1.16, run alternately: self-distillation (`--arm reference`) against `SDFTTrainer`
(trl.experimental.sdft), and GRPO (`--arm grpo`) against `GRPOTrainer`; on the toy world
(`--shape toy`) or on a model with Qwen3's vocabulary (`--shape qwen3`).

The shapes (both sides load the same model folder and read the same train.jsonl):
  toy    toy_world/model: 1.08 M Llama, a 111-entry character vocabulary, untied head; the toy
         questions and the toy prompt set (the question alone); at most 64 new tokens (the toy
         world's budget), sampled until EOS
  qwen3  built once per benchmark in a temporary folder, random weights: a Qwen3 config with
         Qwen3's vocabulary V = 151,936 and a tied head (as Qwen3-1.7B), a small body (QWEN3_BODY:
         hidden 256, 2 layers) so two CPU cores can run it; a WordLevel tokenizer with exactly
         151,936 entries (ChatML template, built locally, no download); synthetic questions of
         random words inside our instruct prompt set, each student prompt exactly --prompt-tokens
         long (no prompt padding), a 64-word reference solution. Generation length is forced: the
         model folder's generation_config.json sets min_new_tokens = max_new_tokens, which both
         sides' generate() merge in (transformers 5 fills every unset field from it), so EOS is
         masked until the last token and every response is exactly --max-new-tokens long on both
         sides (asserted). Random weights spend V·d = 39 M multiply-adds per token in the head
         against 1.6 M in the body, so the head dominates far more than in Qwen3-1.7B (311 M of 1.7 B).

The work, identical on both sides (settings read from one `selfdistill.load_config` call):
  LoRA     r, alpha, dropout and target modules of our defaults (peft); the base weights frozen
  data     each step the same B questions (our `batch_for_step` order, handed to TRL in that order
           with shuffling off); G = 1 sample each (reference), G = 8 (grpo)
  prompts  TRL's prompt is our student text (prompt set `auto`: toy or instruct) as one user turn;
           its teacher_prompt_template is "{prompt}" followed by the rest of our reference prompt.
           The first row's student (and teacher) prompt ids are asserted equal on both sides
  sampling T = 1, top-p 1, top-k off, KV cache on, all of a step's rows in one generate() call
  batch    --micro-batch sequences per forward/backward on both sides (ours micro_batch; TRL
           per_device_train_batch_size with gradient_accumulation_steps = B·G / micro-batch,
           steps_per_generation = the same, so TRL too samples once per optimizer step: asserted)
  update   AdamW, constant lr, no warm-up, no weight decay, grad-norm clip 1.0, one step per batch
  threads  torch threads = 1 on both sides (OMP_NUM_THREADS=1 too)
  reference: loss forward KL(teacher ‖ student) over the full vocabulary at every response token,
           mean over each sequence's tokens then over sequences; teacher = the base model (LoRA
           off, no grad). TRL: distillation_mode="full_logits", distillation_alpha=0.0 (its KL(T‖S)
           branch), distillation_is_clip=None
  grpo:    binary reward, group advantage (r − mean)/(std + ε) with Bessel's std, one on-policy
           update per batch, no KL term, no reference model. TRL: beta=0.0, num_iterations=1 (its
           ratio is exp(logp − logp.detach()) = 1, so its clip never binds and the gradient is
           −A·∇log π, ours), scale_rewards="group", loss_type="dapo" (the token sum divided by the
           whole batch's token count, across micro-batches: ours), mask_truncated_completions=False.
           Reward (--reward): `answer` = critic.reward(text, gold, exact) with our `exact`, the
           same call on both sides; `parity` = 1 when the decoded response has an odd number of
           characters, for random weights, where `answer` is 0 for every sample and ours would
           skip all the work TRL still does. Ours gets `parity` by replacing critic.reward in its
           own process (the benchmark's only hook into our code).

What still differs (all inside the trainers, none is a setting):
  - reference: TRL applies the LM head to every position of the padded (B, T+1) grid and holds
    student and teacher (B, T, V) logits, their log-softmaxes, the KL terms and their gradients at
    once (≈1.25 GB each at 8 × 256 × V); ours applies it to the real response tokens only,
    chunk_size positions at a time, and takes each chunk's gradient on the spot. Same values on
    the real tokens. At --shape qwen3 every response has full length, so TRL scores no padding and
    the two sides do the same LM-head matmuls; only memory differs there.
  - reference: ours also computes the student's entropy over the full vocabulary at every token (a
    diagnostic, no gradient) inside the loss; TRL's SDFT does not.
  - grpo: TRL 1.16 also avoids (B, T, V) logits (its fused LM head, in vocabulary tiles), but off
    Triton devices (CPU) it scores every position of prompt + completion and recomputes the tiles
    in the backward pass; ours scores response tokens only, once, taking the gradient at once.
    Both compute the entropy.
  - grpo: ours drops samples whose advantage is exactly 0 (a group whose rewards are all equal)
    before the forward pass (deviation 4 of selfdistill.py); TRL runs them with weight 0. So on
    the toy with `answer` ours does less work (the share is printed as zero_signal); with
    `parity` nearly no group is flat. TRL's ε is 1e-4, ours 1e-6 (rewards are 0/1: no effect on
    a mixed group's sign, a ≤1e-4 relative change of its size).
  - Ours also computes metrics TRL does not (leak rate, 4-gram context overlap) inside the timed
    step; TRL computes completion-length and reward statistics.
  - TRL's defaults would add gradient checkpointing and bf16 autocast; both are off here
    (gradient_checkpointing=False, bf16=False) because ours uses neither.
  - Samples are random on each side (different RNG streams), so toy response lengths differ a
    little; both sides' mean lengths and generated tokens/s are printed.
  - Minor: TRL samples with the model in train mode (dropout is 0 on both sides, so the same
    distribution) and passes no position_ids for left-padded rows (RoPE is relative: equal to
    ~1e-6); ours adds remove_invalid_values to sampling (one more pass over (rows, V) per token).

Timing: ours, the `time/step` it logs (sampling to metrics line, glue included) and its phases;
TRL, wall time from on_step_begin to on_step_end of a TrainerCallback (generation, reward, teacher,
student, backward, clip, optimizer; its data loading and logging fall outside, which favours TRL a
little), and its generate() calls timed by a wrapper. The first step of every run is warm-up and
dropped. Memory: each side's peak resident set (VmHWM of /proc/self/status, read at the end of its
process: model, data, generation and training together). Each side runs as its own subprocess,
alternating ours, TRL, ours, TRL, ...; ours with this interpreter, TRL with --peer-python, so TRL
never enters the project environment. A side whose resident set passes --memory-cap-gib is killed
and reported as unable to run the setting. Reported: the median over runs of each run's median
step time and of each run's peak RSS, with min–max over runs, peer_ratio = ours / TRL time
(target <= 0.5) and peer_memory_ratio = ours / TRL peak RSS (target <= 0.25).

Install the peer (a separate venv, only for this benchmark; torch pinned first, or pip pulls a
multi-GB CUDA build):
    python3 -m venv .venv-peer && .venv-peer/bin/pip install torch==2.13.0 \\
      && .venv-peer/bin/pip install -r requirements.txt trl==1.16.0
Run (PEER="--peer-python .venv-peer/bin/python"; wall time on 2 shared cores):
    .venv/bin/python benchmarks/bench_peer.py $PEER                                     # toy SD, 2 min
    .venv/bin/python benchmarks/bench_peer.py $PEER --arm grpo --micro-batch 32 --steps 3 --repeats 5
    .venv/bin/python benchmarks/bench_peer.py $PEER --shape qwen3 --batch-size 8 --micro-batch 8 --steps 2
    .venv/bin/python benchmarks/bench_peer.py $PEER --shape qwen3 --arm grpo --batch-size 1 --micro-batch 8 \\
      --steps 2                                                                         # 8 and 7 min
    .venv/bin/python benchmarks/bench_peer.py $PEER --shape qwen3 --batch-size 16 --micro-batch 16 --steps 2 \\
      --repeats 1                                                      # TRL passes the 10 GiB cap

The figures and the date they were measured are in docs/performance.md.
"""
import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
INSTALL = ("python3 -m venv .venv-peer && .venv-peer/bin/pip install torch==2.13.0 && "
           ".venv-peer/bin/pip install -r requirements.txt trl==1.16.0")
QWEN3_VOCAB = 151_936  # Qwen3's vocabulary (embedding rows), tied input and output embedding
QWEN3_BODY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64)  # Qwen3-1.7B: 2048, 6144, 28, 16, 8, 128
SOLUTION_WORDS = 64  # length of the qwen3 shape's reference solutions (the teacher's context)
G = 8  # samples per question in the grpo arm


# ---------------------------------------------------------------------------------------------
# The qwen3 shape: a tokenizer with Qwen3's vocabulary size, a small random Qwen3, synthetic data.

def qwen3_tokenizer():
    """A WordLevel tokenizer of exactly QWEN3_VOCAB entries: ChatML specials, the words of the chat
    template and of our instruct prompts, then "w0", "w1", ...; split on whitespace, decoded with
    single spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    import contexts
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>", "user", "assistant"]
    words += sorted({w for text in contexts.PROMPTS["instruct"].values() for w in text.split()} - set(words)
                    - {"{question}", "{context}"})  # the prompt set's own words, so no <|unk|> in prompts
    words += [f"w{i}" for i in range(QWEN3_VOCAB - len(words))]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with one space
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", unk_token="<|unk|>",
                                        eos_token="<|im_end|>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                               "{% endif %}")
    assert len(tokenizer) == QWEN3_VOCAB
    return tokenizer


def build_qwen3_world(folder, n_questions, prompt_tokens, max_new_tokens, seed=0, body=None):
    """Write model/ (tokenizer, random Qwen3 weights, generation_config forcing max_new_tokens) and
    train.jsonl (n_questions questions whose student prompt is exactly prompt_tokens long) into
    `folder`; returns (model_dir, train_path)."""
    import torch
    import contexts
    from transformers import AutoModelForCausalLM, Qwen3Config
    tokenizer = qwen3_tokenizer()
    config = Qwen3Config(vocab_size=QWEN3_VOCAB, tie_word_embeddings=True, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, **(body or QWEN3_BODY))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Plain sampling, and no EOS before max_new_tokens: random weights would stop at random points.
    model.generation_config.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   min_new_tokens=max_new_tokens, max_new_tokens=max_new_tokens,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model_dir = os.path.join(folder, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    template_tokens = len(contexts.student_prompt_ids(tokenizer, "", "instruct"))
    if prompt_tokens <= template_tokens:
        raise ValueError(f"prompt_tokens must exceed the {template_tokens} tokens of the prompt around the question")
    rng, first = random.Random(seed), tokenizer.convert_tokens_to_ids("w0")

    def word():  # any of the "w" words
        return f"w{rng.randrange(QWEN3_VOCAB - first)}"
    train_path = os.path.join(folder, "train.jsonl")
    with open(train_path, "w") as f:
        for i in range(n_questions):
            question = " ".join(word() for _ in range(prompt_tokens - template_tokens))
            solution = " ".join(word() for _ in range(SOLUTION_WORDS))
            f.write(json.dumps({"id": f"synthetic-{i}", "question": question, "answer": word(),
                                "solution": solution}) + "\n")
    return model_dir, train_path


# ---------------------------------------------------------------------------------------------
# Settings shared by both sides.

def our_config(args, out_dir):
    """The one config both sides read their settings from (our `reference` or `grpo` arm)."""
    import selfdistill
    if args.shape == "qwen3":
        data = os.path.join(args.world, "train.jsonl")
        where = [f"model={os.path.join(args.world, 'model')}", f"train_file={data}", f"test_file={data}"]
    else:
        where = []
    samples = args.batch_size * (G if args.arm == "grpo" else 1)
    return selfdistill.load_config([
        "--context", args.arm, "--run", "peer", f"out_dir={out_dir}", f"seed={args.seed}", *where,
        f"max_steps={args.steps}", f"batch_size={args.batch_size}",
        f"samples_per_question={G if args.arm == 'grpo' else 1}", f"micro_batch={args.micro_batch or samples}",
        f"generation_batch={samples}", f"max_new_tokens={args.max_new_tokens}", f"threads={args.threads}",
        "support=full", "divergence=forward", "teacher=base", "eval_at_end=false", "checkpoint_every=100000"])


def parity_reward(response, gold, *settings):
    """1 when the decoded response has an odd number of characters (random weights: varied rewards)."""
    return float(len(response) % 2)


def reward_function(kind, cfg):
    """The reward of one decoded response, as ours computes it in selfdistill.train (the same call)."""
    import critic
    from toyworld import world
    if kind == "parity":
        return parity_reward
    exact = world.exact_answers(cfg)  # the toy world: integers compared exactly
    return lambda response, gold: critic.reward(response, gold, exact)


def peak_rss_gib():
    """This process's peak resident set so far (VmHWM), in GiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


# ---------------------------------------------------------------------------------------------
# One side, in its own process: per-step seconds, mean response lengths, share of flat groups.

def run_ours(args, out_dir):
    import critic
    import selfdistill
    cfg = our_config(args, out_dir)
    if args.reward == "parity":
        critic.reward = parity_reward  # selfdistill calls critic.reward(text, gold, exact)
    run_dir, _ = selfdistill.train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    phases = {k[len("time/"):]: [m.get(k, 0.0) for m in metrics] for k in metrics[-1]
              if k.startswith("time/") and k != "time/step"}
    return {"seconds": [m["time/step"] for m in metrics], "lengths": [m["train/response_len"] for m in metrics],
            "zero_signal": [m["train/zero_signal"] for m in metrics], "phases": phases}


def run_trl(args, out_dir):
    import torch
    try:
        from trl import GRPOConfig, GRPOTrainer
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    except ImportError as e:
        sys.exit(f"error: trl is not importable by {sys.executable} ({e}); install the peer: {INSTALL}")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from plumbing import common
    import contexts
    from toyworld import world
    cfg = our_config(args, out_dir)
    torch.set_num_threads(cfg.threads)
    model_dir, train_path, _ = world.resolve_paths(cfg)
    records = common.load_jsonl(train_path, need_solution=args.arm == "reference")
    order = [i for step in range(cfg.max_steps)  # our questions, step by step, in our order
             for i in common.batch_for_step(len(records), cfg.batch_size, step, cfg.seed)]
    student = contexts.PROMPTS[cfg.prompts]["student"]  # TRL's prompt: our student text in a user turn
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": student.format(question=records[i]["question"])}],
                                  "privileged_context": records[i].get("solution", ""),
                                  "answer": records[i]["answer"]} for i in order])
    rows_per_step = cfg.batch_size * cfg.samples_per_question
    shared = dict(  # the settings both TRL trainers take under the same names
        output_dir=out_dir, seed=cfg.seed, use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=cfg.micro_batch, gradient_accumulation_steps=rows_per_step // cfg.micro_batch,
        num_generations=cfg.samples_per_question, max_steps=cfg.max_steps, shuffle_dataset=False,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip, optim="adamw_torch", logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True)
    if args.arm == "reference":
        reference = contexts.PROMPTS[cfg.prompts]["reference"]  # our student text, then the context's part
        assert reference.startswith(student)
        template = "{prompt}" + reference[len(student):].format(context="{privileged_context}")
        config = SDFTConfig(**shared, max_prompt_length=None, distillation_mode="full_logits",
                            distillation_alpha=0.0, distillation_is_clip=None, teacher_model_kind="base",
                            teacher_prompt_template=template)
        make, extra = SDFTTrainer, {}
    else:
        judge = reward_function(args.reward, cfg)

        def reward(completions, answer, **kwargs):  # TRL hands over the decoded completion messages
            return [judge(c[0]["content"], a) for c, a in zip(completions, answer)]
        config = GRPOConfig(**shared, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
                            mask_truncated_completions=False, log_completions=False)
        make, extra = GRPOTrainer, {"reward_funcs": [reward]}
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets.split(","), task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    clock = step_clock()
    trainer = make(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                   peft_config=lora, callbacks=[clock], **extra)
    trainer.remove_callback(PrinterCallback)
    sample = trainer.model.generate  # timed, to split TRL's step into sampling and the rest

    def timed_sample(*args, **kwargs):
        start = time.perf_counter()
        out = sample(*args, **kwargs)
        clock.generate.append(time.perf_counter() - start)
        return out
    trainer.model.generate = timed_sample
    check_same_prompts(trainer, tokenizer, dataset[0], records[order[0]], cfg)
    trainer.train()
    assert len(clock.generate) == cfg.max_steps, "TRL sampled other than once per step"
    return {"seconds": [end - begin for begin, end in zip(clock.begin, clock.end)], "lengths": clock.lengths,
            "zero_signal": clock.zero_signal, "phases": {"generate": clock.generate}}


def check_same_prompts(trainer, tokenizer, row, record, cfg):
    """TRL's student (and teacher) prompt ids for its first row must equal ours for the same record,
    or the two sides do different work."""
    import contexts
    question = record["question"]
    ours = [contexts.student_prompt_ids(tokenizer, question, cfg.prompts)]
    if cfg.arm == "grpo":
        theirs = [list(trainer._tokenize_prompts([row["prompt"]])[0][0])]
    else:
        ours.append(contexts.teacher_prompt_ids(tokenizer, question, record["solution"], "reference",
                                                cfg.prompts, max_context_tokens=cfg.max_context_tokens))
        teacher_prompt = trainer.teacher_context_builder.select_generation_prompts(
            [row["prompt"]], [row["privileged_context"]])[0]
        theirs = [list(trainer._tokenize_prompts([row["prompt"]])[0]),
                  list(trainer._tokenize_prompts([teacher_prompt])[0])]
    assert theirs == ours, f"TRL's prompt ids differ from ours:\n{theirs}\n{ours}"


def step_clock():
    """A TrainerCallback (transformers is imported only inside the side's process)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time of each optimizer step; the mean completion length and the share of groups with
        equal rewards that TRL logs for it."""
        def __init__(self):
            self.begin, self.end, self.lengths, self.zero_signal, self.generate = [], [], [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])
                self.zero_signal.append(logs.get("frac_reward_zero_std", 0.0))
    return Clock()


# ---------------------------------------------------------------------------------------------
# The driver: build the shape, alternate the two sides under a memory cap, then summarise.

def run_side(side, python, args, seed):
    """One run in a subprocess; killed when its resident set passes the cap. Returns its RESULT,
    or {"over_cap": GiB} when it was killed."""
    command = [python, os.path.abspath(__file__), "--side", side, "--seed", str(seed), "--arm", args.arm,
               "--shape", args.shape, "--world", args.world or "", "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--micro-batch", str(args.micro_batch),
               "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
               "--reward", args.reward]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        peak = 0.0
        while process.poll() is None:
            try:
                with open(f"/proc/{process.pid}/status") as f:
                    rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 2**20
            except (OSError, StopIteration):  # the process ended between poll() and open()
                rss = 0.0
            peak = max(peak, rss)
            if rss > args.memory_cap_gib:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return {"over_cap": peak}
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        sys.exit(stderr.strip().splitlines()[-1] if stderr.strip()
                 else f"error: the {side} run failed (exit {process.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(name, runs, rows_per_step):
    """Per run: median s/step, peak RSS, mean response length and generated tokens/s over the kept
    steps. Returns the medians over runs of s/step, tokens/s and peak RSS."""
    medians, lengths, rates, peaks, flat = [], [], [], [], []
    phases = {k: statistics.median(x for run in runs for x in run["phases"][k][1:]) for k in runs[0]["phases"]}
    for run in runs:
        seconds, length = run["seconds"][1:], run["lengths"][1:]  # step 1 is warm-up
        medians.append(statistics.median(seconds))
        lengths.append(statistics.mean(length))
        rates.append(sum(length) * rows_per_step / sum(seconds))
        peaks.append(run["peak_rss_gib"])
        flat.append(statistics.mean(run["zero_signal"][1:]))
    median, peak = statistics.median(medians), statistics.median(peaks)
    print(f"{name:>4}: median {median:.3f} s/step (runs {min(medians):.3f}-{max(medians):.3f}: "
          + ", ".join(f"{m:.3f}" for m in medians) + f") | peak RSS median {peak:.2f} GiB (runs "
          f"{min(peaks):.2f}-{max(peaks):.2f}) | mean response {statistics.mean(lengths):.1f} tokens | "
          f"{statistics.median(rates):.0f} generated tokens per step-second | zero_signal "
          f"{statistics.mean(flat):.2f}\n      median s/step by phase: "
          + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    return median, statistics.median(rates), peak, lengths


def check_args(parser, args):
    """Defaults that depend on the shape, and settings that cannot work; errors name the flag."""
    if args.max_new_tokens == 0:
        args.max_new_tokens = 256 if args.shape == "qwen3" else 64
    args.reward = args.reward or ("parity" if args.shape == "qwen3" else "answer")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    rows = args.batch_size * (G if args.arm == "grpo" else 1)
    if args.batch_size < 1 or args.micro_batch < 0 or (args.micro_batch and rows % args.micro_batch):
        parser.error(f"--micro-batch must divide the step's {rows} sequences (--batch-size x "
                     f"{G if args.arm == 'grpo' else 1})")
    args.micro_batch = args.micro_batch or rows
    if args.shape == "qwen3" and args.reward == "answer" and args.arm == "grpo":
        parser.error("--reward answer is 0 for every random-weight sample: ours would skip all of "
                     "them, TRL would not; use --reward parity at --shape qwen3")
    if args.shape == "toy" and args.prompt_tokens:
        parser.error("--prompt-tokens applies to --shape qwen3 (the toy's questions are fixed)")
    args.prompt_tokens = args.prompt_tokens or 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-python", default=sys.executable,
                        help="interpreter of the venv with trl installed (see the docstring)")
    parser.add_argument("--arm", choices=["reference", "grpo"], default="reference",
                        help="reference: self-distillation vs SDFTTrainer; grpo: vs GRPOTrainer")
    parser.add_argument("--shape", choices=["toy", "qwen3"], default="toy",
                        help="toy world, or a small random Qwen3 with Qwen3's 151,936-entry vocabulary")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is dropped")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per step")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="sequences per forward/backward, both sides (0 = all of a step's)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = 64 (toy), 256 (qwen3, forced)")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="qwen3: student prompt length (0 = 128)")
    parser.add_argument("--reward", choices=["answer", "parity"], default="",
                        help="grpo reward: answer (critic.reward; toy default) | parity (qwen3 default)")
    parser.add_argument("--memory-cap-gib", type=float, default=10.0,
                        help="kill a side whose resident set passes this many GiB")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_args(parser, args)
    if args.side:  # one run, in this process
        with tempfile.TemporaryDirectory() as out_dir:
            result = (run_ours if args.side == "ours" else run_trl)(args, out_dir)
        print("RESULT " + json.dumps({**result, "peak_rss_gib": peak_rss_gib()}))
        return
    check = subprocess.run([args.peer_python, "-c", "import trl"], capture_output=True)
    if check.returncode != 0:
        sys.exit(f"error: trl is not importable by {args.peer_python}; install the peer: {INSTALL}")
    with tempfile.TemporaryDirectory() as world:
        if args.shape == "qwen3":
            args.world = world
            build_qwen3_world(world, args.steps * args.batch_size, args.prompt_tokens, args.max_new_tokens)
        compare(args)


def compare(args):
    start, runs = time.time(), {"ours": [], "trl": []}
    rows = args.batch_size * (G if args.arm == "grpo" else 1)
    for repeat in range(args.repeats):
        for side, python in (("ours", sys.executable), ("trl", args.peer_python)):
            result = run_side(side, python, args, seed=repeat)
            if "over_cap" in result:
                print(f"repeat {repeat + 1}/{args.repeats} {side}: killed, resident set passed "
                      f"--memory-cap-gib {args.memory_cap_gib:g} ({result['over_cap']:.2f} GiB seen)")
                print(f"{side} cannot run this setting under {args.memory_cap_gib:g} GiB: peer_ratio=n/a "
                      f"peer_memory_ratio=n/a")
                return
            runs[side].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {side}: s/step "
                  + " ".join(f"{s:.2f}" for s in result["seconds"]) + f" | peak RSS {result['peak_rss_gib']:.2f} GiB",
                  flush=True)
    shape = "toy" if args.shape == "toy" else (f"qwen3 shape (V={QWEN3_VOCAB}, " + ", ".join(
        f"{k}={v}" for k, v in QWEN3_BODY.items()) + f"), prompts {args.prompt_tokens} tokens")
    print(f"{args.arm}, {shape}: {args.repeats} runs per side, {args.steps - 1} timed steps each (step 1 "
          f"dropped), {args.batch_size} questions x {rows // args.batch_size} samples, micro-batch "
          f"{args.micro_batch}, <= {args.max_new_tokens} new tokens, reward={args.reward if args.arm == 'grpo' else '-'}, "
          f"threads={args.threads}, {time.time() - start:.0f} s in all")
    ours, ours_rate, ours_peak, ours_lengths = summarise("ours", runs["ours"], rows)
    trl, trl_rate, trl_peak, trl_lengths = summarise("trl", runs["trl"], rows)
    if args.shape == "qwen3":  # the forced length held on both sides
        assert set(ours_lengths) == set(trl_lengths) == {args.max_new_tokens}, (ours_lengths, trl_lengths)
    print(f"peer_ratio={ours / trl:.3f} peer_memory_ratio={ours_peak / trl_peak:.3f} "
          f"tokens_per_s_ratio={ours_rate / trl_rate:.3f}")


if __name__ == "__main__":
    main()
