"""The shipped metric modules load offline by absolute path and agree with the reference libraries."""

import subprocess
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from canaryflow.evaluation.scoring import METRIC_MODULES, METRICS_DIR, load_metric, score

PREDICTIONS = ["the cat sat on the mat", "a dog barks loudly at night", "hello world"]
REFERENCES = [["the cat is on the mat", "a cat sat on the mat"], ["the dog barks at night"], ["hello world"]]


@pytest.mark.parametrize("name", METRIC_MODULES)
def test_modules_load_by_absolute_path(name):
    assert (METRICS_DIR / name / f"{name}.py").is_file()
    assert load_metric(name).compute(predictions=["a b"], references=[["a b"]])


def test_bleu_equals_sacrebleu_with_uneven_references():
    result = load_metric("corpus_bleu").compute(predictions=PREDICTIONS, references=REFERENCES)
    streams = [[r[0] for r in REFERENCES], [r[1] if len(r) > 1 else None for r in REFERENCES]]
    assert result["score"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, streams).score)
    single = sacrebleu.corpus_bleu(PREDICTIONS, [streams[0]]).score
    assert result["score"] > single  # the second reference counts


def test_chrf_equals_sacrebleu():
    streams = [[r[0] for r in REFERENCES], [r[1] if len(r) > 1 else None for r in REFERENCES]]
    result = load_metric("corpus_chrf").compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result["score"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, streams).score)


def test_rouge_is_the_exact_mean():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    expected = sum(scorer.score_multi(r, p)["rouge1"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)) / 3
    result = load_metric("rouge_mean").compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result["rouge1"] == pytest.approx(expected)
    assert set(result) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_token_f1_and_exact_match():
    result = load_metric("token_f1").compute(
        predictions=["The cat sat.", "red blue", "nothing"], references=[["the cat sat"], ["blue green"], ["x"]]
    )
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_score_reports_every_metric_on_a_0_to_100_scale():
    metrics = score(PREDICTIONS, REFERENCES)
    assert set(metrics) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "token_f1", "exact_match"}
    assert all(0 <= v <= 100 for v in metrics.values())
    perfect = score(["the cat sat on the mat today"], [["the cat sat on the mat today"]])
    assert perfect["bleu"] == pytest.approx(100) and perfect["exact_match"] == 100


def test_bleu_and_chrf_equal_the_sacrebleu_command_line_on_the_same_files(tmp_path):
    predictions = ["the cat sat on the mat", "a dog barked at night", "it rained all day long", "hello there"]
    references = [
        ["the cat sat on a mat", "a cat was on the mat"],
        ["the dog barked at night", "a dog was barking at night"],
        ["it rained the whole day", "rain fell all day"],
        ["hello there", "hi there"],
    ]
    (tmp_path / "hyp.txt").write_text("\n".join(predictions) + "\n")
    refs = []
    for k in range(2):
        refs.append(str(tmp_path / f"ref{k}.txt"))
        (tmp_path / f"ref{k}.txt").write_text("\n".join(r[k] for r in references) + "\n")
    ours = score(predictions, references)
    for metric in ("bleu", "chrf"):
        done = subprocess.run(
            [sys.executable, "-m", "sacrebleu", *refs, "-i", str(tmp_path / "hyp.txt"), "-m", metric, "-b", "-w", "4"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert round(ours[metric], 2) == round(float(done.stdout.strip()), 2), metric
