"""Data preparation: OpenMathReasoning (OMR) records → the project's JSONL (`question`, `answer`,
`solution`), kept by the paper's filter at the training config's own settings.

OMR holds about ten generated solutions per problem. The steps, each counted in OUT/prepare.json:
 1. read the records (`problem`, `generated_solution`, `expected_answer`; optional `problem_type`,
    `pass_rate_72b_tir`); a record without them as text is counted and skipped;
 2. one problem per question (whitespace-normalised text); its reference is the shortest of its
    solutions whose final answer matches the expected answer (else the shortest): the most compact
    derivation, so that fewer references lose their middle to `max_context_tokens`; a problem
    whose records disagree on the answer is dropped (`conflicting_answers`);
 3. cheap pre-filters on OMR's columns, before any sampling: `--problem-type` (default: OMR's
    `has_answer_extracted` when the column is there; proofs and problems without an extracted
    answer cannot be graded) and `--max-pass-rate` on `pass_rate_72b_tir`;
 4. the paper's filter, problem by problem in a seeded order until `--max-kept` are kept: the
    solver's Avg@16 below 5/16 (`too_easy`), one of those 16 samples wrong and in step format
    (`no_wrong_stepped_rollout`), and the critic's critique of it valid at the config's
    `critique_validation` (dropped as `critic/REASON`: critique_truncated, wrong_answer, ...);
 5. the split by problem: a test problem is never in train (checked before writing).

The sampling and the critic run at the config's settings (`--config`: the model, dtype, lengths,
temperature, critic and its budget), the same values training uses; prepare.json records them and
training warns when its config samples otherwise (common.check_data_settings).

Commands:
    python prepare.py omr_shards/ --split cot --config configs/qwen3-1.7b.yaml --max-kept 312
    python prepare.py omr.jsonl --config configs/qwen3-1.7b.yaml --test-size 30 critic_timeout=1800
    python prepare.py nvidia/OpenMathReasoning --split cot --streaming --limit 20000 --config ...
"""
import argparse
import json
import os
import random
import socket
import sys
import unicodedata
from collections import Counter

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds, nothing written yet): exit 130, no traceback
    import signal
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import torch

from plumbing import common
import contexts
import critic
from plumbing import options
from plumbing import runfolder
import selfdistill
from toyworld import world
from plumbing.common import UserError
from eval import sample_answers

# ---------------------------------------------------------------------------------------------
# Reading OpenMathReasoning records.

SHARD_KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}  # datasets' builder per ending
OMR_FIELDS = ("problem", "generated_solution", "expected_answer")
HAS_ANSWER = "has_answer_extracted"  # OMR's problem_type of the problems that can be graded


def read_openmath(path, split="train", streaming=False, limit=0, columns=None):
    """Records with id, question, answer, solution (and problem_type, pass_rate when the input has
    OMR's columns), and the Counter of records skipped by why (record_problem). `path`: a JSONL or
    parquet file, or through Hugging Face `datasets` a folder of parquet/JSONL shards or a dataset
    name (its `split`; `streaming` for a dataset too large for memory; `limit` records at most,
    0 = all). `columns` maps our three field names to the input's column names."""
    if os.path.isdir(path) or not os.path.exists(path) and "/" in path and not path.endswith(tuple(SHARD_KINDS)):
        rows = read_with_datasets(path, split, streaming, limit)
    elif not os.path.isfile(path):
        raise UserError(f"input file {path} not found")
    elif path.endswith(".parquet"):
        rows = read_parquet(path)
    else:
        rows = read_jsonl_rows(path)
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
        record = {"id": r.get("id", i), "question": r["problem"], "answer": str(r["expected_answer"]),
                  "solution": r["generated_solution"]}
        for ours, theirs in (("problem_type", "problem_type"), ("pass_rate", "pass_rate_72b_tir")):
            if theirs in r:
                record[ours] = r[theirs]
        records.append(record)
    if not records:
        raise UserError(f"none of the {len(rows)} records of {path} has problem, generated_solution and "
                        f"expected_answer (the OpenMathReasoning fields) as text")
    if skipped:
        print(f"warning: {path}: {sum(skipped.values())} records skipped (" +
              ", ".join(f"{why} {n}" for why, n in skipped.items()) + ")", file=sys.stderr)
    return records, skipped


