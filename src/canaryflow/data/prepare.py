"""Load, validate, clean and split the data; write parquet splits and a data card.

Output layout (the KFP `Dataset` artifact is this directory):
  train.parquet, validation.parquet   columns input, target (one row per pair)
  test.parquet                        columns input, references (all references of one input grouped)
  data_card.json                      counts, drops by reason, duplicates, content hash
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from canaryflow.config import Config
from canaryflow.data.card import drift, input_profile, length_percentiles, write_card
from canaryflow.errors import BadInputError

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "validation", "test")


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


def _group_by_format(files: list[Path], split: str) -> dict[tuple[str, str], list[Path]]:
    """Files of one split grouped by datasets builder (and delimiter); a split may mix formats."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in files:
        suffix = path.suffix.lower()
        if suffix not in _FORMATS:
            raise BadInputError(
                f"data.{split}: unknown format {suffix or path.name!r}; use one of {', '.join(sorted(_FORMATS))}"
            )
        groups.setdefault((_FORMATS[suffix], "\t" if suffix == ".tsv" else ","), []).append(path)
    return groups


_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"


def sniff(path: Path, split: str) -> None:
    """Refuse a file that cannot be what its name says, with the reason, before any parser sees it."""
    with open(path, "rb") as handle:
        head = handle.read(4)
        if not head:
            raise BadInputError(f"data.{split}: file is empty: {path.name}")
        if head[:2] == _GZIP_MAGIC:
            raise BadInputError(f"data.{split}: {path.name} is gzip-compressed; decompress it first")
        if path.suffix.lower() == ".parquet":
            if head != _PARQUET_MAGIC:
                raise BadInputError(f"data.{split}: {path.name} is not a parquet file")
            return
        # Text formats must be UTF-8; decode incrementally so a large file is never held at once.
        handle.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
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


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _select_columns(frame: pd.DataFrame, split: str, cfg: Config, where: str) -> pd.DataFrame:
    wanted = [cfg.data.input_column, cfg.data.target_column]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise BadInputError(
            f"data.{split}: missing column {missing[0]!r}; the columns are {', '.join(map(str, frame.columns))}"
        )
    if frame.empty:
        raise BadInputError(f"data.{split}: no rows in {where}")
    # Columns come back as string (JSON) or large_string (CSV, parquet); as Python text they cannot clash.
    return frame[wanted].rename(columns={cfg.data.input_column: "input", cfg.data.target_column: "target"})


def load_split(patterns: list[str], split: str, cfg: Config) -> pd.DataFrame:
    """Load one split's files through datasets.load_dataset and return its input/target columns."""
    import datasets

    files = resolve_files(patterns, split)
    groups = _group_by_format(files, split)
    for path in files:
        sniff(path, split)
    datasets.disable_progress_bars()
    frames = []
    with tempfile.TemporaryDirectory(prefix="canaryflow-hf-cache-") as cache:
        for (builder, delimiter), group in groups.items():
            names = ", ".join(f.name for f in group)
            kwargs = {"delimiter": delimiter} if builder == "csv" else {}
            try:
                ds = datasets.load_dataset(
                    builder, data_files=[str(f) for f in group], split="train", cache_dir=cache, **kwargs
                )
            except Exception as exc:  # datasets raises many types for unreadable files; all are bad input
                if "corresponds to no data" in str(exc):  # a header-only CSV, or JSON with no records
                    raise BadInputError(f"data.{split}: no rows in {names}") from None
                raise BadInputError(f"data.{split}: cannot read {group[0].name}: {_first_line(exc)}") from None
            frames.append(_select_columns(ds.to_pandas(), split, cfg, names))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def load_dataset_split(split: str, cfg: Config) -> pd.DataFrame | None:
    """One split of data.dataset (a hub id, or a local dataset folder), or None when it has no such split."""
    import datasets

    name = cfg.data.dataset_splits.get(split, split)
    datasets.disable_progress_bars()
    try:
        available = datasets.get_dataset_split_names(cfg.data.dataset, cfg.data.dataset_config)
    except Exception as exc:  # offline, unknown id, private repo: say which, in one line
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1)" if offline else _first_line(exc)
        raise BadInputError(f"data.dataset {cfg.data.dataset!r} cannot be loaded: {why}") from None
    if name not in available:
        if split == "train":
            raise BadInputError(f"data.dataset {cfg.data.dataset!r} has no split {name!r}; it has {available}")
        return None
    try:
        ds = datasets.load_dataset(cfg.data.dataset, cfg.data.dataset_config, split=name)
    except Exception as exc:
        raise BadInputError(f"data.dataset {cfg.data.dataset!r} split {name!r}: {_first_line(exc)}") from None
    return _select_columns(ds.to_pandas(), split, cfg, f"{cfg.data.dataset} [{name}]")


