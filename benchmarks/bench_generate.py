"""Does sampling get faster than a plain `generate`? Three ways to draw the same rollouts from the
toy world's base model (with its fresh LoRA adapter, as in training), timed in rotating order:

  dynamic  `model.generate` with the default dynamic KV cache (HF's loop; sampler.generate runs its
           own, `sampler.decode`, whose effect on a whole evaluation benchmarks/bench_eval.py measures)
  static   the same call with `cache_implementation="static"` (a preallocated cache; what
           sampler.generate does with static_cache=True, as the toy build samples)
  loop     a hand-written decoding loop: one forward per token on the dynamic cache, multinomial
           sampling at T = 1, no logits processors or stopping criteria; EOS is ignored

Every way generates exactly --new-tokens tokens per row (`min_new_tokens` for the first two), so
all do the same amount of work. Reported: generated tokens per second, median [min–max] over
--repeats rounds, per batch size.

    python benchmarks/bench_generate.py                       # 32 and 256 rows, 64 new tokens
    python benchmarks/bench_generate.py --rows 1024 --repeats 5
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import common  # noqa: E402
import contexts  # noqa: E402
from plumbing import sampler  # noqa: E402
import selfdistill  # noqa: E402
from toyworld import toy_build  # noqa: E402


def hand_loop(model, rows, new_tokens):
    """Prefill, then one cached forward per token; positions continue each row's own count."""
    from transformers import DynamicCache
    attention_mask = rows["attention_mask"]
    position_ids = rows["position_ids"]
    out = model(input_ids=rows["input_ids"], attention_mask=attention_mask, position_ids=position_ids,
                cache=DynamicCache(), use_cache=True)
    position = position_ids[:, -1:]  # (B, 1)
    for i in range(new_tokens):
        next_ids = torch.multinomial(out.logits[:, -1].float().softmax(-1), 1)  # (B, 1)
        if i == new_tokens - 1:
            return
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)
        position = position + 1
        out = model(input_ids=next_ids, attention_mask=attention_mask, position_ids=position,
                    cache=out.cache, use_cache=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 256], help="batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    cfg = selfdistill.load_config([f"threads={args.threads}"])  # sampling settings: the run's defaults
    device = common.pick_device(cfg)
    built = toy_build.ensure_built()
    model, tokenizer = common.load_model(cfg, built["model_dir"], device)
    model.eval()
    questions = [r["question"] for r in common.load_jsonl(built["test"])]
    stop = sampler.eos_ids(model, tokenizer)
    print(f"{time.strftime('%Y-%m-%d')} | torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"| toy model + LoRA | {args.new_tokens} new tokens per row")
    for n in args.rows:
        prompts = [contexts.student_prompt_ids(tokenizer, questions[i % len(questions)], "toy")
                   for i in range(n)]
        rows = contexts.build_rows(prompts, [[] for _ in prompts], tokenizer.pad_token_id)
        settings = (tokenizer, stop, args.new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
        dynamic = sampler.sampling_config(*settings)
        dynamic.min_new_tokens = args.new_tokens  # no early stop: every way does the same work
        static = sampler.sampling_config(*settings, static_cache=True)
        static.min_new_tokens = args.new_tokens
        ways = {
            "dynamic": lambda: model.generate(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                                              generation_config=dynamic),
            "static": lambda: model.generate(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                                             generation_config=static),
            "loop": lambda: hand_loop(model, rows, args.new_tokens),
        }
        names, rates = list(ways), {name: [] for name in ways}
        with torch.no_grad():
            for name in names:  # warm-up round, not reported
                ways[name]()
            for r in range(args.repeats):
                for name in names[r % 3:] + names[:r % 3]:  # rotate the order
                    start = time.perf_counter()
                    ways[name]()
                    rates[name].append(n * args.new_tokens / (time.perf_counter() - start))
        print(f"{n} rows: " + " | ".join(
            f"{name} {statistics.median(v):.0f} tok/s [{min(v):.0f}–{max(v):.0f}]" for name, v in rates.items()))


if __name__ == "__main__":
    main()
