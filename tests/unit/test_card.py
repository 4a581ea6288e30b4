"""Data card statistics and drift against the champion's training data."""

import pandas as pd
import pytest

from canaryflow.data.card import (
    drift,
    input_profile,
    js_distance,
    length_percentiles,
    mask_text,
    profile_against,
    render_markdown,
)
from canaryflow.data.prepare import prepare_data, read_pairs
from canaryflow.errors import BadInputError
from tests.conftest import demo_config


def test_js_distance_bounds():
    p = {"a": 0.5, "b": 0.5}
    assert js_distance(p, p) == 0
    assert js_distance(p, {"c": 1.0}) == pytest.approx(1.0)
    assert 0 < js_distance(p, {"a": 0.9, "b": 0.1}) < 1
    assert js_distance(p, {"a": 0.9, "b": 0.1}) == js_distance({"a": 0.9, "b": 0.1}, p)


def test_masks_keep_word_counts_and_the_profile_counts_masked_words():
    text = "Write to Ann.Lee+x@mail.example.org about order 42-7 by 5pm"
    assert mask_text(text) == "Write to <email> about order <num>-<num> by <num>pm"
    assert len(mask_text(text).split()) == len(text.split())
    raw = input_profile([text], [len(text.split())])
    masked = input_profile([mask_text(text)], [len(text.split())])
    assert raw == masked  # a logged (masked) input and a raw training input are measured alike


def test_profile_against_folds_words_outside_the_reference_into_other():
    reference = {"length_histogram": {"0-3": 1.0}, "vocabulary": {"a": 0.5, "b": 0.3, "<other>": 0.2}}
    profile = profile_against(["a a b c", "d"], reference)
    assert profile["vocabulary"] == {"a": 0.4, "b": 0.2, "<other>": 0.4}
    assert profile["length_histogram"] == {"0-3": 0.5, "4-7": 0.5}
    # A word rarer than the reference's cut-off is not "new": it was in <other> there too. Comparing top-word
    # lists instead makes "c" a word the reference never had.
    folded = drift(profile_against(["a b c"] * 10, reference), reference)["vocabulary"]
    listed = drift(input_profile(["a b c"] * 10, [3] * 10), reference)["vocabulary"]
    assert folded < 0.2 < 0.5 < listed


def test_length_percentiles():
    stats = length_percentiles(pd.Series(range(1, 101)))
    assert (stats["p50"], stats["p90"], stats["p99"], stats["max"]) == (50, 90, 99, 100)


def test_profile_of_shifted_inputs_drifts():
    base = pd.Series([f"name: person {i} | job: baker" for i in range(200)])
    same = pd.Series([f"name: person {i} | job: baker" for i in range(200, 400)])
    shifted = pd.Series([f"a much longer complaint about invoice {i} " * 6 for i in range(200)])

    def profile(texts):
        return input_profile(texts, texts.str.count(r"\S+"))

    close, far = drift(profile(same), profile(base)), drift(profile(shifted), profile(base))
    assert close["input_length"] == 0 and close["vocabulary"] < 0.6
    assert far["input_length"] > 0.9 and far["vocabulary"] > 0.9


def test_drift_against_the_champion_is_recorded_and_can_fail_the_run(prepared, demo_files, tmp_path):
    _, champion_card = prepared
    shifted = tmp_path / "train.jsonl"
    shifted.write_text(
        "".join(
            f'{{"input": "refund request {i} for order {i * 7} placed last week", "target": "ok"}}\n'
            for i in range(100)
        )
    )
    files = dict(demo_files, train=shifted)
    card = prepare_data(demo_config(files), tmp_path / "out", reference=lambda: ("4", champion_card))
    assert card["drift"]["champion_version"] == "4"
    assert card["drift"]["distance"]["vocabulary"] > 0.5
    assert "Jensen-Shannon distance" in render_markdown(card)
    with pytest.raises(BadInputError) as err:
        prepare_data(
            demo_config(files, "data.drift_threshold=0.3"), tmp_path / "o2", reference=lambda: ("4", champion_card)
        )
    assert "against champion version 4's training data is over data.drift_threshold 0.300" in str(err.value)
    assert not (tmp_path / "o2").exists()
    same = prepare_data(
        demo_config(demo_files, "data.drift_threshold=0.3"), tmp_path / "o3", reference=lambda: ("4", champion_card)
    )
    assert same["drift"]["distance"] == {"input_length": 0.0, "vocabulary": 0.0}


def test_the_reference_is_not_read_for_bad_data(tmp_path, demo_files):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")

    def reference():
        raise AssertionError("the registry must not be touched for bad data")

    with pytest.raises(BadInputError, match="file is empty"):
        prepare_data(demo_config(dict(demo_files, train=empty)), tmp_path / "out", reference=reference)


def test_token_lengths_come_from_the_base_models_tokenizer(trained, demo_files, tmp_path):
    from transformers import AutoTokenizer

    model_dir, _ = trained
    card = prepare_data(demo_config(demo_files, f"model.base={model_dir}", "data.max_source_length=8"), tmp_path / "o")
    tokens = card["token_lengths"]
    assert tokens["tokenizer"] == str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    longest = max(len(tokenizer(t)["input_ids"]) for t in read_pairs(tmp_path / "o", "test")["input"])
    assert tokens["lengths"]["test"]["input"]["max"] == longest  # the test split is under the sample size: all
    assert tokens["lengths"]["train"]["input"]["p50"] >= card["lengths"]["train"]["input"]["p50"]  # words <= tokens
    assert 0 < tokens["inputs_over_max_source_length"] <= 1
    assert "Lengths (tokens of" in render_markdown(card)
    assert prepare_data(demo_config(demo_files), tmp_path / "o2")["token_lengths"] is None  # tiny: no tokenizer yet


def test_input_lengths_plot_sets_the_data_beside_the_champions(prepared, demo_files, tmp_path):
    from canaryflow.data.card import LENGTH_BINS, plot_input_lengths

    _, champion_card = prepared
    alone = plot_input_lengths(champion_card)
    assert len(alone.patches) == len(LENGTH_BINS) and alone.get_legend_handles_labels()[1] == ["this data"]
    card = prepare_data(demo_config(demo_files), tmp_path / "o", reference=lambda: ("3", champion_card))
    both = plot_input_lengths(card)
    assert len(both.patches) == 2 * len(LENGTH_BINS)
    assert both.get_legend_handles_labels()[1] == ["this data", "champion v3's data"]
    assert "Jensen-Shannon distance 0.000" in both.get_title()  # the same data as the champion's
