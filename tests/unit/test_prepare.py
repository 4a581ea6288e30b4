import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canaryflow.config import load_config
from canaryflow.data.prepare import content_hash, normalized, prepare_data, read_pairs, word_counts
from canaryflow.errors import BadInputError
from tests.bad_data import CASES
from tests.conftest import demo_config


def test_prepare_writes_splits_and_card(prepared):
    out, card = prepared
    assert card["counts"]["train"] == 270 and card["counts"]["validation"] == 30
    assert card["test_inputs"] == 40 and card["counts"]["test"] == 80
    test = read_pairs(out, "test")
    assert len(test) == 40 and all(len(refs) == 2 for refs in test["references"])
    assert json.loads((out / "data_card.json").read_text()) == card


def test_content_hash_ignores_row_order(demo_files, tmp_path):
    rows = [json.loads(line) for line in demo_files["train"].read_text().splitlines()]
    shuffled = tmp_path / "train.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    files = dict(demo_files, train=shuffled)
    card = prepare_data(demo_config(files), tmp_path / "out")
    assert card["content_hash"] == prepare_data(demo_config(demo_files), tmp_path / "out2")["content_hash"]
    splits = {s: pq.read_table(tmp_path / "out" / f"{s}.parquet") for s in ("train", "validation")}
    assert content_hash(dict(splits, test=pa.table({"input": ["x"], "target": ["y"]}))) != card["content_hash"]
    # Chunking and string type are layout, not content.
    rechunked = {s: pa.Table.from_batches(t.to_batches(max_chunksize=7)) for s, t in splits.items()}
    test = pa.table({"input": ["x", "z"], "target": ["y", "w"]})
    small_strings = test.cast(pa.schema([("input", pa.string()), ("target", pa.string())]))
    assert content_hash(dict(splits, test=test)) == content_hash(dict(rechunked, test=small_strings))


def test_split_carved_from_train_keeps_inputs_apart(tmp_path):
    rows = [{"input": f"q{i % 80}", "target": f"a{i}"} for i in range(200)]  # several targets per input
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = demo_config({"train": path, "validation": path, "test": path}, "data.validation=null", "data.test=null")
    card = prepare_data(cfg, tmp_path / "out")
    inputs = {s: set(read_pairs(tmp_path / "out", s)["input"]) for s in ("train", "validation", "test")}
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["validation"]
    assert sum(card["counts"].values()) == 200


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cleaning_drops_and_counts_bad_rows(tmp_path, demo_files):
    rows = [
        {"input": "a b", "target": "c"},
        {"input": "  ", "target": "x"},
        {"input": "a b", "target": "c"},
        {"input": None, "target": "y"},
        {"input": 7, "target": "z"},
        {"input": "d", "target": "e"},
    ]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    cfg = demo_config(dict(demo_files, train=path), "data.max_invalid_fraction=0.6", "data.min_split_rows=1")
    card = prepare_data(cfg, tmp_path / "out")
    assert card["counts"]["train"] == 2
    assert card["dropped"] == {"null": 1, "not_text": 1, "empty": 1}
    assert card["duplicates"]["train"] == 1


def test_the_invalid_fraction_is_configurable(tmp_path, demo_files):
    rows = [{"input": f"q{i}", "target": "a"} for i in range(90)] + [{"input": None, "target": "a"}] * 10
    path = _jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(BadInputError, match=r"10 of 100 rows \(10.0%\)"):
        prepare_data(demo_config(dict(demo_files, train=path), "data.max_invalid_fraction=0.09"), tmp_path / "out")
    card = prepare_data(demo_config(dict(demo_files, train=path), "data.max_invalid_fraction=0.1"), tmp_path / "out2")
    assert card["dropped"]["null"] == 10 and card["counts"]["train"] == 90


@pytest.mark.parametrize("policy, kept", [("truncate", 12), ("drop", 10)])
def test_overlong_inputs_are_reported_then_truncated_or_dropped(tmp_path, demo_files, policy, kept):
    rows = [{"input": f"short {i}", "target": "t"} for i in range(10)]
    rows += [{"input": " ".join(["w"] * 40) + f" {i}", "target": "t"} for i in range(2)]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    cfg = demo_config(dict(demo_files, train=path), "data.max_source_length=30", f"data.overlength={policy}")
    card = prepare_data(cfg, tmp_path / "out")
    assert card["overlength"]["rows"]["train"] == 2 and card["overlength"]["policy"] == policy
    assert card["counts"]["train"] == kept
    assert card["dropped"].get("too_long", 0) == 12 - kept


def test_several_references_are_grouped_for_evaluation_only(tmp_path, demo_files):
    test_rows = [{"input": f"in {i}", "target": f"ref {i} {k}"} for i in range(10) for k in range(i % 3 + 1)]
    path = _jsonl(tmp_path / "test.jsonl", test_rows)
    card = prepare_data(demo_config(dict(demo_files, test=path)), tmp_path / "out")
    grouped = read_pairs(tmp_path / "out", "test").set_index("input")["references"]
    assert card["test_inputs"] == 10 and card["counts"]["test"] == len(test_rows)
    assert list(grouped["in 2"]) == ["ref 2 0", "ref 2 1", "ref 2 2"]
    assert list(grouped["in 3"]) == ["ref 3 0"]


