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
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

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


def _format_of(files: list[Path], split: str) -> tuple[str, dict]:
    suffixes = {p.suffix.lower() for p in files}
    unknown = suffixes - set(_FORMATS)
    if unknown:
        raise BadInputError(
            f"data.{split}: unknown format {sorted(unknown)[0]!r}; use one of {', '.join(sorted(_FORMATS))}"
        )
    builders = {_FORMATS[s] for s in suffixes}
    if len(builders) > 1 or (".tsv" in suffixes and len(suffixes) > 1):
        raise BadInputError(f"data.{split}: mixed formats {sorted(suffixes)}; give one format per split")
    kwargs = {"delimiter": "\t"} if ".tsv" in suffixes else {}
    return builders.pop(), kwargs


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


def load_split(patterns: list[str], split: str, cfg: Config) -> pd.DataFrame:
    """Load one split's files through datasets.load_dataset and return its input/target columns."""
    import datasets

    files = resolve_files(patterns, split)
    builder, kwargs = _format_of(files, split)
    for path in files:
        sniff(path, split)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="canaryflow-hf-cache-") as cache:
        try:
            ds = datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split="train", cache_dir=cache, **kwargs
            )
        except Exception as exc:  # datasets raises many types for unreadable files; all are bad input
            if "corresponds to no data" in str(exc):  # a header-only CSV, or JSON with no records
                raise BadInputError(f"data.{split}: no rows in {', '.join(f.name for f in files)}") from None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInputError(f"data.{split}: cannot read {files[0].name}: {reason}") from None
        frame = ds.to_pandas()
    wanted = [cfg.data.input_column, cfg.data.target_column]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise BadInputError(
            f"data.{split}: missing column {missing[0]!r}; the columns are {', '.join(map(str, frame.columns))}"
        )
    frame = frame[wanted].rename(columns={cfg.data.input_column: "input", cfg.data.target_column: "target"})
    if frame.empty:
        raise BadInputError(f"data.{split}: no rows in {', '.join(f.name for f in files)}")
    return frame


def normalize(text: str) -> str:
    """The form used to compare inputs across splits: case and whitespace do not make a new input."""
    return " ".join(text.lower().split())


def _word_counts(texts: pd.Series) -> pd.Series:
    return texts.str.split().str.len()


def clean(frame: pd.DataFrame, split: str, dropped: dict[str, int], cfg: Config) -> tuple[pd.DataFrame, dict]:
    """Drop unusable rows (counted by reason in `dropped`), over-long inputs when so configured, and exact
    duplicates. Return the rows and what was found: duplicates and over-long inputs.

    Lengths are counted in whitespace-separated words: the data stage runs before any tokenizer exists
    (the tiny model's is trained on this very data), and a word is at least one token.
    """
    total = len(frame)
    null = frame["input"].isna() | frame["target"].isna()
    is_text = frame["input"].map(lambda v: isinstance(v, str)) & frame["target"].map(lambda v: isinstance(v, str))
    frame = frame[is_text].copy()
    frame["input"] = frame["input"].str.strip()
    frame["target"] = frame["target"].str.strip()
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


def _split_by_input(frame: pd.DataFrame, cfg: Config) -> dict[str, pd.DataFrame]:
    # Split on distinct normalized inputs, never on rows, so one input cannot land in two splits.
    keys = sorted(set(frame["input"].map(normalize)))
    random.Random(cfg.data.split_seed).shuffle(keys)
    n_test = max(1, int(len(keys) * cfg.data.test_fraction))
    n_val = max(1, int(len(keys) * cfg.data.validation_fraction))
    if len(keys) - n_test - n_val < 1:
        raise BadInputError(f"data.train: {len(keys)} distinct inputs are too few to split off validation and test")
    assign = {k: "test" for k in keys[:n_test]}
    assign.update({k: "validation" for k in keys[n_test : n_test + n_val]})
    split_of = frame["input"].map(normalize).map(lambda k: assign.get(k, "train"))
    return {s: frame[split_of == s].reset_index(drop=True) for s in SPLITS}


def content_hash(splits: dict[str, pd.DataFrame]) -> str:
    """sha256 over the sorted cleaned rows: the same data gives the same hash on any machine and row order."""
    digest = hashlib.sha256()
    for split in SPLITS:
        rows = sorted(zip(splits[split]["input"], splits[split]["target"]))
        digest.update(json.dumps([split, rows], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def prepare_data(
    cfg: Config, out_dir: str | Path, reference: Callable[[], tuple[str, dict] | None] = lambda: None
) -> dict:
    """Prepare the splits described by cfg.data into out_dir and return the data card.

    `reference` gives the champion's version and data card, to measure drift against; it is called only
    once the data has passed validation, so bad data never reaches the registry, not even to read it.
    """
    if cfg.data.train is None:
        raise BadInputError("data.train is not set (the CLI fills it with the demo task's files)")
    out = Path(out_dir)
    dropped: dict[str, int] = {}
    found: dict[str, dict] = {}
    splits: dict[str, pd.DataFrame] = {}
    given = {s: getattr(cfg.data, s) for s in SPLITS}
    for split, patterns in given.items():
        if patterns:
            splits[split], found[split] = clean(load_split(patterns, split, cfg), split, dropped, cfg)
    if not given["validation"] or not given["test"]:
        carved = _split_by_input(splits["train"], cfg)
        splits["train"] = carved["train"]
        for split in ("validation", "test"):
            splits.setdefault(split, carved[split])

    for split in SPLITS:
        if len(splits[split]) < cfg.data.min_split_rows:
            raise BadInputError(
                f"data.{split}: {len(splits[split])} rows after cleaning and deduplication, "
                f"fewer than data.min_split_rows {cfg.data.min_split_rows}"
            )
    seen = {s: set(splits[s]["input"].map(normalize)) for s in SPLITS}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        shared = seen[a] & seen[b]
        if shared:
            raise BadInputError(f"data: {len(shared)} input(s) appear in both {a} and {b}, e.g. {sorted(shared)[0]!r}")

    profile = input_profile(splits["train"]["input"])
    drift_info = _drift(profile, reference(), cfg)
    out.mkdir(parents=True, exist_ok=True)
    splits["train"].to_parquet(out / "train.parquet", index=False)
    splits["validation"].to_parquet(out / "validation.parquet", index=False)
    grouped = splits["test"].groupby("input", sort=True)["target"].agg(list).reset_index()
    grouped.rename(columns={"target": "references"}).to_parquet(out / "test.parquet", index=False)

    card = {
        "counts": {s: int(len(splits[s])) for s in SPLITS},
        "test_inputs": int(len(grouped)),
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
            split: {col: length_percentiles(_word_counts(splits[split][col])) for col in ("input", "target")}
            for split in SPLITS
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
