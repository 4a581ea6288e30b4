"""The data card: what the data stage kept and dropped, how long the texts are, and how the inputs have
moved since the data the serving champion was trained on.

The input profile (a length histogram on fixed bins and the vocabulary's top words) is stored in every
card, so that any two cards can be compared the same way: drift is the Jensen-Shannon distance between
their distributions (0: identical, 1: disjoint).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

LENGTH_BINS = (0, 4, 8, 16, 32, 64, 128, 256, 512)  # words; fixed, so histograms from any run line up
TOP_WORDS = 500
OTHER = "<other>"


def length_percentiles(lengths) -> dict[str, float]:
    """Nearest-rank percentiles (as `stats.percentile`, vectorized: a split may hold millions of rows)."""
    values = np.sort(np.asarray(lengths))
    if not len(values):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    stats = {f"p{q}": int(values[max(1, math.ceil(q / 100 * len(values))) - 1]) for q in (50, 90, 99)}
    return {**stats, "max": int(values[-1]), "mean": round(float(values.mean()), 2)}


# The input log masks these before writing (serving/inputlog.py); the vocabulary profile counts them masked
# too, so a profile of logged inputs and one of raw training inputs measure the same thing.
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
NUMBER = re.compile(r"\d+")
EMAIL_MASK, NUMBER_MASK = "<email>", "<num>"


def mask_text(text: str, emails: bool = True, numbers: bool = True) -> str:
    """E-mail addresses and digit runs replaced by placeholders; no whitespace is added or removed, so word
    counts (and the length histogram) are those of the original text."""
    if emails:
        text = EMAIL.sub(EMAIL_MASK, text)
    if numbers:
        text = NUMBER.sub(NUMBER_MASK, text)
    return text


PROFILE_SAMPLE = 20_000  # inputs whose words make the vocabulary profile: plenty for a distance, cheap at 1M rows


def _bin_labels() -> list[str]:
    return [f"{low}-{high - 1}" for low, high in zip(LENGTH_BINS, LENGTH_BINS[1:])] + [f"{LENGTH_BINS[-1]}+"]


def input_profile(texts, word_counts) -> dict[str, dict[str, float]]:
    """Length histogram (all inputs) and top-word frequencies (a seeded sample), each as shares summing to 1.

    `texts` is any sequence of strings (a list, or an Arrow array); `word_counts` has one count per text.
    """
    if len(texts) > PROFILE_SAMPLE:
        picked = np.sort(np.random.default_rng(0).choice(len(texts), PROFILE_SAMPLE, replace=False))
        sample = texts.take(picked).to_pylist() if hasattr(texts, "take") else [texts[i] for i in picked]
    else:
        sample = texts.to_pylist() if hasattr(texts, "to_pylist") else list(texts)
    words = _word_counts(sample)
    n_words = max(sum(words.values()), 1)
    top = {word: count / n_words for word, count in words.most_common(TOP_WORDS)}
    top[OTHER] = max(0.0, 1.0 - sum(top.values()))
    return {
        "length_histogram": length_histogram(word_counts),
        "vocabulary": {word: round(share, 6) for word, share in top.items()},
    }


def length_histogram(word_counts) -> dict[str, float]:
    """Shares of the inputs per fixed length bin (words), empty bins left out."""
    counts = np.asarray(word_counts)
    total = max(len(counts), 1)
    edges = np.array([*LENGTH_BINS, np.iinfo(np.int64).max])
    per_bin = np.histogram(counts, bins=edges)[0]
    return {label: int(n) / total for label, n in sorted(zip(_bin_labels(), per_bin)) if n}


def _word_counts(texts) -> Counter:
    # Masked as the input log masks, so raw training inputs and logged inputs count the same words.
    return Counter(word for t in texts for word in mask_text(t).lower().split())


def profile_against(texts: list[str], reference: dict) -> dict[str, dict[str, float]]:
    """The input profile of `texts` on the reference profile's own keys: every word outside the reference's top
    words counts as <other>, as it did when the reference was taken. Comparing two top-word lists instead
    would call a word new whenever it was merely rarer than the reference's cut-off."""
    lengths = length_histogram([len(t.split()) for t in texts])
    known = set(reference["vocabulary"]) - {OTHER}
    words = _word_counts(texts)
    total = max(sum(words.values()), 1)
    vocabulary = {word: words[word] / total for word in known if words[word]}
    vocabulary[OTHER] = sum(n for word, n in words.items() if word not in known) / total
    return {"length_histogram": lengths, "vocabulary": vocabulary}


def js_distance(p: dict[str, float], q: dict[str, float]) -> float:
    """Jensen-Shannon distance (base 2, so in [0, 1]) between two discrete distributions given as dicts."""
    keys = set(p) | set(q)
    p_sum, q_sum = sum(p.values()) or 1.0, sum(q.values()) or 1.0
    divergence = 0.0
    for key in keys:
        a, b = p.get(key, 0.0) / p_sum, q.get(key, 0.0) / q_sum
        m = (a + b) / 2
        if a:
            divergence += 0.5 * a * math.log2(a / m)
        if b:
            divergence += 0.5 * b * math.log2(b / m)
    return round(math.sqrt(max(divergence, 0.0)), 6)


