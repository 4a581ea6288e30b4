import json

from canaryflow.data.synthetic import generate_drop, write_drop


def _names(rows):
    return {row["input"].split(" | ")[0] for row in rows}


def test_drop_is_deterministic_and_drops_differ():
    assert generate_drop(1, 100, 20) == generate_drop(1, 100, 20)
    assert generate_drop(1, 100, 20)["train"] != generate_drop(2, 100, 20)["train"]


def test_test_entities_never_appear_in_training():
    drop = generate_drop(3, 400, 60)
    test_names = _names(drop["test"])
    assert test_names
    assert not test_names & _names(drop["train"])
    assert not test_names & _names(drop["validation"])


def test_test_rows_carry_two_references_per_input():
    drop = generate_drop(1, 50, 10)
    by_input = {}
    for row in drop["test"]:
        by_input.setdefault(row["input"], []).append(row["target"])
    assert len(by_input) == 10
    assert all(len(refs) == 2 and refs[0] != refs[1] for refs in by_input.values())


def test_targets_follow_from_inputs():
    # The same record always yields the same canonical sentence, so the task is learnable.
    for row in generate_drop(1, 200, 4)["train"]:
        fields = dict(part.split(": ", 1) for part in row["input"].split(" | "))
        assert row["target"].startswith(fields["name"])
        assert fields["city"] in row["target"] and fields["job"] in row["target"]


def test_write_drop_writes_jsonl_once(tmp_path):
    paths = write_drop(tmp_path, 1, 60, 8)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 54 and set(rows[0]) == {"input", "target"}
    before = paths["train"].stat().st_mtime_ns
    write_drop(tmp_path, 1, 60, 8)
    assert paths["train"].stat().st_mtime_ns == before