# Runs of two or more whitespace characters, or any whitespace that is not a plain space: replacing just
# these by one space equals collapsing every run of whitespace, and is several times cheaper in RE2.
_WHITESPACE_RUN = r"\s\s+|[\t\n\r\f\v]"


def _arrow(texts: pd.Series) -> pa.Array:
    # pandas' own string methods fall back to one Python call per row here; Arrow's kernels do not.
    return pa.array(texts, type=pa.large_string(), from_pandas=True)


def _collapse(texts: pd.Series) -> pa.Array:
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(_arrow(texts), _WHITESPACE_RUN, " "))


def normalized(texts: pd.Series) -> pd.Series:
    """The form used to compare inputs across splits: case and whitespace do not make a new input."""
    return pd.Series(pd.arrays.ArrowExtensionArray(pc.utf8_lower(_collapse(texts))), index=texts.index)


def _word_counts(texts: pd.Series) -> pd.Series:
    """Whitespace-separated words: the spaces of the collapsed text, plus one where there is any text."""
    collapsed = _collapse(texts)
    counts = pc.if_else(pc.equal(pc.utf8_length(collapsed), 0), 0, pc.add(pc.count_substring(collapsed, " "), 1))
    return pd.Series(counts.to_numpy(zero_copy_only=False), index=texts.index)


def _is_text(column: pd.Series) -> pd.Series:
    if pd.api.types.is_string_dtype(column.dtype) and column.dtype != object:
        return column.notna()  # a typed string column holds only text and nulls
    return column.map(lambda value: isinstance(value, str))


def clean(frame: pd.DataFrame, split: str, dropped: dict[str, int], cfg: Config) -> tuple[pd.DataFrame, dict]:
    """Drop unusable rows (counted by reason in `dropped`), over-long inputs when so configured, and exact
    duplicates. Return the rows and what was found: duplicates and over-long inputs.

    Lengths are counted in whitespace-separated words: the data stage runs before any tokenizer exists
    (the tiny model's is trained on this very data), and a word is at least one token.
    """
    total = len(frame)
    null = frame["input"].isna() | frame["target"].isna()
    is_text = _is_text(frame["input"]) & _is_text(frame["target"])
    frame = frame[is_text].copy()
    for column in ("input", "target"):
        frame[column] = pd.arrays.ArrowExtensionArray(pc.utf8_trim_whitespace(_arrow(frame[column])))
    empty = (frame["input"] == "") | (frame["target"] == "")
    invalid = {"null": int(null.sum()), "not_text": int((~is_text & ~null).sum()), "empty": int(empty.sum())}
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
    frame = frame[~empty]
    too_long = _word_counts(frame["input"]) > cfg.data.max_source_length
    if cfg.data.overlength == "drop":
        dropped["too_long"] = dropped.get("too_long", 0) + int(too_long.sum())
        frame = frame[~too_long]
        if frame.empty:
            raise BadInputError(f"data.{split}: every input is over data.max_source_length words")
    before = len(frame)
    frame = frame.drop_duplicates(subset=["input", "target"]).reset_index(drop=True)
    return frame, {"duplicates": before - len(frame), "overlength": int(too_long.sum())}


def _seeded_order(keys: pd.Series, seed: int) -> pd.Series:
    """The keys in a pseudo-random order fixed by the seed, the same on every machine (a seeded shuffle
    that needs no Python loop over a million keys)."""
    hash_key = hashlib.md5(str(seed).encode()).hexdigest()[:16]
    order = pd.util.hash_pandas_object(keys, index=False, hash_key=hash_key).to_numpy().argsort(kind="stable")
    return keys.iloc[order].reset_index(drop=True)


def _split_by_input(frame: pd.DataFrame, cfg: Config, missing: list[str]) -> dict[str, pd.DataFrame]:
    """Carve the `missing` splits out of train by data.split_seed; the rest stays train."""
    # Split on distinct normalized inputs, never on rows, so one input cannot land in two splits.
    norm = normalized(frame["input"])
    # The hash order does not depend on the keys' order, so they need no sorting first.
    keys = _seeded_order(norm.drop_duplicates().reset_index(drop=True), cfg.data.split_seed)
    sizes = {split: max(1, int(len(keys) * getattr(cfg.data, f"{split}_fraction"))) for split in missing}
    if len(keys) - sum(sizes.values()) < 1:
        raise BadInputError(f"data.train: {len(keys)} distinct inputs are too few to split off {' and '.join(missing)}")
    out: dict[str, pd.DataFrame] = {}
    taken = pd.Series(False, index=frame.index)
    start = 0
    for split, size in sizes.items():
        mine = norm.isin(keys.iloc[start : start + size])
        out[split] = frame[mine].reset_index(drop=True)
        taken |= mine
        start += size
    out["train"] = frame[~taken].reset_index(drop=True)
    return out