def read_parquet(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise UserError("reading parquet needs pyarrow (pip install pyarrow), or give a JSONL file") from None
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: not a parquet file
        raise UserError(f"{path} cannot be read as parquet ({first_line(e)})") from None


def read_jsonl_rows(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); give JSONL or parquet") from None
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def first_line(error):
    text = " ".join(str(error).split("\n")[0].split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def shard_files(path, split):
    """A folder's shards for `split`: the files named by it (OMR's `cot-00000-of-00144.parquet`,
    or a subfolder `cot/`), else, for split `train`, every shard (a folder of one split)."""
    def shards(folder):
        return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(tuple(SHARD_KINDS)))
    every = shards(path)
    named = [f for f in every if os.path.basename(f).split(".")[0].split("-")[0].split("_")[0] == split]
    if not named and os.path.isdir(os.path.join(path, split)):
        named = shards(os.path.join(path, split))
    if named or split == "train":
        files = named or every
    else:
        prefixes = sorted({os.path.basename(f).split("-")[0] for f in every})
        raise UserError(f"{path} has no shards of split '{split}' (files named {split}-*.parquet or a folder "
                        f"{split}/); its files start with: {', '.join(prefixes) or 'nothing'}")
    if not files:
        raise UserError(f"{path} holds no .parquet or .jsonl shards")
    if len({SHARD_KINDS[os.path.splitext(f)[1]] for f in files}) > 1:
        raise UserError(f"{path} mixes parquet and JSONL shards; give a folder of one kind")
    return files


def hub_reachable(seconds=3.0):
    """Whether the Hugging Face hub answers on its port: an offline machine fails here in seconds
    instead of in datasets' minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=seconds).close()
        return True
    except OSError:
        return False


def read_with_datasets(path, split, streaming, limit):
    """Rows of a folder of shards (all of one kind: parquet or JSONL) or of a dataset name, through
    `datasets` (requirements-extras.txt): it reads parquet and JSONL shards, a hub dataset's cache
    and streams what does not fit in memory, which a reader of our own would not. A local folder
    is always streamed: nothing is cached, so a shard rewritten in place is read as it is now.
    Whatever datasets or pyarrow raise on the files (a corrupt shard, mixed schemas, bad bytes),
    while opening or while iterating, is one line naming it."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {path} (a folder of shards or a dataset name) needs Hugging Face datasets: "
                        f"pip install datasets==5.2.0 (or -r requirements-extras.txt); or give one JSONL or parquet file") from None
    datasets.disable_progress_bars()
    if os.path.isdir(path):
        files = shard_files(path, split)
        source, data_files, streaming = SHARD_KINDS[os.path.splitext(files[0])[1]], {split: files}, True
    else:
        if not hub_reachable():
            os.environ["HF_HUB_OFFLINE"] = "1"  # a dataset already in the local cache still loads
        source, data_files = path, None
    rows = []
    try:
        data = datasets.load_dataset(source, data_files=data_files, split=split, streaming=streaming)
        for row in data:  # streaming: record by record, stopping at the limit
            rows.append(dict(row) if isinstance(row, dict) else row)
            if limit and len(rows) >= limit:
                break
    except (KeyboardInterrupt, SystemExit, UserError):
        raise
    except Exception as e:  # a third-party reader on user data: any failure is the data's, one line
        where = "" if os.path.isdir(path) else " (offline? give a local folder of shards)" \
            if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"{path} cannot be read with datasets{where}: {first_line(e)}") from None
    return rows


def record_problem(record):
    """Why an input record cannot be used (a count's name in prepare.json), or None."""
    if not isinstance(record, dict):
        return "not_an_object"
    if any(record.get(k) in (None, "") for k in OMR_FIELDS):
        return "missing_fields"
    answer = record["expected_answer"]
    if not isinstance(record["problem"], str) or not isinstance(record["generated_solution"], str) or \
            isinstance(answer, bool) or not isinstance(answer, (str, int)):
        return "fields_not_text"  # a number or a list as the problem, a list or a decimal as the answer
    if not record["problem"].strip() or critic.normalize_answer(str(answer)) == "":
        return "missing_fields"
    return None


# ---------------------------------------------------------------------------------------------
# Problems: one per question, its reference chosen by a stated rule, then OMR's cheap pre-filters.


