"""Data preparation: OpenMathReasoning records (`problem`, `generated_solution`, `expected_answer`;
JSONL, or parquet with pyarrow) → the project's JSONL (`question`, `answer`, `solution`), kept by the
paper's filter: the solver's Avg@16 below 5/16, a wrong rollout in step format, and a valid critique
from the critic that reaches the expected answer. Writes OUT/train.jsonl, OUT/test.jsonl and
OUT/prepare.json (the counts of what was dropped, and why: records without the fields as text,
problems too long for the model's context with max_new_tokens, too easy, no wrong stepped rollout,
critic failed).

A folder of parquet/JSONL shards or a dataset name is read through Hugging Face `datasets`
(requirements-data.txt), with --split, --streaming and --limit; --question-column, --answer-column and
--solution-column map other column names onto these fields.

Commands:
    python prepare.py omr.jsonl Qwen/Qwen3-1.7B critic=http critic_url=http://127.0.0.1:8000/v1 \\
        critic_model=Qwen/QwQ-32B --out data/omr --test-size 30
    python prepare.py data/omr_shards/ Qwen/Qwen3-1.7B --split cot --streaming --limit 20000 ...
    python prepare.py nvidia/OpenMathReasoning Qwen/Qwen3-1.7B --split cot --streaming --limit 20000 ...
"""
import argparse
import json
import math
import os
import random
import sys
from collections import Counter

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds, nothing written yet): exit 130, no traceback
    import signal
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import torch

import common
import contexts
import critic
import sampler
import world
from common import UserError
from eval import sample_answers, target_config

# ---------------------------------------------------------------------------------------------
# OpenMathReasoning records → our JSONL, with the paper's difficulty filter.


SHARD_KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}  # datasets' builder per ending
OMR_FIELDS = ("problem", "generated_solution", "expected_answer")


def read_openmath(path, split="train", streaming=False, limit=0, columns=None):
    """Records with problem, generated_solution, expected_answer, and the Counter of records skipped
    by why (record_problem). `path`: a JSONL or parquet file (read here, as before), or through
    Hugging Face `datasets` a folder of parquet/JSONL shards or a dataset name (its `split`;
    `streaming` reads record by record, for OpenMathReasoning's size, up to `limit` records, 0 =
    all). `columns` maps our three field names to the input's column names."""
    if os.path.isdir(path) or not os.path.exists(path) and "/" in path and not path.endswith(tuple(SHARD_KINDS)):
        rows = read_with_datasets(path, split, streaming, limit)
    elif not os.path.isfile(path):
        raise UserError(f"input file {path} not found")
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet
        except ImportError:
            raise UserError("reading parquet needs pyarrow (pip install pyarrow), or give a JSONL file") from None
        rows = pyarrow.parquet.read_table(path).to_pylist()
    else:
        rows = []
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); give JSONL or parquet") from None
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    rows = rows[:limit] if limit else rows
    if columns:  # the input's column names → the OpenMathReasoning fields record_problem reads
        rows = [{**r, **{ours: r.get(theirs) for ours, theirs in columns.items()}} if isinstance(r, dict) else r
                for r in rows]
    skipped, records = Counter(), []
    for i, r in enumerate(rows):
        why = record_problem(r)
        if why:
            skipped[why] += 1
            continue
        records.append({"id": r.get("id", i), "question": r["problem"], "answer": str(r["expected_answer"]),
                        "solution": r["generated_solution"]})
    if not records:
        raise UserError(f"none of the {len(rows)} records of {path} has problem, generated_solution and "
                        f"expected_answer (the OpenMathReasoning fields) as text")
    if skipped:
        print(f"warning: {path}: {sum(skipped.values())} records skipped (" +
              ", ".join(f"{why} {n}" for why, n in skipped.items()) + ")", file=sys.stderr)
    return records, skipped


