"""Load, validate, clean and split the data; write parquet splits and a data card.

Output layout (the KFP `Dataset` artifact is this directory):
  train.parquet, validation.parquet   columns input, target (one row per pair)
  test.parquet                        columns input, references (all references of one input grouped)
  data_card.json                      counts, drops by reason, duplicates, content hash
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import tempfile
from pathlib import Path

import pandas as pd

from canaryflow.config import Config
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


def load_split(patterns: list[str], split: str, cfg: Config) -> pd.DataFrame:
    """Load one split's files through datasets.load_dataset and return its input/target columns."""
    import datasets

    files = resolve_files(patterns, split)
    builder, kwargs = _format_of(files, split)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="canaryflow-hf-cache-") as cache:
        try:
            ds = datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split="train", cache_dir=cache, **kwargs
            )
        except Exception as exc:  # datasets raises many types for unreadable files; all are bad input
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


def clean(frame: pd.DataFrame, split: str, dropped: dict[str, int]) -> tuple[pd.DataFrame, int]:
    """Drop unusable rows (counted by reason in `dropped`) and exact duplicates; return rows and duplicates."""
    is_text = frame["input"].map(lambda v: isinstance(v, str)) & frame["target"].map(lambda v: isinstance(v, str))
    dropped["not_text"] = dropped.get("not_text", 0) + int((~is_text).sum())
    frame = frame[is_text].copy()
    frame["input"] = frame["input"].str.strip()
    frame["target"] = frame["target"].str.strip()
    empty = (frame["input"] == "") | (frame["target"] == "")
    dropped["empty"] = dropped.get("empty", 0) + int(empty.sum())
    frame = frame[~empty]
    before = len(frame)
    frame = frame.drop_duplicates(subset=["input", "target"]).reset_index(drop=True)
    if frame.empty:
        raise BadInputError(f"data.{split}: every row was dropped by cleaning ({dropped})")
    return frame, before - len(frame)


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


def prepare_data(cfg: Config, out_dir: str | Path) -> dict:
    """Prepare the splits described by cfg.data into out_dir and return the data card."""
    if cfg.data.train is None:
        raise BadInputError("data.train is not set (the CLI fills it with the demo task's files)")
    out = Path(out_dir)
    dropped: dict[str, int] = {}
    duplicates: dict[str, int] = {}
    splits: dict[str, pd.DataFrame] = {}
    given = {s: getattr(cfg.data, s) for s in SPLITS}
    for split, patterns in given.items():
        if patterns:
            splits[split], duplicates[split] = clean(load_split(patterns, split, cfg), split, dropped)
    if not given["validation"] or not given["test"]:
        carved = _split_by_input(splits["train"], cfg)
        splits["train"] = carved["train"]
        for split in ("validation", "test"):
            splits.setdefault(split, carved[split])

    seen = {s: set(splits[s]["input"].map(normalize)) for s in SPLITS}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        shared = seen[a] & seen[b]
        if shared:
            raise BadInputError(f"data: {len(shared)} input(s) appear in both {a} and {b}, e.g. {sorted(shared)[0]!r}")

    out.mkdir(parents=True, exist_ok=True)
    splits["train"].to_parquet(out / "train.parquet", index=False)
    splits["validation"].to_parquet(out / "validation.parquet", index=False)
    grouped = splits["test"].groupby("input", sort=True)["target"].agg(list).reset_index()
    grouped.rename(columns={"target": "references"}).to_parquet(out / "test.parquet", index=False)

    card = {
        "counts": {s: int(len(splits[s])) for s in SPLITS},
        "test_inputs": int(len(grouped)),
        "dropped": dropped,
        "duplicates": duplicates,
        "content_hash": content_hash(splits),
        "columns": {"input": cfg.data.input_column, "target": cfg.data.target_column},
    }
    (out / "data_card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    return card


def read_pairs(data_dir: str | Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(Path(data_dir) / f"{split}.parquet")
