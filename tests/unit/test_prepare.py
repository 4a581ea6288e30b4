import json

import pandas as pd
import pytest

from canaryflow.data.prepare import content_hash, prepare_data, read_pairs
from canaryflow.errors import BadInputError
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
    splits = {s: read_pairs(tmp_path / "out", s) for s in ("train", "validation")}
    splits["test"] = pd.DataFrame({"input": ["x"], "target": ["y"]})
    assert content_hash(splits) != card["content_hash"]


def test_split_carved_from_train_keeps_inputs_apart(tmp_path):
    rows = [{"input": f"q{i % 80}", "target": f"a{i}"} for i in range(200)]  # several targets per input
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = demo_config({"train": path, "validation": path, "test": path}, "data.validation=null", "data.test=null")
    card = prepare_data(cfg, tmp_path / "out")
    inputs = {s: set(read_pairs(tmp_path / "out", s)["input"]) for s in ("train", "validation", "test")}
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["validation"]
    assert sum(card["counts"].values()) == 200


def test_cleaning_drops_and_counts_bad_rows(tmp_path, demo_files):
    rows = [
        {"input": "a b", "target": "c"},
        {"input": "  ", "target": "x"},
        {"input": "a b", "target": "c"},
        {"input": None, "target": "y"},
        {"input": "d", "target": "e"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = prepare_data(demo_config(dict(demo_files, train=path)), tmp_path / "out")
    assert card["counts"]["train"] == 2
    assert card["dropped"] == {"not_text": 1, "empty": 1}
    assert card["duplicates"]["train"] == 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("train.jsonl", None, "file not found"),
        ("train.xml", "<a/>", "unknown format '.xml'"),
        ("train.jsonl", '{"input": "a", "target": "b"}\n{"input": "broken\n', "cannot read"),
        ("train.csv", "source,label\nx,y\n", "missing column 'input'; the columns are source, label"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, demo_files, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(BadInputError) as err:
        prepare_data(demo_config(dict(demo_files, train=path)), tmp_path / "out")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written downstream


def test_leakage_across_splits_is_refused(tmp_path, demo_files):
    with pytest.raises(BadInputError, match="appear in both train and test"):
        prepare_data(demo_config(dict(demo_files, test=demo_files["train"])), tmp_path / "out")