def read_with_datasets(path, split, streaming, limit):
    """Rows of a folder of shards (all of one kind: parquet or JSONL) or of a dataset name, through
    `datasets` (requirements-data.txt): it reads parquet and JSONL shards, a hub dataset's cache and
    streams what does not fit in memory, which a reader of our own would not."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {path} (a folder of shards or a dataset name) needs Hugging Face datasets: "
                        f"pip install -r requirements-data.txt; or give one JSONL or parquet file") from None
    if os.path.isdir(path):
        shards = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(tuple(SHARD_KINDS)))
        kinds = {SHARD_KINDS[os.path.splitext(n)[1]] for n in shards}
        if not shards:
            raise UserError(f"{path} holds no .parquet or .jsonl shards")
        if len(kinds) > 1:
            raise UserError(f"{path} mixes parquet and JSONL shards; give a folder of one kind")
        source, files = kinds.pop(), shards
    else:
        source, files = path, None
    datasets.disable_progress_bars()
    try:
        data = datasets.load_dataset(source, data_files=files, split=split, streaming=streaming)
    except ValueError as e:  # e.g. an unknown split: datasets names the ones there are
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from None
    except (OSError, ConnectionError, FileNotFoundError) as e:  # no such dataset, or no network for it
        raise UserError(f"{path} cannot be read with datasets ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    rows = []
    for row in data:  # streaming: record by record, stopping at the limit
        rows.append(dict(row))
        if limit and len(rows) >= limit:
            break
    return rows


def record_problem(record):
    """Why an input record cannot be used (a count's name in prepare.json), or None."""
    if not isinstance(record, dict):
        return "not_an_object"
    if any(record.get(k) in (None, "") for k in ("problem", "generated_solution", "expected_answer")):
        return "missing_fields"
    answer = record["expected_answer"]
    if not isinstance(record["problem"], str) or not isinstance(record["generated_solution"], str) or \
            isinstance(answer, bool) or not isinstance(answer, (str, int)):
        return "fields_not_text"  # a number or a list as the problem, a list or a decimal as the answer
    if not record["problem"].strip() or critic.normalize_answer(str(answer)) == "":
        return "missing_fields"
    return None


def prepare(input_path, overrides=(), out="data/omr", test_size=30, samples=16, max_correct=4, seed=0,
            read=None):
    """Keep the problems the paper kept: the solver's Avg@16 below 5/16 (at most `max_correct` of
    `samples` right), a wrong rollout in well-formed steps, and a critic that, given it, writes a
    valid critique reaching the expected answer. Writes OUT/train.jsonl, OUT/test.jsonl, OUT/prepare.json."""
    if test_size < 0:
        raise UserError(f"--test-size must be at least 0, got {test_size}")
    records, skipped = read_openmath(input_path, **(read or {}))  # read: read_openmath's options
    cfg, _ = target_config(overrides[0] if overrides else "toy", overrides[1:])
    device = common.pick_device(cfg)
    judge = world.make_judge(cfg, device, records)  # the rule critic reads toy chains only: one line
    model, tokenizer = common.load_model(cfg, world.resolve_paths(cfg)[0], device)
    counts = Counter(input=len(records) + sum(skipped.values()), **skipped)
    limit = getattr(model.config, "max_position_embeddings", None) or math.inf
    fits = [len(contexts.student_prompt_ids(tokenizer, r["question"], cfg.prompts, cfg.student_thinking))
            + cfg.max_new_tokens <= limit for r in records]
    if not all(fits):  # longer than the model's context with max_new_tokens: counted, not sampled
        counts["too_long"] = fits.count(False)
        print(f"warning: {counts['too_long']} problems do not fit the model's context of {limit} tokens "
              f"with max_new_tokens={cfg.max_new_tokens}; skipped", file=sys.stderr)
        records = [r for r, fit in zip(records, fits) if fit]
        if not records:
            raise UserError(f"no problem of {input_path} fits the model's context of {limit} tokens")
    torch.manual_seed(seed)
    kept = []
    for record, (answers, correct, *_) in zip(records, sample_answers(
            model, tokenizer, cfg, device, records, samples, cfg.temperature, "solver Avg@16")):
        if sum(correct) > max_correct:
            counts["too_easy"] += 1
            continue
        # a wrong rollout in the step format, critiqued by the critic (greedy: one call suffices)
        prompt = contexts.student_prompt_ids(tokenizer, record["question"], cfg.prompts, cfg.student_thinking)
        ids, _ = sampler.generate(model, tokenizer, [prompt] * 4, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                 cfg.top_k, cfg.generation_batch)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        wrong = [t for t in texts if critic.reward(t, record["answer"], world.exact_answers(cfg)) == 0
                 and contexts.STEP_TAG.search(t)]
        if not wrong:
            counts["no_wrong_stepped_rollout"] += 1
            continue
        critique = judge([record["question"]], wrong[:1], [record["solution"]], [record["answer"]])[0]
        if critique is None or not critic.validate_critique(wrong[0], critique, record["answer"])[0]:
            counts["critic_failed"] += 1
            continue
        kept.append(record)
    random.Random(seed).shuffle(kept)
    test, train = kept[:test_size], kept[test_size:]
    os.makedirs(out, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    counts.update(kept=len(kept), train=len(train), test=len(test))
    with open(os.path.join(out, "prepare.json"), "w") as f:
        json.dump({"input": input_path, "seed": seed, "samples": samples, "max_correct": max_correct,
                   "counts": dict(counts)}, f, indent=1)
    print(", ".join(f"{k} {v}" for k, v in counts.items()) + f"; wrote {out}/train.jsonl, test.jsonl")
    return dict(counts)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert and filter OpenMathReasoning records into train/test JSONL.",
        epilog=__doc__[__doc__.index("Commands:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="INPUT [MODEL] [key=value ...]",
                        help="OpenMathReasoning records (.jsonl or .parquet), the solver (a model folder "
                        "or hub id; default the toy world's), config overrides (the critic)")
    parser.add_argument("--out", default="data/omr", help="output folder (default %(default)s)")
    parser.add_argument("--test-size", type=int, default=30, help="test problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and split")
    parser.add_argument("--split", default="train", help="a folder of shards or a dataset name: the split "
                        "(default %(default)s)")
    parser.add_argument("--streaming", action="store_true", help="read record by record (datasets' "
                        "streaming), for data larger than memory; with --limit")
    parser.add_argument("--limit", type=int, default=0, help="read at most this many records (0 = all)")
    for field, default in zip(("question", "solution", "answer"), OMR_FIELDS):
        parser.add_argument(f"--{field}-column", default=default, help=f"the input's column of the {field} "
                            f"(default %(default)s)")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    common.default_signals()  # Ctrl-C: one line (user_errors)
    with common.user_errors():
        if args.limit < 0:
            raise UserError(f"--limit must be at least 0 (0 = all), got {args.limit}")
        columns = dict(zip(OMR_FIELDS, (args.question_column, args.solution_column, args.answer_column)))
        read = {"split": args.split, "streaming": args.streaming, "limit": args.limit,
                "columns": {k: v for k, v in columns.items() if k != v} or None}
        prepare(args.paths[0], args.paths[1:], args.out, args.test_size, seed=args.seed, read=read)


if __name__ == "__main__":
    main()
