"""prepare.py reading through Hugging Face `datasets`: a folder of parquet or JSONL shards (local,
no download), a split, streaming, a record limit and column mapping; the one-line errors for a
folder with no shards or mixed kinds, an unknown split, a bad --limit and a missing package.

Protects: every shard's records arrive once, in shard order, the same with and without streaming;
the columns map onto the OpenMathReasoning fields; records that are not text are still counted
and skipped (record_problem) on this path too."""
import builtins
import json
import os

import pytest

import prepare
from plumbing.common import UserError

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


def test_a_negative_limit_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        prepare.main(["omr.jsonl", "--limit", "-1"])
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("error: --limit")
