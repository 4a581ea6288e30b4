"""Where the rows come from: local files (jsonl/json, csv/tsv, parquet; one file, several, or globs), or a
dataset through datasets.load_dataset.

Every source yields the same thing: Arrow record batches of three columns, `input` and `target` as
large_string and `not_text` marking rows whose input or target held a value that is not text (such a value
is nulled). So files of any format mix without a type clash, and a large file is never held whole: each
batch holds only the two columns the stage uses, and the caller may drop it once it has cleaned it.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from canaryflow.config import Config
from canaryflow.errors import BadInputError, first_line

TEXT = pa.large_string()
SCHEMA = pa.schema([("input", TEXT), ("target", TEXT), ("not_text", pa.bool_())])
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
_BLOCK_BYTES = 8 << 20  # per parsed block: large enough to amortize the per-batch work, small next to the data
_PY_BATCH_ROWS = 65_536
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"


def resolve_files(patterns: list[str], split: str) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for name in matched:
            path = Path(name)
            if not path.is_file():
                raise BadInputError(f"data.{split}: file not found: {name}")
            files.append(path.resolve())
        if not matched:
            raise BadInputError(f"data.{split}: no file matches {pattern}")
    return files


def _format_of(path: Path, split: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise BadInputError(
            f"data.{split}: unknown format {suffix or path.name!r}; use one of {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[suffix]


def sniff(path: Path, split: str) -> None:
    """Refuse a file that cannot be what its name says, from its first bytes, before any parser sees it."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise BadInputError(f"data.{split}: file is empty: {path.name}")
    if head[:2] == _GZIP_MAGIC:
        raise BadInputError(f"data.{split}: {path.name} is gzip-compressed; decompress it first")
    if (path.suffix.lower() == ".parquet") != (head == _PARQUET_MAGIC):
        what = "not a parquet file" if path.suffix.lower() == ".parquet" else "a parquet file under another name"
        raise BadInputError(f"data.{split}: {path.name} is {what}")


def require_utf8(path: Path, split: str) -> None:
    """Name the first byte that is not UTF-8. Run only once a parser has failed: the parsers check the
    encoding of the columns they read, and a second pass over every good file would cost as much again."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise BadInputError(
                    f"data.{split}: {path.name} is not UTF-8 text (byte 0x{chunk[exc.start]:02x} at offset "
                    f"{offset + exc.start})"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise BadInputError(f"data.{split}: {path.name} ends inside a UTF-8 character") from None


def _require_columns(names: Iterable[str], split: str, cfg: Config) -> None:
    names = [str(n) for n in names]
    for wanted in (cfg.data.input_column, cfg.data.target_column):
        if wanted not in names:
            raise BadInputError(f"data.{split}: missing column {wanted!r}; the columns are {', '.join(names)}")


def _labels(cfg: Config) -> bool:
    # A classifier's labels are often integers (0/1); as text they are labels all the same.
    return cfg.model.task == "classification"


def text_batch(
    inputs: pa.Array | pa.ChunkedArray, targets: pa.Array | pa.ChunkedArray, labels: bool = False
) -> pa.RecordBatch:
    """The two columns as large_string, whatever type the source gave them; a column that is not text
    becomes nulls, and its present values are marked not_text. With `labels`, integer targets are text."""
    not_text = np.zeros(len(inputs), dtype=bool)
    columns = []
    for column in (inputs, targets):
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if labels and column is targets and pa.types.is_integer(column.type):
            column = column.cast(pa.string())
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
            columns.append(column.cast(TEXT))
        else:
            not_text |= column.is_valid().to_numpy(zero_copy_only=False)
            columns.append(pa.nulls(len(column), TEXT))
    return pa.RecordBatch.from_arrays([*columns, _bools(not_text)], schema=SCHEMA)


def _bools(mask: np.ndarray) -> pa.Array:
    # pa.array() converts a numpy bool array element by element (0.3 s a million); packed bits are a copy.
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(np.packbits(mask, bitorder="little"))])


def _python_batch(values: list[tuple[object, object]], labels: bool = False) -> pa.RecordBatch:
    """Rows parsed by Python, where a column may mix types: text stays, anything else present is not_text."""
    if labels:
        values = [(v[0], str(v[1]) if type(v[1]) is int else v[1]) for v in values]
    inputs = [v[0] if isinstance(v[0], str) else None for v in values]
    targets = [v[1] if isinstance(v[1], str) else None for v in values]
    not_text = [any(x is not None and not isinstance(x, str) for x in v) for v in values]
    columns = [pa.array(inputs, TEXT), pa.array(targets, TEXT), pa.array(not_text)]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def _json_records(path: Path, split: str, skip: int = 0) -> Iterator[dict]:
    """The objects of a JSON-lines file, one per non-blank line, parsed by Python, which names the line
    and column of a syntax error. The first `skip` records are counted, not parsed."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip(" \t\r\n"):
                continue
            if skip:
                skip -= 1
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                require_utf8(path, split)  # garbage bytes deserve that name rather than a JSON error
                raise BadInputError(
                    f"data.{split}: cannot read {path.name}: line {number}, column {exc.colno}: {exc.msg}"
                ) from None
            if not isinstance(record, dict):
                raise BadInputError(f"data.{split}: cannot read {path.name}: line {number} is not a JSON object")
            yield record