def drift(profile: dict, reference: dict) -> dict[str, float]:
    return {
        "input_length": js_distance(profile["length_histogram"], reference["length_histogram"]),
        "vocabulary": js_distance(profile["vocabulary"], reference["vocabulary"]),
    }


def render_markdown(card: dict) -> str:
    lines = [
        "# Data card",
        "",
        "| split | rows | duplicates removed | over-long inputs |",
        "| --- | ---: | ---: | ---: |",
    ]
    over = card.get("overlength", {}).get("rows", {})
    for split, rows in card["counts"].items():
        lines.append(f"| {split} | {rows} | {card['duplicates'].get(split, '-')} | {over.get(split, '-')} |")
    dropped = ", ".join(f"{reason}: {n}" for reason, n in card["dropped"].items() if n) or "none"
    lines += [
        "",
        f"- Test inputs: {card['test_inputs']} (rows sharing an input are scored against all their references).",
        f"- Dropped rows by reason: {dropped}.",
        f"- Content hash: `{card['content_hash']}`.",
        "",
    ]
    lines += _leakage_lines(card.get("leakage"))
    lines += ["## Lengths (words)", "", *_length_table(card.get("lengths", {}))]
    tokens = card.get("token_lengths")
    if tokens:
        sample = tokens["sample_per_split"]
        lines += ["", f"## Lengths (tokens of {tokens['tokenizer']}, up to {sample} sampled rows per split)", ""]
        lines += _length_table(tokens["lengths"])
        over = tokens["inputs_over_max_source_length"]
        # data.max_source_length, or the model's own limit where lower; cards written before it was recorded lack it
        limit = tokens.get("max_source_tokens", "data.max_source_length")
        lines += ["", f"- Sampled inputs over {limit} tokens (truncated in training): {over:.1%}."]
    drift_info = card.get("drift")
    lines += ["", "## Drift against the champion's training data", ""]
    if drift_info is None:
        lines.append("Nothing to compare with: no champion yet, or its data card has no input profile.")
    else:
        lines.append(
            f"Reference: version {drift_info['champion_version']} (data hash `{drift_info['reference_hash'][:12]}`)."
        )
        lines.append("")
        lines += [f"- {name}: Jensen-Shannon distance {value:.3f}" for name, value in drift_info["distance"].items()]
        if drift_info.get("threshold") is not None:
            lines.append(f"- threshold: {drift_info['threshold']:.3f}")
    return "\n".join(lines) + "\n"


def bar_length_shares(ax, series: dict[str, dict[str, float]]) -> None:
    """Side-by-side bars of input-length shares on the fixed bins, one series per named distribution."""
    labels = _bin_labels()
    width = 0.8 / len(series)
    for i, (name, shares) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [shares.get(label, 0.0) for label in labels], width=width, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("input length (words)")


def plot_input_lengths(card: dict, ax=None):
    """Input-length shares per bin, beside the champion's when the card has them: drift a person can see."""
    import matplotlib

    matplotlib.use("Agg")  # steps and the CLI write files; they never open a window
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    series = {"this data": card["profile"]["length_histogram"]}
    drift_info = card.get("drift")
    if drift_info and "reference_length_histogram" in drift_info:
        series[f"champion v{drift_info['champion_version']}'s data"] = drift_info["reference_length_histogram"]
    bar_length_shares(ax, series)
    ax.set_ylabel("share of training inputs")
    title = "input lengths"
    if drift_info:
        title += f" (Jensen-Shannon distance {drift_info['distance']['input_length']:.3f})"
    ax.set_title(title)
    ax.legend()
    ax.figure.tight_layout()
    return ax


def _leakage_lines(leakage: dict | None) -> list[str]:
    if not leakage or not leakage["pairs"]:
        return []
    lines = ["## Inputs in two splits", ""]
    for pair, found in leakage["pairs"].items():
        shown = ", ".join(repr(e) for e in found["examples"])
        lines.append(
            f"- {pair.replace('/', ' and ')}: {found['inputs']} input(s), {found['rows']} row(s) dropped from "
            f"{found['rows_dropped_from']} (data.on_leakage: {leakage['policy']}); e.g. {shown}."
        )
    return [*lines, ""]


def _length_table(lengths: dict[str, dict[str, dict]]) -> list[str]:
    rows = ["| split | column | p50 | p90 | p99 | max |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for split, columns in lengths.items():
        for column, s in columns.items():
            rows.append(f"| {split} | {column} | {s['p50']} | {s['p90']} | {s['p99']} | {s['max']} |")
    return rows


def write_card(card: dict, out: Path) -> None:
    (out / "data_card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    (out / "data_card.md").write_text(render_markdown(card), encoding="utf-8")