def problem_key(question):
    """The text two records of one problem share: Unicode-normalised, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", question).split())


def group_problems(records, counts):
    """One problem per question, in first-seen order: the shortest solution whose final answer
    matches the expected one is its reference (else the shortest). Counts `duplicate_records`
    (records of a problem beyond its first) and `conflicting_answers` (problems dropped because
    their records disagree on the answer)."""
    groups = {}
    for r in records:
        groups.setdefault(problem_key(r["question"]), []).append(r)
    counts["duplicate_records"] += len(records) - len(groups)
    problems = []
    for rows in groups.values():
        if len({critic.normalize_answer(r["answer"]) for r in rows}) > 1:
            counts["conflicting_answers"] += 1
            continue
        by_length = sorted(rows, key=lambda r: len(r["solution"]))
        reference = next((r for r in by_length if critic.answers_match(critic.extract_answer(r["solution"]),
                                                                       r["answer"])), by_length[0])
        problems.append({**rows[0], "solution": reference["solution"], "solutions": len(rows)})
    return problems


def pre_filter(problems, counts, problem_types=None, max_pass_rate=None):
    """OMR's columns, before any sampling: problem_type in `problem_types` (None: has_answer_extracted
    where the column is there), pass_rate_72b_tir at most `max_pass_rate` (None: off)."""
    has_type = any("problem_type" in p for p in problems)
    if problem_types and not has_type:
        raise UserError("--problem-type filters on the column problem_type, which the input does not have")
    types = problem_types or ({HAS_ANSWER} if has_type else None)
    kept = []
    for p in problems:
        if types and p.get("problem_type") not in types:
            counts["problem_type"] += 1
            continue
        if max_pass_rate is not None:
            try:
                rate = float(p.get("pass_rate"))
            except (TypeError, ValueError):  # OMR writes "n/a" where the 72B model was not run
                counts["pass_rate_unknown"] += 1
                continue
            if rate > max_pass_rate:
                counts["pass_rate_too_high"] += 1
                continue
        kept.append(p)
    return kept


# ---------------------------------------------------------------------------------------------
# The paper's filter, at the config's settings.


def sampling_settings(cfg):
    """What decides which problems the filter keeps: prepare.json records it, training compares."""
    return {key: getattr(cfg, key) for key in common.FILTER_SETTINGS}


def fits_context(problems, tokenizer, model, cfg, counts):
    """The problems whose student prompt plus max_new_tokens fit the model's context (too_long)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return problems
    fits = [len(contexts.student_prompt_ids(tokenizer, p["question"], cfg.prompts, cfg.student_thinking))
            + cfg.max_new_tokens <= limit for p in problems]
    counts["too_long"] += fits.count(False)
    return [p for p, fit in zip(problems, fits) if fit]


def filter_chunk(problems, model, tokenizer, judge, cfg, device, samples, max_correct, counts):
    """The paper's filter on a few problems: `samples` samples each (Avg@16 below 5/16 is at most
    `max_correct` right), the first wrong stepped sample of those, the critic's critique of it
    (all of the chunk's in one call: batched, or requests in flight) validated at the config's
    critique_validation. Returns the kept problems."""
    candidates = []
    scored = sample_answers(model, tokenizer, cfg, device, problems, samples, cfg.temperature, "solver Avg@16")
    for problem, (_, correct, _, _, _, texts) in zip(problems, scored):
        if sum(correct) > max_correct:
            counts["too_easy"] += 1
            continue
        wrong = next((t for t, right in zip(texts, correct) if not right and contexts.STEP_TAG.search(t)), None)
        if wrong is None:
            counts["no_wrong_stepped_rollout"] += 1
            continue
        candidates.append((problem, wrong))
    if not candidates:
        return []
    critiques = judge([p["question"] for p, _ in candidates], [w for _, w in candidates],
                      [p["solution"] for p, _ in candidates], [p["answer"] for p, _ in candidates])
    kept = []
    for (problem, wrong), critique in zip(candidates, critiques):
        why = critic.verdict(wrong, critique, problem["answer"], cfg.critique_validation)
        if why == "ok":
            kept.append(problem)
        else:
            counts[f"critic/{why}"] += 1
    return kept