def content_hash(splits: dict[str, pd.DataFrame]) -> str:
    """sha256 over the sorted per-row hashes of the cleaned rows: the same data gives the same hash in any
    row order and on any machine (pandas' row hash is SipHash with a fixed key, on the UTF-8 bytes)."""
    digest = hashlib.sha256()
    for split in SPLITS:
        rows = splits[split][["input", "target"]].astype("str")
        row_hashes = pd.util.hash_pandas_object(rows, index=False).to_numpy()
        digest.update(split.encode() + b"\0" + np.sort(row_hashes).astype("<u8").tobytes())
    return digest.hexdigest()


def prepare_data(
    cfg: Config, out_dir: str | Path, reference: Callable[[], tuple[str, dict] | None] = lambda: None
) -> dict:
    """Prepare the splits described by cfg.data into out_dir and return the data card.

    `reference` gives the champion's version and data card, to measure drift against; it is called only
    once the data has passed validation, so bad data never reaches the registry, not even to read it.
    """
    if cfg.data.train is None and cfg.data.dataset is None:
        raise BadInputError("neither data.train nor data.dataset is set (the CLI fills in the demo task's files)")
    out = Path(out_dir)
    dropped: dict[str, int] = {}
    found: dict[str, dict] = {}
    splits: dict[str, pd.DataFrame] = {}
    if cfg.data.dataset and any(getattr(cfg.data, s) for s in SPLITS):
        raise BadInputError("data: give either data.dataset or data.train/validation/test files, not both")
    for split in SPLITS:
        if cfg.data.dataset:
            raw = load_dataset_split(split, cfg)
        else:
            patterns = getattr(cfg.data, split)
            raw = load_split(patterns, split, cfg) if patterns else None
        if raw is not None:
            splits[split], found[split] = clean(raw, split, dropped, cfg)
    missing = [split for split in ("test", "validation") if split not in splits]
    if missing:
        splits.update(_split_by_input(splits["train"], cfg, missing))

    for split in SPLITS:
        if len(splits[split]) < cfg.data.min_split_rows:
            raise BadInputError(
                f"data.{split}: {len(splits[split])} rows after cleaning and deduplication, "
                f"fewer than data.min_split_rows {cfg.data.min_split_rows}"
            )
    seen = {s: normalized(splits[s]["input"]).drop_duplicates() for s in SPLITS}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        shared = seen[a][seen[a].isin(seen[b])]
        if len(shared):
            example = shared.sort_values().iloc[0]
            raise BadInputError(f"data: {len(shared)} input(s) appear in both {a} and {b}, e.g. {example!r}")

    counts = {split: {col: _word_counts(splits[split][col]) for col in ("input", "target")} for split in SPLITS}
    profile = input_profile(splits["train"]["input"], counts["train"]["input"])
    drift_info = _drift(profile, reference(), cfg)
    out.mkdir(parents=True, exist_ok=True)
    splits["train"].to_parquet(out / "train.parquet", index=False)
    splits["validation"].to_parquet(out / "validation.parquet", index=False)
    # Grouped in Arrow (pandas' list aggregation is a Python loop) and written without pandas metadata,
    # which would record an Arrow list dtype that pandas cannot read back.
    test_table = pa.table({"input": _arrow(splits["test"]["input"]), "target": _arrow(splits["test"]["target"])})
    grouped = test_table.group_by("input", use_threads=False).aggregate([("target", "list")])
    grouped = grouped.rename_columns(["input", "references"]).sort_by("input")
    pq.write_table(grouped, out / "test.parquet")

    card = {
        "counts": {s: int(len(splits[s])) for s in SPLITS},
        "test_inputs": grouped.num_rows,
        "dropped": dropped,
        "duplicates": {split: f["duplicates"] for split, f in found.items()},
        "overlength": {
            "limit_words": cfg.data.max_source_length,
            "policy": cfg.data.overlength,
            "rows": {split: f["overlength"] for split, f in found.items()},
        },
        "content_hash": content_hash(splits),
        "columns": {"input": cfg.data.input_column, "target": cfg.data.target_column},
        "lengths": {
            split: {col: length_percentiles(counts[split][col]) for col in ("input", "target")} for split in SPLITS
        },
        "profile": profile,
        "drift": drift_info,
    }
    write_card(card, out)
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
        "distance": distance,
        "threshold": threshold,
    }


def read_pairs(data_dir: str | Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(data_dir) / f"{split}.parquet")
