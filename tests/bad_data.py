"""Bad data, one case for each way the data-preparation issue lists. Each case says which split's file it
replaces, what the file holds, any config it needs, and how the one error line must begin.

The same cases run against the library (tests/unit/test_prepare.py) and through the CLI with a champion in
the registry (tests/pipelines/test_cli_data.py), so a new case is tested on both layers at once.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


_GOOD = [{"input": f"question {i}", "target": f"answer {i}"} for i in range(90)]


@dataclass
class Case:
    id: str
    name: str  # file name; the file replaces `split`'s files
    content: bytes | None  # None: the file does not exist
    message: str  # the error line starts with this (after "error: " on the command line)
    split: str = "train"
    sets: list[str] = field(default_factory=list)
    also: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # other splits' files: name, content

    def write(self, folder: Path, demo_files: dict[str, Path]) -> list[str]:
        """Write the case's files into folder and return the config overrides that use them; the splits the
        case leaves alone keep the demo task's files."""
        files = {s: str(demo_files[s]) for s in ("train", "validation", "test")}
        for split, (name, content) in {self.split: (self.name, self.content), **self.also}.items():
            if content is not None:
                (folder / name).write_bytes(content)
            files[split] = str(folder / name)
        return [f"data.{s}={p}" for s, p in files.items()] + self.sets


CASES = [
    Case("missing-file", "train.jsonl", None, "data.train: file not found"),
    Case("empty-file", "train.jsonl", b"", "data.train: file is empty: train.jsonl"),
    Case("header-only-csv", "train.csv", b"input,target\n", "data.train: no rows in train.csv"),
    Case(
        "broken-json-line",
        "train.jsonl",
        b'{"input": "a", "target": "b"}\n{"input": "broken\n',
        "data.train: cannot read train.jsonl: line 2, column 11: Unterminated string",
    ),
    Case(
        "garbage-bytes",
        "train.jsonl",
        b"\x00\xff\xfe garbage \x81",
        "data.train: train.jsonl is not UTF-8 text (byte 0xff at offset 1)",
    ),
    Case(
        "ragged-csv",
        "train.csv",
        b"input,target\na,b\nc,d,e,f\n",
        "data.train: cannot read train.csv: CSV parse error: Expected 2 columns, got 4",
    ),
    Case(
        "gzip-under-plain-name",
        "train.jsonl",
        gzip.compress(b'{"input": "a", "target": "b"}\n'),
        "data.train: train.jsonl is gzip-compressed; decompress it first",
    ),
    Case("unknown-format", "train.xml", b"<a/>", "data.train: unknown format '.xml'"),
    Case("not-parquet", "train.parquet", b"input,target\n", "data.train: train.parquet is not a parquet file"),
    Case("corrupt-parquet", "train.parquet", b"PAR1" + b"\x00" * 64, "data.train: cannot read train.parquet"),
    Case(
        "json-neither-lines-nor-array",
        "train.json",
        b'{"rows": [{"input": "a", "target": "b"}]',
        "data.train: cannot read train.json",
    ),
    Case(
        "missing-column",
        "train.csv",
        b"source,label\nx,y\n",
        "data.train: missing column 'input'; the columns are source, label",
    ),
    Case(
        "missing-column-parquet",
        "train.parquet",
        _parquet(pa.table({"text": ["x"], "target": ["y"]})),
        "data.train: missing column 'input'; the columns are text, target",
    ),
    Case(
        "too-many-nulls",
        "train.jsonl",
        _jsonl(_GOOD + [{"input": None, "target": "a"}] * 10),
        "data.train: 10 of 100 rows (10.0%) are null, empty or not text (null 10), over data.max_invalid_fraction 5.0%",
    ),
    Case(
        "too-many-empty",
        "train.csv",
        b"input,target\n" + b"".join(b"q %d,a\n" % i for i in range(90)) + b' ,a\n"",b\n' * 5,
        "data.train: 10 of 100 rows (10.0%) are null, empty or not text (empty 10)",
    ),
    Case(
        "too-many-non-strings",
        "train.jsonl",
        _jsonl(_GOOD + [{"input": i, "target": "a"} for i in range(6)] + [{"input": "x", "target": [1]}] * 4),
        "data.train: 10 of 100 rows (10.0%) are null, empty or not text (not_text 10)",
    ),
    Case(
        "non-string-parquet-column",
        "train.parquet",
        _parquet(pa.table({"input": list(range(20)), "target": ["y"] * 20})),
        "data.train: every row was dropped by cleaning",
    ),
    Case(
        "latin-1-csv",
        "train.csv",
        "input,target\ncafé,x\n".encode("latin-1"),
        "data.train: train.csv is not UTF-8 text (byte 0xe9 at offset 16)",
    ),
    Case(
        "every-row-dropped",
        "train.jsonl",
        _jsonl([{"input": " ", "target": "x"}] * 3),
        "data.train: every row was dropped by cleaning",
        sets=["data.max_invalid_fraction=1"],
    ),
    Case(
        "split-below-minimum",
        "test.jsonl",
        _jsonl([{"input": f"zz{i}", "target": "a"} for i in range(4)] * 3),
        "data.test: 4 rows after cleaning, deduplication and leakage, fewer than data.min_split_rows 10",
        split="test",
    ),
    Case(
        "every-input-over-length",
        "train.jsonl",
        _jsonl([{"input": f"{i} " + "w " * 40, "target": "t"} for i in range(20)]),
        "data.train: every input is over data.max_source_length words",
        sets=["data.max_source_length=30", "data.overlength=drop"],
    ),
    Case(
        "leakage-after-normalization",
        "test.jsonl",
        _jsonl([{"input": f"  QUESTION\t{i} ", "target": "x"} for i in range(20)]),
        "data: 20 input(s) appear in both train and test, e.g. 'question 0'",
        split="test",
        also={"train": ("train.jsonl", _jsonl(_GOOD))},
        sets=["data.on_leakage=fail"],
    ),
    Case(
        "hub-id-offline",
        "unused.jsonl",
        None,
        "data.dataset 'someone/some-dataset' cannot be loaded: the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1)",
        sets=["data.train=null", "data.validation=null", "data.test=null", "data.dataset=someone/some-dataset"],
    ),
]