def prepare(input_path, cfg, out="data/omr", test_size=30, samples=16, max_correct=4, seed=0, max_kept=0,
            problem_types=None, max_pass_rate=None, read=None):
    """Keep the problems the paper kept (see the module docstring), sampled and critiqued at `cfg`'s
    settings; write OUT/train.jsonl, OUT/test.jsonl (split by problem) and OUT/prepare.json.
    Returns the counts."""
    if test_size < 0:
        raise UserError(f"--test-size must be at least 0, got {test_size}")
    if not 1 <= samples <= 1024 or not 0 <= max_correct < samples:
        raise UserError(f"--samples must lie in 1..1024 and --max-correct in 0..samples-1, got "
                        f"{samples} and {max_correct}")
    records, skipped = read_openmath(input_path, **(read or {}))  # read: read_openmath's options
    counts = Counter(input=len(records) + sum(skipped.values()), **skipped)
    problems = group_problems(records, counts)
    counts["problems"] = len(problems)
    problems = pre_filter(problems, counts, problem_types, max_pass_rate)
    if not problems:
        raise UserError(f"no problem of {input_path} passes the pre-filters ({dict(counts)})")
    device = common.pick_device(cfg)
    judge = world.make_judge(cfg, device, problems)  # the rule critic reads toy chains only: one line
    model, tokenizer = common.load_model(cfg, world.resolve_paths(cfg)[0], device)
    problems = fits_context(problems, tokenizer, model, cfg, counts)
    random.Random(seed).shuffle(problems)  # a seeded order: --max-kept takes no shard's slice
    torch.manual_seed(seed)
    kept, chunk, done = [], max(cfg.critic_batch, 1), 0
    while done < len(problems) and not (max_kept and len(kept) >= max_kept):
        part = problems[done:done + chunk]
        kept += filter_chunk(part, model, tokenizer, judge, cfg, device, samples, max_correct, counts)
        done += len(part)
        print(f"prepare: {done}/{len(problems)} problems sampled, {len(kept)} kept", file=sys.stderr)
    counts["not_sampled"] = len(problems) - done  # --max-kept reached first
    counts["over_max_kept"] = max(0, len(kept) - max_kept) if max_kept else 0
    kept = kept[:max_kept] if max_kept else kept
    write_split(out, kept, test_size, seed, counts)
    reference_tokens = sorted(len(tokenizer(p["solution"])["input_ids"]) for p in kept)
    summary = {"input": input_path, "seed": seed, "samples": samples, "max_correct": max_correct,
               "test_size": test_size, "max_kept": max_kept, "problem_types": sorted(problem_types or []) or "auto",
               "max_pass_rate": max_pass_rate, "settings": sampling_settings(cfg), "counts": dict(counts),
               "reference_tokens": {"max": max(reference_tokens, default=0),
                                    "median": reference_tokens[len(reference_tokens) // 2] if kept else 0,
                                    "over_max_context_tokens": sum(n > cfg.max_context_tokens
                                                                   for n in reference_tokens)}}
    runfolder.write_atomic(os.path.join(out, "prepare.json"), json.dumps(summary, indent=1) + "\n")
    print(", ".join(f"{k} {v}" for k, v in counts.items() if v) + f"; wrote {out}/train.jsonl, test.jsonl")
    return dict(counts)


def write_split(out, kept, test_size, seed, counts):
    """Test and train by problem (each problem is one record by now), checked disjoint on the
    problems' text before anything is written."""
    random.Random(seed).shuffle(kept)
    test, train = kept[:test_size], kept[test_size:]
    if {problem_key(p["question"]) for p in test} & {problem_key(p["question"]) for p in train}:
        raise AssertionError("a test problem is in train")  # cannot happen after group_problems
    if len(kept) <= test_size:
        print(f"warning: {len(kept)} problems kept, not more than --test-size {test_size}: train is empty",
              file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        fields = ("id", "question", "answer", "solution")
        runfolder.write_atomic(os.path.join(out, f"{name}.jsonl"),
                          "".join(json.dumps({k: p[k] for k in fields}) + "\n" for p in rows))
    counts.update(kept=len(kept), train=len(train), test=len(test))


# ---------------------------------------------------------------------------------------------


def split_positionals(words):
    """INPUT [MODEL] [key=value ...] in any order after INPUT: (input, model or None, overrides)."""
    plain = [w for w in words[1:] if "=" not in w]
    if len(plain) > 1:
        raise UserError(f"expected INPUT [MODEL] [key=value ...], got more than one model: {', '.join(plain)}")
    return words[0], (plain[0] if plain else None), [w for w in words[1:] if "=" in w]


def target(args):
    """The run config prepare samples at: --config, then MODEL, then key=value (as training reads
    them), resolved as a critique run would be; and the output folder (the config's data folder
    when --out is not given)."""
    input_path, model, overrides = split_positionals(args.paths)
    values = options.config_values(selfdistill.Config, selfdistill.CHOICES, args.config, overrides)
    if model:
        values["model"] = model
    configured = {os.path.dirname(values.get(k, "")) for k in ("train_file", "test_file")}
    out = args.out or (configured.pop() if len(configured) == 1 and "" not in configured else "data/omr")
    if args.out and values.get("train_file") and os.path.dirname(values["train_file"]) != args.out:
        print(f"warning: --out {args.out} is not the folder of the config's train_file {values['train_file']}",
              file=sys.stderr)
    values.update(train_file=os.path.join(out, "train.jsonl"), test_file=os.path.join(out, "test.jsonl"))
    values.setdefault("arm", "critique")
    return input_path, selfdistill.resolve(selfdistill.Config(**values)), out


def main(argv=None):
    parser = options.Parser(
        description="Convert and filter OpenMathReasoning records into train/test JSONL.",
        epilog=__doc__[__doc__.index("Commands:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="INPUT [MODEL] [key=value ...]",
                        help="OpenMathReasoning records (.jsonl, .parquet, a folder of shards or a dataset "
                        "name), the solver (default: the config's model, else the toy world's), overrides")
    parser.add_argument("--config", help="the training config (YAML): its model, lengths, sampling and critic")
    parser.add_argument("--out", help="output folder (default: the config's data folder, else data/omr)")
    parser.add_argument("--test-size", type=int, default=30, help="test problems (default %(default)s)")
    parser.add_argument("--max-kept", type=int, default=0, help="stop once this many problems are kept "
                        "(the paper: 312 = 282 train + 30 test; 0 = all)")
    parser.add_argument("--samples", type=int, default=16, help="samples per problem (default %(default)s)")
    parser.add_argument("--max-correct", type=int, default=4, help="keep problems with at most this many "
                        "right samples (default %(default)s: Avg@16 below 5/16)")
    parser.add_argument("--problem-type", help="OMR problem_type values to keep, comma-separated (default: "
                        f"{HAS_ANSWER} when the column is there)")
    parser.add_argument("--max-pass-rate", type=float, help="keep problems with pass_rate_72b_tir at most this")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problem order, sampling and split")
    parser.add_argument("--split", default="train", help="a folder of shards or a dataset name: the split "
                        "(shards named SPLIT-*.parquet; default %(default)s)")
    parser.add_argument("--streaming", action="store_true", help="a dataset name: read record by record "
                        "(datasets' streaming), for data larger than memory; with --limit")
    parser.add_argument("--limit", type=int, default=0, help="read at most this many records (0 = all)")
    for field, default in zip(("question", "solution", "answer"), OMR_FIELDS):
        parser.add_argument(f"--{field}-column", default=default, help=f"the input's column of the {field} "
                            f"(default %(default)s)")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    common.default_signals()  # Ctrl-C: one line (user_errors)
    with common.user_errors():
        for flag, value in (("--limit", args.limit), ("--max-kept", args.max_kept), ("--seed", args.seed)):
            if not 0 <= value <= options.INT_LIMIT:
                raise UserError(f"{flag} must lie in 0..{options.INT_LIMIT} (0 = all), got {value}")
        if args.max_pass_rate is not None and not 0 <= args.max_pass_rate <= 1:
            raise UserError(f"--max-pass-rate must lie in [0, 1], got {args.max_pass_rate}")
        input_path, cfg, out = target(args)
        columns = dict(zip(OMR_FIELDS, (args.question_column, args.solution_column, args.answer_column)))
        read = {"split": args.split, "streaming": args.streaming, "limit": args.limit,
                "columns": {k: v for k, v in columns.items() if k != v} or None}
        types = {t.strip() for t in args.problem_type.split(",") if t.strip()} if args.problem_type else None
        prepare(input_path, cfg, out, args.test_size, args.samples, args.max_correct, args.seed, args.max_kept,
                types, args.max_pass_rate, read)


if __name__ == "__main__":
    main()
