"""Reading every supported source into the same two text columns, batch by batch."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canaryflow.config import load_config
from canaryflow.data import sources
from canaryflow.data.prepare import prepare_data, read_pairs
from tests.conftest import demo_config


def _read(path, *overrides) -> pa.Table:
    cfg = load_config(overrides=[f"data.train={path}", *overrides])
    return pa.Table.from_batches(list(sources.file_batches(cfg.data.train, "train", cfg)), schema=sources.SCHEMA)


def test_a_large_jsonl_streams_and_a_late_mixed_type_falls_back_without_losing_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_BLOCK_BYTES", 4096)  # many small blocks, as a large file has many big ones
    rows = [{"input": f"row {i}", "target": f"t {i}", "extra": {"nested": i}} for i in range(3000)]
    rows[2500]["input"] = 12345  # Arrow has already yielded the rows before this one when it meets it
    rows[2700]["target"] = None
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i % 700 == 0 else "") for i, r in enumerate(rows)))
    batches = list(sources.file_batches([str(path)], "train", load_config()))
    assert len(batches) > 10  # streamed, not read whole
    table = pa.Table.from_batches(batches)
    assert table.num_rows == 3000
    assert table.column("input").to_pylist()[:3] == ["row 0", "row 1", "row 2"]
    assert table.column("input")[2500].as_py() is None and table.column("not_text").to_pylist().count(True) == 1
    assert table.column("target")[2700].as_py() is None
    assert table.column("input").to_pylist()[2999] == "row 2999"


def test_a_json_array_file_loads_like_json_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"input": "a", "target": "b"}, {"input": 3, "target": "c"}, {"target": "d"}]))
    table = _read(path)
    assert table.column("input").to_pylist() == ["a", None, None]
    assert table.column("not_text").to_pylist() == [False, True, False]


def test_csv_reads_quoted_newlines_and_ignores_other_columns_types(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_BLOCK_BYTES", 1024)
    lines = ["id,input,target"] + [f"{i},q {i},a {i}" for i in range(200)] + ['oops,"two\nlines","x, y"']
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(lines) + "\n")
    table = _read(path)
    assert table.num_rows == 201
    assert table.column("input")[200].as_py() == "two\nlines" and table.column("target")[200].as_py() == "x, y"
    assert table.schema.field("input").type == pa.large_string()


def test_tsv_and_custom_column_names(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text("question\tanswer\nwhat, then?\tthis\n")
    table = _read(path, "data.input_column=question", "data.target_column=answer")
    assert table.column("input").to_pylist() == ["what, then?"] and table.column("target").to_pylist() == ["this"]


def test_parquet_of_any_string_type_and_a_numeric_column(tmp_path):
    path = tmp_path / "rows.parquet"
    table = pa.table(
        {
            "input": pa.array(["a", "b", None], pa.string()),
            "target": pa.array(["x", "y", "z"], pa.large_string()),
            "score": [1, 2, 3],
        }
    )
    pq.write_table(table, path, row_group_size=1)
    read = _read(path)
    assert read.column("input").to_pylist() == ["a", "b", None] and read.schema == sources.SCHEMA
    numeric = _read(path, "data.target_column=score")
    assert numeric.column("not_text").to_pylist() == [True, True, True]
    assert numeric.column("target").null_count == 3


def test_one_split_mixes_formats_and_string_types(tmp_path, demo_files):
    rows = [{"input": f"mixed {i}", "target": f"t {i}"} for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))  # string
    pd.DataFrame(rows[10:20]).to_csv(tmp_path / "b.csv", index=False)  # large_string
    pq.write_table(pa.Table.from_pylist(rows[20:30]), tmp_path / "c.parquet")  # string
    (tmp_path / "d.json").write_text(json.dumps(rows[30:]))
    cfg = demo_config(demo_files)
    cfg.data.train = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv"), str(tmp_path / "*.parquet")]
    cfg.data.train.append(str(tmp_path / "d.json"))
    card = prepare_data(cfg, tmp_path / "out")
    assert card["counts"]["train"] == 40
    assert set(read_pairs(tmp_path / "out", "train")["input"]) == {r["input"] for r in rows}


def test_every_file_is_checked_before_any_is_read(tmp_path, monkeypatch):
    good = tmp_path / "good.jsonl"
    good.write_text('{"input": "a", "target": "b"}\n')
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty.jsonl").write_text("")
    read = []
    monkeypatch.setitem(sources._READERS, "json", lambda path, split, cfg: read.append(path) or iter(()))
    for last, message in (("notes.txt", "unknown format '.txt'"), ("empty.jsonl", "file is empty: empty.jsonl")):
        with pytest.raises(sources.BadInputError, match=message):
            list(sources.file_batches([str(good), str(tmp_path / last)], "train", load_config()))
    assert read == []
