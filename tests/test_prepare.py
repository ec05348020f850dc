"""prepare.py reading through Hugging Face `datasets`: a folder of parquet or JSONL shards (local,
no download), a split, streaming, a record limit and column mapping; the one-line errors for a
folder with no shards or mixed kinds, an unknown split, a bad --limit and a missing package; and,
on shard folders, the mistakes a user can make (corrupt, mixed-schema, non-UTF-8 and non-object
shards, with and without streaming; a stray key=value or a second model, a split no shard is named
by, pre-filters that cannot apply, out-of-range numbers; a dataset name with the hub unreachable),
each one line, never a traceback, a hang or a file written. (prepare.py's OpenMathReasoning JSONL
input is test_prepare_inputs.py's.)

Protects: every shard's records arrive once, in shard order, the same with and without streaming;
the columns map onto the OpenMathReasoning fields; records that are not text are still counted
and skipped (record_problem) on this path too."""
import builtins
import json
import os
import time
from collections import Counter

import pytest

import prepare
from plumbing.common import UserError
from conftest import run_main

pyarrow = pytest.importorskip("pyarrow")
pytest.importorskip("datasets")
import pyarrow.parquet  # noqa: E402


def records(start, n, **names):
    """OpenMathReasoning-like records, their columns renamed by `names` (ours -> theirs)."""
    fields = {"problem": "problem", "generated_solution": "generated_solution",
              "expected_answer": "expected_answer", **names}
    return [{fields["problem"]: f"{i}+1", fields["generated_solution"]: f"<step_1> {i}+1={i + 1}",
             fields["expected_answer"]: str(i + 1)} for i in range(start, start + n)]


def parquet_shards(folder, parts, prefix="train", **names):
    os.makedirs(folder, exist_ok=True)
    start = 0
    for k, n in enumerate(parts):
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records(start, n, **names)),
                                    os.path.join(folder, f"{prefix}-{k:05d}-of-{len(parts):05d}.parquet"))
        start += n
    return str(folder)