def _first_record(path: Path, split: str) -> dict | None:
    return next(_json_records(path, split), None)


def _json_array(path: Path, split: str, cfg: Config) -> Iterator[pa.RecordBatch]:
    """A .json file holding one array of records: it cannot be streamed, so it is parsed whole."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInputError(
            f"data.{split}: cannot read {path.name}: line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise BadInputError(f"data.{split}: cannot read {path.name}: expected JSON lines or one array of objects")
    if records:
        _require_columns(records[0], split, cfg)
    keys = (cfg.data.input_column, cfg.data.target_column)
    for start in range(0, len(records), _PY_BATCH_ROWS):
        rows = [(r.get(keys[0]), r.get(keys[1])) for r in records[start : start + _PY_BATCH_ROWS]]
        yield _python_batch(rows, _labels(cfg))


def _json_lines_slowly(path: Path, split: str, cfg: Config, skip: int) -> Iterator[pa.RecordBatch]:
    """Python's own parser, line by line, after Arrow's refused the file: it takes a column that mixes
    text with numbers (those rows become not_text), and it names the line of a syntax error. The first
    `skip` records were already read by Arrow, so they are only counted here."""
    keys = (cfg.data.input_column, cfg.data.target_column)
    rows: list[tuple[object, object]] = []
    for record in _json_records(path, split, skip):
        rows.append((record.get(keys[0]), record.get(keys[1])))
        if len(rows) == _PY_BATCH_ROWS:
            yield _python_batch(rows, _labels(cfg))
            rows = []
    if rows:
        yield _python_batch(rows, _labels(cfg))


def _read_json(path: Path, split: str, cfg: Config) -> Iterator[pa.RecordBatch]:
    import pyarrow.json as pajson

    with open(path, "rb") as handle:
        if handle.read(4096).lstrip()[:1] == b"[":
            yield from _json_array(path, split, cfg)
            return
    first = _first_record(path, split)
    if first is None:
        return
    _require_columns(first, split, cfg)
    source, target = cfg.data.input_column, cfg.data.target_column
    # An explicit schema reads just the two columns, as large_string; other fields are skipped unparsed.
    # Integer labels make Arrow refuse the text schema; Python's parser below then reads them as text.
    parse = pajson.ParseOptions(
        explicit_schema=pa.schema([(source, TEXT), (target, TEXT)]), unexpected_field_behavior="ignore"
    )
    done = 0
    try:
        for batch in pajson.open_json(
            path, read_options=pajson.ReadOptions(block_size=_BLOCK_BYTES), parse_options=parse
        ):
            yield text_batch(batch.column(0), batch.column(1), _labels(cfg))
            done += batch.num_rows
    except pa.ArrowInvalid:
        # Arrow refuses a column that mixes types, and locates syntax errors only within its block.
        require_utf8(path, split)
        yield from _json_lines_slowly(path, split, cfg, skip=done)


def _read_csv(path: Path, split: str, cfg: Config) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pacsv

    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    if not header:
        return
    _require_columns(header, split, cfg)
    columns = [cfg.data.input_column, cfg.data.target_column]
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=_BLOCK_BYTES),
        # Quoted values may hold newlines, as Python's csv module allows.
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        # Only the two columns are converted, both as text: other columns' types never matter.
        convert_options=pacsv.ConvertOptions(include_columns=columns, column_types=dict.fromkeys(columns, TEXT)),
    )
    for batch in reader:
        yield text_batch(batch.column(0), batch.column(1), _labels(cfg))


def _read_parquet(path: Path, split: str, cfg: Config) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    _require_columns(parquet.schema_arrow.names, split, cfg)
    columns = [cfg.data.input_column, cfg.data.target_column]
    for batch in parquet.iter_batches(batch_size=_PY_BATCH_ROWS, columns=columns):
        yield text_batch(batch.column(0), batch.column(1), _labels(cfg))


_READERS = {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def _read_file(path: Path, kind: str, split: str, cfg: Config) -> Iterator[pa.RecordBatch]:
    rows = 0
    try:
        for batch in _READERS[kind](path, split, cfg):
            rows += batch.num_rows
            yield batch
    except BadInputError:
        raise
    except Exception as exc:  # Arrow raises several types for unreadable files; all are bad input
        if kind != "parquet":
            require_utf8(path, split)
        raise BadInputError(f"data.{split}: cannot read {path.name}: {first_line(exc)}") from None
    if rows == 0:
        raise BadInputError(f"data.{split}: no rows in {path.name}")


def file_batches(patterns: list[str], split: str, cfg: Config) -> Iterator[pa.RecordBatch]:
    """One split's files, batch by batch. Every file is found, named and sniffed before the first is read,
    so a typo in the last file fails in a second, not after the first file has been parsed."""
    files = resolve_files(patterns, split)
    kinds = [_format_of(path, split) for path in files]
    for path in files:
        sniff(path, split)
    for path, kind in zip(files, kinds):
        yield from _read_file(path, kind, split, cfg)


def dataset_batches(split: str, cfg: Config) -> Iterator[pa.RecordBatch] | None:
    """One split of data.dataset (a hub id, or a local dataset folder) through datasets.load_dataset, or
    None when the dataset has no such split (validation and test are then carved out of train)."""
    import datasets

    name = cfg.data.dataset_splits.get(split, split)
    datasets.disable_progress_bars()
    try:
        available = datasets.get_dataset_split_names(cfg.data.dataset, cfg.data.dataset_config)
    except Exception as exc:  # offline, unknown id, private repo: say which, in one line
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1)" if offline else first_line(exc)
        raise BadInputError(f"data.dataset {cfg.data.dataset!r} cannot be loaded: {why}") from None
    if name not in available:
        if split == "train":
            raise BadInputError(f"data.dataset {cfg.data.dataset!r} has no split {name!r}; it has {available}")
        return None
    try:
        ds = datasets.load_dataset(cfg.data.dataset, cfg.data.dataset_config, split=name)
    except Exception as exc:
        raise BadInputError(f"data.dataset {cfg.data.dataset!r} split {name!r}: {first_line(exc)}") from None
    _require_columns(ds.column_names, split, cfg)
    if ds.num_rows == 0:
        raise BadInputError(f"data.{split}: no rows in {cfg.data.dataset} [{name}]")
    columns = ds.select_columns([cfg.data.input_column, cfg.data.target_column]).with_format("arrow")
    # The dataset is memory-mapped from datasets' cache; batches are read from it as the caller asks.
    labels = _labels(cfg)
    return (text_batch(t.column(0), t.column(1), labels) for t in columns.iter(batch_size=_PY_BATCH_ROWS))


def split_batches(split: str, cfg: Config) -> Iterator[pa.RecordBatch] | None:
    """The batches of one split from whichever source the config names, or None when it names none."""
    if cfg.data.dataset:
        return dataset_batches(split, cfg)
    patterns = getattr(cfg.data, split)
    return file_batches(patterns, split, cfg) if patterns else None
