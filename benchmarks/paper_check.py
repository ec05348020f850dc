"""The paper's pipeline, first run on a GPU: every program of the README's "Reproduce the paper"
block, in order, at the paper's shapes, with the seconds and peak memory of each phase.

No download (a lent GPU machine reaches no hub): the student has Qwen3-1.7B's shapes and the local
critic Qwen3-4B's (configs/qwen3-1.7b-local-critic.yaml), both with random weights and a local
tokenizer of Qwen3's 151,936-entry vocabulary; the data are OpenMathReasoning-shaped parquet shards
made here. Phases:
  build      the two models, the shards, the config (the local-critic config, pointed at them)
  prepare    prepare.py SHARDS --split cot --config CONFIG --limit 3: the filter (16 samples of one
             problem) at the config's settings, the student and the critic loaded together (a random
             solver writes no steps: the counts say so, and the arms below train on the shards'
             problems unfiltered)
  critic     the local critic alone: critic_batch critiques of a 2,048-token rollout, to its budget
  ARM        selfdistill.py --context ARM --config CONFIG, --steps steps (grpo at batch_size 2 × G 8
             with grpo_beta 0.04, so that its loss runs although a random model earns no reward;
             the critique arm's critic is a local server that thinks before a valid critique, so
             the teacher sees critique-shaped contexts; the local critic's own cost is `critic`)
  eval       eval.py on the critique run (one test question, steps 0 and the last)
Writes OUT/report.json and prints one line per phase: seconds, peak GPU memory (GiB; on the CPU
twin the process's peak RSS so far).

    bash benchmarks/gpu_check.sh                   # the GPU run (about 10 minutes, by estimate)
    python benchmarks/paper_check.py --twin        # its CPU twin: tiny shapes, same script (CI)
"""
import argparse
import json
import os
import re
import resource
import shutil
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128)  # from Qwen3-1.7B's published config.json
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128)  # from Qwen3-4B's
TWIN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32)  # the CPU twin: Qwen3's vocabulary, a body that loads in a blink
ARMS = ("grpo", "reference", "critique")


# ---------------------------------------------------------------------------------------------
# OpenMathReasoning-shaped data, and a critic server that thinks first.


def omr_row(problem, answer, solution, problem_type="has_answer_extracted", pass_rate="0.25"):
    """One record with OMR's columns and types (pass_rate_72b_tir is text in OMR: "n/a" or a number)."""
    return {"expected_answer": answer, "problem_type": problem_type, "problem_source": "aops_c4",
            "generation_model": "DeepSeek-R1", "pass_rate_72b_tir": pass_rate, "problem": problem,
            "generated_solution": solution, "inference_mode": "cot", "used_in_kaggle": False}


def write_shards(folder, problems, filler="", solutions=3):
    """`problems` gradable problems × `solutions` solutions in two cot shards (plus a tir shard that
    --split cot must not read); `filler` lengthens each question and solution."""
    import pyarrow
    import pyarrow.parquet
    rows = [omr_row(f"What is {10 + i} plus {20 + i}? {filler}", str(30 + 2 * i),
                    f"{filler} {10 + i}+{20 + i}=\\boxed{{{30 + 2 * i}}}" + " checked" * k)
            for i in range(problems) for k in range(solutions)]
    os.makedirs(folder, exist_ok=True)
    half = len(rows) // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(part), os.path.join(folder, f"cot-0000{k}-of-00002.parquet"))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([omr_row("What is 1 plus 1?", "2", "\\boxed{2}")]),
                                os.path.join(folder, "tir-00000-of-00001.parquet"))
    return folder