def jsonl_shards(folder, parts, prefix="part"):
    os.makedirs(folder, exist_ok=True)
    start = 0
    for k, n in enumerate(parts):
        with open(os.path.join(folder, f"{prefix}-{k}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records(start, n))
        start += n
    return str(folder)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_a_folder_of_shards_reads_every_record_once(tmp_path, kind, streaming):
    folder = (parquet_shards if kind == "parquet" else jsonl_shards)(tmp_path / "shards", [3, 4, 2])
    rows, skipped = prepare.read_openmath(folder, streaming=streaming)
    assert [r["question"] for r in rows] == [f"{i}+1" for i in range(9)] and not skipped
    assert rows[4] == {"id": 4, "question": "4+1", "answer": "5", "solution": "<step_1> 4+1=5"}


def test_streaming_stops_at_the_limit(tmp_path):
    folder = parquet_shards(tmp_path / "shards", [50, 50])
    rows, _ = prepare.read_openmath(folder, streaming=True, limit=7)
    assert [r["question"] for r in rows] == [f"{i}+1" for i in range(7)]
    assert len(prepare.read_openmath(folder, limit=60)[0]) == 60


def test_columns_map_onto_the_openmath_fields(tmp_path):
    folder = parquet_shards(tmp_path / "shards", [3], problem="q", generated_solution="s", expected_answer="a")
    with pytest.raises(UserError, match="none of the 3 records"):
        prepare.read_openmath(folder)  # the OpenMathReasoning names are not there
    rows, _ = prepare.read_openmath(folder, columns={"problem": "q", "generated_solution": "s",
                                                    "expected_answer": "a"})
    assert [r["answer"] for r in rows] == ["1", "2", "3"]


def test_records_that_are_not_text_are_counted_on_this_path_too(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    bad = records(0, 3)
    bad[1]["expected_answer"] = "2.5e"  # text: kept
    bad[2]["problem"] = ""  # empty: skipped
    with open(folder / "a.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in bad)
    rows, skipped = prepare.read_openmath(str(folder))
    assert len(rows) == 2 and skipped == {"missing_fields": 1}


@pytest.mark.parametrize("setup, kwargs, match", [
    (lambda d: None, {}, "holds no .parquet or .jsonl shards"),
    (lambda d: (parquet_shards(d, [2], "cot"), jsonl_shards(d, [2], "cot")), {"split": "cot"}, "mixes parquet"),
    (lambda d: parquet_shards(d, [2]), {"split": "nope"}, "nope"),
])
def test_folder_errors_are_one_line(tmp_path, setup, kwargs, match):
    folder = tmp_path / "shards"
    folder.mkdir()
    setup(folder)
    with pytest.raises(UserError, match=match) as error:
        prepare.read_openmath(str(folder), **kwargs)
    assert "\n" not in str(error.value)


def test_without_datasets_a_folder_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match="pip install datasets"):
        prepare.read_openmath(parquet_shards(tmp_path / "shards", [2]))


# ---------------------------------------------------------------------------------------------
# Damaged shard folders, an unreachable hub and argument mistakes: one line each


def row(i, **extra):
    return {"problem": f"{i}+1", "generated_solution": f"<step_1> {i}+1={i + 1}", "expected_answer": str(i + 1),
            **extra}


def shards(folder, rows, name="train-00000-of-00001.parquet"):
    os.makedirs(folder, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), os.path.join(folder, name))
    return str(folder)


def one_line(argv, capsys, match):
    code, out, err = run_main(argv, capsys, prepare)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and match in lines[-1], lines
    assert not any(l.startswith("error") for l in lines[:-1])
    return lines[-1]


def corrupt_parquet(folder):
    os.makedirs(folder, exist_ok=True)
    (folder / "train-00000-of-00001.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 100 + b"PAR1")


def mixed_schema(folder):
    shards(folder, [row(0)], "train-00000-of-00002.parquet")
    shards(folder, [{"problem": 5, "other": [1, 2]}], "train-00001-of-00002.parquet")


def non_utf8_jsonl(folder):
    os.makedirs(folder, exist_ok=True)
    (folder / "train-0.jsonl").write_bytes(json.dumps(row(0)).encode() + b"\n\xff\xfe{\"problem\": \"\xe9\"}\n")


def not_json(folder):
    os.makedirs(folder, exist_ok=True)
    (folder / "train-0.jsonl").write_text("{not json at all\n")


def json_list_rows(folder):
    os.makedirs(folder, exist_ok=True)
    (folder / "train-0.jsonl").write_text("[1, 2, 3]\n[4]\n")


@pytest.mark.bad_input
@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("damage", [corrupt_parquet, mixed_schema, non_utf8_jsonl, not_json, json_list_rows])
def test_a_damaged_shard_folder_is_one_line(damage, streaming, tmp_path, capsys):
    damage(tmp_path / "omr")
    argv = [str(tmp_path / "omr"), "toy", "--out", str(tmp_path / "out")] + (["--streaming"] if streaming else [])
    one_line(argv, capsys, "cannot be read with datasets")
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input
def test_a_shard_rewritten_in_place_is_read_as_it_is_now(tmp_path):
    """Same size, same mtime, other content: datasets' cache would serve the old rows; a local
    folder is streamed, so nothing is cached."""
    folder = shards(tmp_path / "omr", [row(1)])
    path = os.path.join(folder, "train-00000-of-00001.parquet")
    assert prepare.read_openmath(folder)[0][0]["question"] == "1+1"
    stat = os.stat(path)
    shards(tmp_path / "omr", [row(2)])
    assert os.path.getsize(path) == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare.read_openmath(folder)[0][0]["question"] == "2+1"


@pytest.mark.bad_input
def test_a_single_corrupt_parquet_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "omr.parquet"
    path.write_bytes(b"not parquet at all")
    one_line([str(path), "toy"], capsys, "cannot be read as parquet")


@pytest.mark.bad_input
def test_an_unreachable_hub_fails_fast_and_quietly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))  # nothing cached
    start = time.monotonic()
    line = one_line(["someone/no-such-dataset", "toy", "--split", "cot"], capsys, "cannot be read with datasets")
    assert "offline" in line and time.monotonic() - start < 30


@pytest.mark.bad_input
@pytest.mark.parametrize("argv, match", [
    (["{shards}", "toy", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["{shards}", "toy", "temperature=hot"], "wants a number"),
    (["{shards}", "toy", "other_model"], "more than one model"),
    (["{shards}", "--split", "cot"], "has no shards of split 'cot'"),
    (["{shards}", "--problem-type", "has_answer_extracted"], "does not have"),
    (["{shards}", "--max-pass-rate", "1.5"], "--max-pass-rate must lie in [0, 1]"),
    (["{shards}", "--max-pass-rate", "nan"], "--max-pass-rate must lie in [0, 1]"),
    (["{shards}", "--limit", "-1"], "--limit must lie in"),
    (["{shards}", "--max-kept", "-3"], "--max-kept must lie in"),
    (["{shards}", "--seed", "99999999999"], "--seed must lie in"),
    (["{shards}", "--samples", "0"], "--samples must lie in 1..1024"),
    (["{shards}", "--max-correct", "16"], "--max-correct in 0..samples-1"),
    (["{shards}", "--config", "{missing}"], "not found"),
    (["{shards}", "critic=http"], "critic=http needs critic_url"),
])
def test_prepare_argument_mistakes_are_one_line(argv, match, tmp_path, capsys):
    folder = shards(tmp_path / "omr", [row(i) for i in range(4)])
    argv = [a.format(shards=folder, missing=str(tmp_path / "nope.yaml")) for a in argv]
    one_line(argv + ["--out", str(tmp_path / "out")], capsys, match)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Pre-filters and grouping


@pytest.mark.bad_input
def test_pre_filters_count_what_they_drop(tmp_path):
    """problem_type (default: has_answer_extracted where the column is there) and --max-pass-rate
    ("n/a" counted apart) act before any sampling; every problem is accounted for."""
    rows = [row(0, problem_type="has_answer_extracted", pass_rate_72b_tir="0.1"),
            row(1, problem_type="converted_proof", pass_rate_72b_tir="0.1"),
            row(2, problem_type="has_answer_extracted", pass_rate_72b_tir="0.9"),
            row(3, problem_type="has_answer_extracted", pass_rate_72b_tir="n/a"),
            row(4, problem_type="no_answer_extracted", pass_rate_72b_tir="0.0")]
    records, _ = prepare.read_openmath(shards(tmp_path / "omr", rows))
    counts = Counter()
    kept = prepare.pre_filter(prepare.group_problems(records, counts), counts, max_pass_rate=0.5)
    assert [p["question"] for p in kept] == ["0+1"]
    assert +counts == {"problem_type": 2, "pass_rate_too_high": 1, "pass_rate_unknown": 1}
    kept = prepare.pre_filter(prepare.group_problems(records, counts), counts,
                              problem_types={"has_answer_extracted", "converted_proof"})
    assert [p["question"] for p in kept] == ["0+1", "1+1", "2+1", "3+1"]


@pytest.mark.bad_input
def test_one_problem_many_solutions_gives_one_record_with_the_shortest_right_reference(tmp_path):
    rows = [row(0, generated_solution="long \\boxed{1} " + "x" * 50), row(0, generated_solution="\\boxed{7}"),
            row(0, generated_solution="short \\boxed{1}"), {**row(0), "problem": " 0+1 \n"},
            row(1), {**row(1), "expected_answer": "3"}]  # problem 1's records disagree on the answer
    records, _ = prepare.read_openmath(shards(tmp_path / "omr", rows))
    counts = Counter()
    problems = prepare.group_problems(records, counts)
    assert [(p["question"], p["solution"], p["solutions"]) for p in problems] == [("0+1", "short \\boxed{1}", 4)]
    assert +counts == {"duplicate_records": 4, "conflicting_answers": 1}


@pytest.mark.bad_input
def test_a_garbage_prepare_json_is_a_warning_not_a_stop(tmp_path, capsys):
    from plumbing import common
    import selfdistill
    (tmp_path / "prepare.json").write_text("{not json")
    common.check_data_settings(selfdistill.Config(), str(tmp_path / "train.jsonl"))
    assert "cannot be read" in capsys.readouterr().err