def test_card_has_lengths_profile_and_markdown(prepared):
    out, card = prepared
    stats = card["lengths"]["train"]["input"]
    assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert abs(sum(card["profile"]["length_histogram"].values()) - 1) < 1e-9
    assert abs(sum(card["profile"]["vocabulary"].values()) - 1) < 1e-3
    markdown = (out / "data_card.md").read_text()
    assert markdown.startswith("# Data card") and card["content_hash"] in markdown


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data_is_one_line_and_nothing_is_written(tmp_path, demo_files, case):
    overrides = case.write(tmp_path, demo_files)
    with pytest.raises(BadInputError) as err:
        prepare_data(load_config(overrides=overrides), tmp_path / "out")
    assert str(err.value).startswith(case.message) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written downstream


def test_one_split_may_mix_formats(tmp_path, demo_files):
    rows = [{"input": f"mixed {i}", "target": f"t {i}"} for i in range(30)]
    _jsonl(tmp_path / "a.jsonl", rows[:10])
    pd.DataFrame(rows[10:20]).to_csv(tmp_path / "b.csv", index=False)
    pd.DataFrame(rows[20:]).to_parquet(tmp_path / "c.parquet", index=False)
    cfg = demo_config(demo_files)
    cfg.data.train = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv"), str(tmp_path / "c.parquet")]
    card = prepare_data(cfg, tmp_path / "out")
    assert card["counts"]["train"] == 30
    assert set(read_pairs(tmp_path / "out", "train")["input"]) == {r["input"] for r in rows}


def test_a_local_dataset_folder_loads_through_datasets(tmp_path):
    from canaryflow.config import load_config

    folder = tmp_path / "my-dataset"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(120)])
    _jsonl(folder / "test.jsonl", [{"q": f"held out {i}", "a": f"answer {i}"} for i in range(12)])
    cfg = load_config(overrides=[f"data.dataset={folder}", "data.input_column=q", "data.target_column=a"])
    card = prepare_data(cfg, tmp_path / "out")
    assert card["counts"]["test"] == 12  # the dataset's own test split
    assert card["counts"]["validation"] == 12 and card["counts"]["train"] == 108  # validation carved from train
    both = load_config(overrides=[f"data.dataset={folder}", "data.train=x.jsonl"])
    with pytest.raises(BadInputError, match="either data.dataset or data.train"):
        prepare_data(both, tmp_path / "out2")


def test_normalization_and_word_counts_are_vectorized_but_exact():
    texts = ["  Hello\tWorld  x", "a  b", "", "one", "A\n\nB c", " \r\n lead and trail \t", "x\u00a0y"]
    assert normalized(texts).to_pylist() == [" ".join(t.lower().split()) for t in texts[:6]] + ["x\u00a0y"]
    assert list(word_counts(texts))[:6] == [len(t.split()) for t in texts[:6]]


def test_inputs_in_two_given_splits_leave_train_and_the_test_split_stays_whole(tmp_path, demo_files):
    """A public benchmark's own split may share a few short inputs (e.g. "no") between train and test: by
    default they leave train, the data card counts them and shows them, and the split the gate scores is intact;
    `data.on_leakage: fail` stops the stage as before."""
    from canaryflow.data.card import render_markdown

    train = [json.loads(line) for line in demo_files["train"].read_text().splitlines()]
    test = [json.loads(line) for line in demo_files["test"].read_text().splitlines()]
    validation = [json.loads(line) for line in demo_files["validation"].read_text().splitlines()]
    shared = [{"input": "No", "target": "train says no"}, {"input": "  QUESTION 7 ", "target": "t"}]
    _jsonl(tmp_path / "train.jsonl", train + shared)
    _jsonl(tmp_path / "test.jsonl", test + [{"input": "no", "target": "test says no"}, {"input": "question 7",
                                                                                        "target": "x"}])  # fmt: skip
    _jsonl(tmp_path / "validation.jsonl", validation + [{"input": "question 7", "target": "y"}])
    files = {split: tmp_path / f"{split}.jsonl" for split in ("train", "validation", "test")}
    card = prepare_data(demo_config(files), tmp_path / "out")
    pairs = card["leakage"]["pairs"]
    assert pairs["train/test"] == {"inputs": 2, "rows_dropped_from": "train", "rows": 2,
                                   "examples": ["no", "question 7"]}  # fmt: skip
    assert pairs["validation/test"]["rows_dropped_from"] == "validation" and "train/validation" not in pairs
    assert card["counts"]["train"] == len(train) and card["counts"]["validation"] == len(validation)
    scored = read_pairs(tmp_path / "out", "test")
    assert {"no", "question 7"} <= {i.strip().lower() for i in scored["input"]}  # the gate's split is whole
    assert "'no', 'question 7'" in render_markdown(card) and "dropped from train" in render_markdown(card)
    with pytest.raises(BadInputError, match=r"^data: 2 input\(s\) appear in both train and test, e.g. 'no'"):
        prepare_data(demo_config(files, "data.on_leakage=fail"), tmp_path / "failed")
    assert not (tmp_path / "failed").exists()