class ThinkingCritic:
    """An OpenAI-compatible critic on 127.0.0.1 that thinks before its critique, as QwQ does: it reads
    the gold answer from the critic's instruction and answers `<think>…</think>` + a one-step fix
    that validation accepts. For the gold answer `cut`, it runs out of tokens inside <think>
    (finish_reason "length"). `max_tokens` holds every request's budget."""

    def __init__(self, cut=None):
        self.max_tokens = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply({"data": [{"id": "critic-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.max_tokens.append(body["max_tokens"])
                gold = re.search(r"Correct final answer: (\S+)", body["messages"][0]["content"]).group(1)
                if gold == cut:
                    choice = {"message": {"content": "<think>Let me check every step " * 20},
                              "finish_reason": "length"}
                else:
                    choice = {"message": {"content": f"<think>The sum is {gold}.</think>\n<step_1> the sum "
                                                     f"is {gold} <answer> {gold}"}, "finish_reason": "stop"}
                self.reply({"choices": [choice]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# The phases.


def build_model(folder, body, device, dtype):
    """A Qwen3 causal LM with `body`'s shapes, Qwen3's vocabulary and random weights, made on
    `device` (seconds on a GPU, not minutes) and saved in `dtype` with the local tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    from bench_peer import QWEN3_VOCAB, qwen3_tokenizer
    tokenizer = qwen3_tokenizer()
    config = Qwen3Config(vocab_size=QWEN3_VOCAB, tie_word_embeddings=True, max_position_embeddings=40960,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, rope_theta=1_000_000, **body)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def write_config(path, base, student, critic_model, data, args):
    """The local-critic config with the models and data pointed here; the check's sizes last."""
    import yaml
    with open(base) as f:
        config = yaml.safe_load(f)
    config.update(model=student, critic_model=critic_model, train_file=f"{data}/train.jsonl",
                  test_file=f"{data}/test.jsonl", critic_max_new_tokens=args.critic_tokens,
                  batch_size=args.batch_size, checkpoint_every=args.steps, eval_samples=2)
    if args.twin:
        config.update(dtype="float32", max_new_tokens=16, max_context_tokens=64, micro_batch=4,
                      generation_batch=32, device="cpu", threads=1, batch_size=4, gradient_checkpointing=False)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return config


def unfiltered_data(shards, data):
    """The shards' problems as train/test files: a random solver writes no steps, so prepare keeps
    none, and the arms need something to train on (a check of time and memory, not of learning)."""
    import prepare
    records, _ = prepare.read_openmath(shards, split="cot")
    problems = prepare.group_problems(records, Counter())
    os.makedirs(data, exist_ok=True)
    for name, part in (("train", problems[2:]), ("test", problems[:2])):
        with open(os.path.join(data, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps({k: p[k] for k in ("id", "question", "answer", "solution")}) + "\n"
                         for p in part)


def critic_alone(config, device):
    """The local critic's worst case: critic_batch critiques of a max_new_tokens-long rollout."""
    import critic
    from bench_peer import qwen3_tokenizer
    judge = critic.HFCritic(config["critic_model"], device=device, dtype=config["dtype"],
                            max_new_tokens=config["critic_max_new_tokens"], batch_size=config["critic_batch"])
    words = " ".join(f"w{i}" for i in range(config["max_new_tokens"]))  # one token each
    n = config["critic_batch"]
    out = judge(["What is 10 plus 20?"] * n, [words] * n, [words[:2000]] * n, ["30"] * n)
    assert len(qwen3_tokenizer()(words)["input_ids"]) == config["max_new_tokens"]
    return {"critiques": n, "truncated": sum(isinstance(c, critic.Failure) for c in out)}


class Phases:
    """Seconds and peak memory of each phase (GPU: max allocated since the phase began)."""

    def __init__(self, device):
        self.device, self.rows = device, []

    def __call__(self, name, fn, *args):
        import torch
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        detail = fn(*args)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        row = {"phase": name, "seconds": round(seconds, 1), "peak_gib": round(peak, 2), **(detail or {})}
        self.rows.append(row)
        print(f"{name:<10} {seconds:8.1f} s  peak {peak:6.2f} GiB  " +
              " ".join(f"{k}={v}" for k, v in (detail or {}).items()), flush=True)
        return detail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__[__doc__.index("Phases:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--twin", action="store_true", help="the CPU twin: tiny shapes, same script")
    parser.add_argument("--out", default="runs/paper_check", help="working folder and report.json")
    parser.add_argument("--problems", type=int, default=8, help="OMR-shaped problems (× 3 solutions)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per arm")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per step of the self-distillation "
                        "arms (the paper: 32, twice the time; grpo runs 2 × G 8)")
    parser.add_argument("--critic-tokens", type=int, default=512, help="critic_max_new_tokens for the check "
                        "(QwQ's real budget is 16,384: a random critic would use all of it)")
    args = parser.parse_args(argv)
    import torch
    from plumbing import common
    if not args.twin and not torch.cuda.is_available():
        with common.user_errors():
            raise common.UserError("device=cuda but no CUDA device is available; use device=cpu")
    import eval as ev
    import prepare
    import selfdistill
    root = os.path.abspath(args.out)
    shutil.rmtree(root, ignore_errors=True)
    device, dtype = ("cpu", "float32") if args.twin else ("cuda", "bfloat16")
    student, critic_dir, shards, data = (os.path.join(root, n) for n in ("student", "critic", "omr", "data"))
    phases, server = Phases(device), ThinkingCritic()
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "qwen3-1.7b-local-critic.yaml")
    config_path = os.path.join(root, "paper.yaml")

    def build():
        build_model(student, TWIN if args.twin else QWEN3_1_7B, device, dtype)
        build_model(critic_dir, TWIN if args.twin else QWEN3_4B, device, dtype)
        write_shards(shards, args.problems, filler=" ".join(f"w{i}" for i in range(8 if args.twin else 150)))
        write_config(config_path, base, student, critic_dir, data, args)
    phases("build", build)
    with open(config_path) as f:
        import yaml
        config = yaml.safe_load(f)

    def run_prepare():
        prepare.main([shards, "--split", "cot", "--config", config_path, "--out", os.path.join(root, "filtered"),
                      "--test-size", "2", "--limit", "3"])  # one problem's 3 solutions: 16 samples
        with open(os.path.join(root, "filtered", "prepare.json")) as f:
            counts = json.load(f)["counts"]
        return {k: v for k, v in counts.items() if v and k in ("problems", "kept", "no_wrong_stepped_rollout",
                                                                 "too_easy", "too_long")}
    phases("prepare", run_prepare)
    phases("critic", critic_alone, config, device)
    unfiltered_data(shards, data)
    runs = os.path.join(root, "runs")
    for arm in ARMS:
        extra = {"grpo": ["batch_size=2", "grpo_beta=0.04"], "reference": [],
                 "critique": ["critic=http", f"critic_url={server.url}", "critic_model=critic-model"]}[arm]
        phases(arm, lambda a=arm, e=extra: selfdistill.main(
            ["--context", a, "--config", config_path, f"max_steps={args.steps}", "eval_at_end=false",
             f"out_dir={runs}", *e]))
    phases("eval", lambda: ev.main([os.path.join(runs, "critique-s0"), "--questions", "1"]))
    server.close()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "twin": args.twin,
              "args": vars(args), "phases": phases.rows}
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {os.path.join(root, 'report.json')}")


if __name__ == "__main__":
    main()
