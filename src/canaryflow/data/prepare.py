"""Validate, clean and split the data; write parquet splits and a data card.

Output layout (the KFP `Dataset` artifact is this directory):
  train.parquet, validation.parquet   columns input, target (one row per pair)
  test.parquet                        columns input, references (all references of one input grouped)
  data_card.json, data_card.md        counts, drops by reason, duplicates, lengths, content hash, drift

Everything runs on Arrow arrays batch by batch as the sources yield them (see `sources.py`), with no
Python loop over rows: a million rows take seconds. Rows are kept sorted by (input, target), which makes
duplicates neighbours, the content hash independent of the files' row order, and the split reproducible.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from canaryflow import progress
from canaryflow.config import TINY_BASE, Config
from canaryflow.data.card import drift, input_profile, length_percentiles, write_card
from canaryflow.data.sources import TEXT, split_batches
from canaryflow.errors import BadInputError

SPLITS = ("train", "validation", "test")
INVALID = ("null", "not_text", "empty")
_WORKERS = 2  # Arrow's kernels release the GIL: two batches are cleaned at once while the next is parsed
PHASES = (*SPLITS, "checks", "write")  # the progress steps: each split read and cleaned, then checks, write
Report = Callable[..., None]  # progress.emit's signature: (stage, done, total, **info)

# Runs of two or more whitespace characters, or any whitespace that is not a plain space: replacing just
# these by one space equals collapsing every run of whitespace, and is several times cheaper in RE2.
_WHITESPACE_RUN = r"\s\s+|[\t\n\r\f\v]"


def _squeeze(trimmed: pa.Array) -> pa.Array:
    # The text is trimmed already, so collapsing its inner runs cannot leave a space at either end.
    return pc.replace_substring_regex(trimmed, _WHITESPACE_RUN, " ")


def _words(squeezed: pa.Array) -> pa.Array:
    """Whitespace-separated words of squeezed text: its spaces, plus one where there is any text."""
    return pc.if_else(pc.equal(pc.binary_length(squeezed), 0), 0, pc.add(pc.count_substring(squeezed, " "), 1))


def normalized(texts: pa.Array) -> pa.Array:
    """The form used to compare inputs across splits: case and whitespace do not make a new input."""
    return pc.utf8_lower(_squeeze(pc.utf8_trim_whitespace(pa.array(texts, TEXT))))


def word_counts(texts: pa.Array) -> np.ndarray:
    return _words(_squeeze(pc.utf8_trim_whitespace(pa.array(texts, TEXT)))).to_numpy()


@dataclass
class _Cleaned:
    rows: int
    invalid: dict[str, int]
    table: pa.Table  # input, target (trimmed), norm, input_words, target_words


def _clean_batch(batch: pa.RecordBatch) -> _Cleaned:
    inputs, targets, not_text = batch.column(0), batch.column(1), batch.column(2)
    null = pc.or_(inputs.is_null(), targets.is_null())
    n_null, n_not_text = pc.sum(null).as_py() or 0, pc.sum(not_text).as_py() or 0
    present = pc.invert(null)
    inputs = pc.utf8_trim_whitespace(inputs.filter(present))
    targets = pc.utf8_trim_whitespace(targets.filter(present))
    filled = pc.and_(pc.greater(pc.binary_length(inputs), 0), pc.greater(pc.binary_length(targets), 0))
    inputs, targets = inputs.filter(filled), targets.filter(filled)
    squeezed = _squeeze(inputs)
    table = pa.table(
        {
            "input": inputs,
            "target": targets,
            "norm": pc.utf8_lower(squeezed),
            "input_words": _words(squeezed),
            "target_words": _words(_squeeze(targets)),
        }
    )
    invalid = {"null": n_null - n_not_text, "not_text": n_not_text, "empty": len(present) - n_null - len(inputs)}
    return _Cleaned(batch.num_rows, invalid, table)


def _clean_all(batches: Iterator[pa.RecordBatch], on_rows: Callable[[int], None]) -> list[_Cleaned]:
    """Clean batches on a small pool, holding at most a few raw batches at a time."""
    done: list[_Cleaned] = []
    rows = 0
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(_clean_batch, batch))
            if len(pending) > _WORKERS:
                done.append(pending.popleft().result())
                rows += done[-1].rows
                on_rows(rows)
        done.extend(future.result() for future in pending)
    on_rows(sum(part.rows for part in done))
    return done


class _Throttled:
    """At most one progress line a second (and every phase change): a billion rows must not flood the log."""

    def __init__(self, report: Report):
        self.report, self.last = report, 0.0

    def __call__(self, phase: str, force: bool = False, **info: object) -> None:
        now = time.monotonic()
        if force or now - self.last >= 1.0:
            self.last = now
            self.report("data", PHASES.index(phase), len(PHASES), phase=phase, **info)


def _sorted_unique_pairs(table: pa.Table) -> tuple[pa.Table, int]:
    """The rows sorted by (input, target) with exact duplicates removed, and how many were removed."""
    order = pc.sort_indices(table, sort_keys=[("input", "ascending"), ("target", "ascending")])
    table = table.take(order).combine_chunks()
    if table.num_rows < 2:
        return table, 0
    inputs, targets = table.column("input").chunk(0), table.column("target").chunk(0)
    n = table.num_rows
    repeat = pc.and_(
        pc.equal(inputs.slice(1), inputs.slice(0, n - 1)), pc.equal(targets.slice(1), targets.slice(0, n - 1))
    )
    keep = pa.concat_arrays([pa.array([True]), pc.invert(repeat)])
    unique = table.filter(keep)
    return unique, n - unique.num_rows


def clean(
    split: str,
    batches: Iterator[pa.RecordBatch],
    dropped: dict[str, int],
    cfg: Config,
    on_rows: Callable[[int], None] = lambda rows: None,
) -> tuple[pa.Table, dict]:
    """Drop unusable rows (counted by reason in `dropped`), over-long inputs when so configured, and exact
    duplicates. Return the rows, sorted, and what was found: duplicates and over-long inputs.

    Lengths are counted in whitespace-separated words: the data stage runs before any tokenizer exists
    (the tiny model's is trained on this very data), and a word is at least one token.
    """
    parts = _clean_all(batches, on_rows)
    total = sum(p.rows for p in parts)
    invalid = {reason: sum(p.invalid[reason] for p in parts) for reason in INVALID}
    for reason, count in invalid.items():
        dropped[reason] = dropped.get(reason, 0) + count
    bad = sum(invalid.values())
    if bad == total:
        raise BadInputError(f"data.{split}: every row was dropped by cleaning ({invalid})")
    if bad / total > cfg.data.max_invalid_fraction:
        raise BadInputError(
            f"data.{split}: {bad} of {total} rows ({bad / total:.1%}) are null, empty or not text "
            f"({', '.join(f'{k} {v}' for k, v in invalid.items() if v)}), over data.max_invalid_fraction "
            f"{cfg.data.max_invalid_fraction:.1%}"
        )
    table = pa.concat_tables(p.table for p in parts)
    del parts
    too_long = pc.greater(table.column("input_words"), cfg.data.max_source_length)
    overlength = pc.sum(too_long).as_py() or 0
    if cfg.data.overlength == "drop":
        dropped["too_long"] = dropped.get("too_long", 0) + overlength
        table = table.filter(pc.invert(too_long))
        if table.num_rows == 0:
            raise BadInputError(f"data.{split}: every input is over data.max_source_length words")
    table, duplicates = _sorted_unique_pairs(table)
    return table, {"duplicates": duplicates, "overlength": overlength}


def _carve(train: pa.Table, cfg: Config, missing: list[str]) -> dict[str, pa.Table]:
    """Carve the `missing` splits out of train by data.split_seed; the rest stays train."""
    # Split on distinct normalized inputs, never on rows, so one input cannot land in two splits. The rows
    # are sorted, so the distinct inputs come in the same order from any file order: the seed decides.
    keys = pc.unique(train.column("norm"))
    sizes = {split: max(1, int(len(keys) * getattr(cfg.data, f"{split}_fraction"))) for split in missing}
    if len(keys) - sum(sizes.values()) < 1:
        raise BadInputError(f"data.train: {len(keys)} distinct inputs are too few to split off {' and '.join(missing)}")
    order = np.random.default_rng(cfg.data.split_seed).permutation(len(keys))
    out: dict[str, pa.Table] = {}
    taken = np.zeros(train.num_rows, dtype=bool)
    start = 0
    for split, size in sizes.items():
        mine = pc.is_in(train.column("norm"), value_set=keys.take(order[start : start + size])).to_numpy()
        out[split] = train.filter(mine)
        taken |= mine
        start += size
    out["train"] = train.filter(~taken)
    return out


LEAKAGE_EXAMPLES = 5  # inputs shown per pair of splits in the data card


def _leakage(tables: dict[str, pa.Table], carved: set[str], policy: str) -> dict:
    """No normalized input in two splits. Splits carved from one pool by input are apart by construction. A shared
    input leaves the split less evaluated (train, then validation; test is what the gate scores) under `drop`,
    and stops the stage under `fail`. Returns, per pair, how many inputs were shared and a few of them."""
    found: dict[str, dict] = {}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        if a in carved and b in carved:
            continue
        keys = pc.unique(tables[a].column("norm"))
        shared = keys.filter(pc.is_in(keys, value_set=pc.unique(tables[b].column("norm"))))
        if not len(shared):
            continue
        examples = shared.take(pc.sort_indices(shared)[:LEAKAGE_EXAMPLES]).to_pylist()
        if policy == "fail":
            raise BadInputError(
                f"data: {len(shared)} input(s) appear in both {a} and {b}, e.g. {examples[0]!r} "
                "(data.on_leakage: drop removes them from the less evaluated split)"
            )
        before = tables[a].num_rows
        tables[a] = tables[a].filter(pc.invert(pc.is_in(tables[a].column("norm"), value_set=shared)))
        found[f"{a}/{b}"] = {"inputs": len(shared), "rows_dropped_from": a, "rows": before - tables[a].num_rows,
                             "examples": examples}  # fmt: skip
    return found


def content_hash(splits: dict[str, pa.Table]) -> str:
    """sha256 over the cleaned (input, target) pairs of every split, in sorted order: the same data gives
    the same hash from any row order, any chunking, on any machine."""
    digest = hashlib.sha256()
    for split in SPLITS:
        table = splits[split].select(["input", "target"]).cast(pa.schema([("input", TEXT), ("target", TEXT)]))
        table = table.take(pc.sort_indices(table, sort_keys=[("input", "ascending"), ("target", "ascending")]))
        digest.update(split.encode() + b"\0" + table.num_rows.to_bytes(8, "little"))
        for column in table.columns:
            # All lengths, then all bytes: the hash cannot depend on where chunks happen to break.
            for chunk in column.chunks:
                digest.update(pc.binary_length(chunk).to_numpy().astype("<i8").tobytes())
            for chunk in column.chunks:
                offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[
                    chunk.offset : chunk.offset + len(chunk) + 1
                ]
                if len(chunk) and chunk.buffers()[2] is not None:
                    digest.update(memoryview(chunk.buffers()[2])[offsets[0] : offsets[-1]])
    return digest.hexdigest()


TOKEN_SAMPLE = 2_000  # texts per split and column whose tokens are counted: percentiles, not a census


def token_lengths(tables: dict[str, pa.Table], cfg: Config) -> dict | None:
    """Token-length percentiles by the base model's own tokenizer, on a seeded sample of every split, and
    the sampled share of inputs the tokenizer will truncate at data.max_source_length (or at the model's own
    limit, where that is lower).

    None for the tiny model, whose tokenizer fine_tune trains on this very data, and where the base's
    tokenizer cannot be loaded here (fine_tune, which needs the model too, reports that).
    """
    if cfg.model.base == TINY_BASE:
        return None
    try:
        from transformers import AutoConfig, AutoTokenizer

        from canaryflow.inference.predictor import input_limit

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.base)
        limit = input_limit(cfg.data.max_source_length, tokenizer, AutoConfig.from_pretrained(cfg.model.base))
    except Exception:  # noqa: BLE001 - any failure here only means no token statistics
        return None
    rng = np.random.default_rng(cfg.data.split_seed)
    stats: dict[str, dict] = {}
    over = sampled = 0
    for split in SPLITS:
        table = tables[split]
        picked = np.sort(rng.choice(table.num_rows, min(TOKEN_SAMPLE, table.num_rows), replace=False))
        stats[split] = {}
        for column in ("input", "target"):
            texts = table.column(column).take(picked).to_pylist()
            counts = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]])
            stats[split][column] = length_percentiles(counts)
            if column == "input":
                over += int((counts > limit).sum())
                sampled += len(counts)
    return {
        "tokenizer": cfg.model.base,
        "sample_per_split": TOKEN_SAMPLE,
        "lengths": stats,
        "max_source_tokens": limit,
        "inputs_over_max_source_length": round(over / max(sampled, 1), 4),
    }


def _write_splits(tables: dict[str, pa.Table], out: Path) -> int:
    """Write the splits; test rows that share an input become one row with all its references. Return the
    number of test inputs."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        pq.write_table(tables[split].select(["input", "target"]), out / f"{split}.parquet")
    test = tables["test"].select(["input", "target"])
    grouped = test.group_by("input", use_threads=False).aggregate([("target", "list")])
    grouped = grouped.rename_columns(["input", "references"]).sort_by("input")
    pq.write_table(grouped, out / "test.parquet")
    return grouped.num_rows


def prepare_data(
    cfg: Config,
    out_dir: str | Path,
    reference: Callable[[], tuple[str, dict] | None] = lambda: None,
    report: Report = progress.emit,
) -> dict:
    """Prepare the splits described by cfg.data into out_dir and return the data card.

    `reference` gives the champion's version and data card, to measure drift against; it is called only
    once the data has passed validation, so bad data never reaches the registry, not even to read it.
    Nothing is written to out_dir unless every check has passed. `report` receives progress (rows read).
    """
    show = _Throttled(report)
    if cfg.data.train is None and cfg.data.dataset is None:
        raise BadInputError("neither data.train nor data.dataset is set (the CLI fills in the demo task's files)")
    if cfg.data.dataset and any(getattr(cfg.data, s) for s in SPLITS):
        raise BadInputError("data: give either data.dataset or data.train/validation/test files, not both")
    dropped: dict[str, int] = {}
    found: dict[str, dict] = {}
    tables: dict[str, pa.Table] = {}
    for split in SPLITS:
        batches = split_batches(split, cfg)
        if batches is not None:
            show(split, force=True, rows=0)
            tables[split], found[split] = clean(
                split, batches, dropped, cfg, on_rows=lambda n, split=split: show(split, rows=n)
            )
            show(split, force=True, rows=tables[split].num_rows, kept="after cleaning")
    show("checks", force=True)
    missing = [split for split in ("test", "validation") if split not in tables]
    if missing:
        tables.update(_carve(tables["train"], cfg, missing))

    leakage = _leakage(tables, carved={"train", *missing} if missing else set(), policy=cfg.data.on_leakage)
    for split in SPLITS:
        if tables[split].num_rows < cfg.data.min_split_rows:
            raise BadInputError(
                f"data.{split}: {tables[split].num_rows} rows after cleaning, deduplication and leakage, "
                f"fewer than data.min_split_rows {cfg.data.min_split_rows}"
            )

    words = {
        split: {col: tables[split].column(f"{col}_words").to_numpy() for col in ("input", "target")} for split in SPLITS
    }
    profile = input_profile(tables["train"].column("input"), words["train"]["input"])
    drift_info = _drift(profile, reference(), cfg)
    show("write", force=True)
    test_inputs = _write_splits(tables, Path(out_dir))
    card = {
        "counts": {s: tables[s].num_rows for s in SPLITS},
        "test_inputs": test_inputs,
        "dropped": dropped,
        "duplicates": {split: f["duplicates"] for split, f in found.items()},
        "leakage": {"policy": cfg.data.on_leakage, "pairs": leakage},
        "overlength": {
            "limit_words": cfg.data.max_source_length,
            "policy": cfg.data.overlength,
            "rows": {split: f["overlength"] for split, f in found.items()},
        },
        "content_hash": content_hash(tables),
        "columns": {"input": cfg.data.input_column, "target": cfg.data.target_column},
        "lengths": {split: {col: length_percentiles(w) for col, w in cols.items()} for split, cols in words.items()},
        "token_lengths": token_lengths(tables, cfg),
        "profile": profile,
        "drift": drift_info,
    }
    write_card(card, Path(out_dir))
    report("data", len(PHASES), len(PHASES), rows=sum(card["counts"].values()))
    return card


def _drift(profile: dict, reference: tuple[str, dict] | None, cfg: Config) -> dict | None:
    if reference is None or "profile" not in reference[1]:
        return None
    version, ref_card = reference
    distance = drift(profile, ref_card["profile"])
    threshold = cfg.data.drift_threshold
    if threshold is not None and max(distance.values()) > threshold:
        worst = max(distance, key=distance.get)
        raise BadInputError(
            f"data: {worst} drift {distance[worst]:.3f} against champion version {version}'s training data "
            f"is over data.drift_threshold {threshold:.3f}"
        )
    return {
        "champion_version": version,
        "reference_hash": ref_card.get("content_hash", ""),
        "reference_length_histogram": ref_card["profile"]["length_histogram"],
        "distance": distance,
        "threshold": threshold,
    }


def read_pairs(data_dir: str | Path, split: str):
    """One prepared split as a pandas DataFrame (test: input and its list of references)."""
    import pandas as pd  # the stage itself runs on Arrow; its readers want pandas

    return pd.read_parquet(Path(data_dir) / f"{split}.parquet")
