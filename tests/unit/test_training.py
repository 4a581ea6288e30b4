import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig

from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.inference.predictor import Seq2SeqGenerator
from canaryflow.training import launch
from canaryflow.training.fine_tune import FINGERPRINT, fine_tune, training_arguments
from canaryflow.training.precision import Device, Precision, choose
from canaryflow.training.tokenizer import train_tokenizer
from tests.conftest import demo_config


def test_bpe_tokenizer_round_trips_templated_text():
    texts = ["name: Ada Xu | job: baker | city: Oslo | age: 30", "Ada Xu is a 30-year-old baker from Oslo."] * 20
    tok = train_tokenizer(texts, vocab_size=200)
    for text in texts[:2] + ["Zanzibar, aged 41, likes chess."]:
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_fine_tune_saves_safetensors_and_learns(trained):
    out, metrics = trained
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))  # weights only as safetensors
    assert load_file(out / "model.safetensors")
    assert metrics["steps"] == 40
    assert math.isfinite(metrics["val_loss"])
    assert metrics["final_loss"] < metrics["first_loss"]  # it learned something
    assert 0.5e6 < metrics["parameters"] < 2e6  # the ~1M-parameter tiny T5
    assert json.loads((out / "train_metrics.json").read_text()) == metrics


def test_generator_keeps_input_order_across_length_sorted_batches(trained):
    generator = Seq2SeqGenerator(trained[0])
    inputs = ["name: A | job: baker | city: Oslo | age: 30 | hobby: chess | pet: cat", "name: B", "name: C | age: 4"]
    batched = generator.generate(inputs, batch_size=2, max_new_tokens=8)
    one_by_one = [generator.generate([x], batch_size=1, max_new_tokens=8)[0] for x in inputs]
    assert batched == one_by_one
    assert all(isinstance(x, str) for x in batched)


@pytest.mark.parametrize(
    "requested, device, expected",
    [
        ("auto", Device(cuda=False), ("fp32", False)),
        ("auto", Device(cuda=True, bf16=True, capability=(9, 0), name="H100"), ("bf16", True)),
        ("auto", Device(cuda=True, bf16=True, capability=(8, 0), name="A100"), ("bf16", True)),
        ("auto", Device(cuda=True, bf16=False, capability=(7, 5), name="T4"), ("fp16", False)),
        ("auto", Device(cuda=True, bf16=False, capability=(7, 0), name="V100"), ("fp16", False)),
        ("fp16", Device(cuda=True, bf16=True, capability=(8, 6), name="A10"), ("fp16", True)),
        ("fp32", Device(cuda=True, bf16=True, capability=(8, 0), name="A100"), ("fp32", True)),
        ("fp32", Device(cuda=False), ("fp32", False)),
    ],
)
def test_precision_follows_the_device(requested, device, expected):
    chosen = choose(requested, device)
    assert (chosen.name, chosen.tf32) == expected
    flags = chosen.trainer_arguments()
    assert flags["bf16"] == (expected[0] == "bf16") and flags["fp16"] == (expected[0] == "fp16")


def test_tf32_can_be_turned_off_and_impossible_precisions_are_refused():
    assert choose("auto", Device(cuda=True, bf16=True, capability=(8, 0)), allow_tf32=False).tf32 is False
    with pytest.raises(BadInputError, match="needs a GPU"):
        choose("bf16", Device(cuda=False))
    with pytest.raises(BadInputError, match="T4 does not support bfloat16"):
        choose("bf16", Device(cuda=True, bf16=False, capability=(7, 5), name="T4"))


def test_training_arguments_come_from_config(demo_files, tmp_path):
    cfg = demo_config(
        demo_files,
        "train.lr_scheduler=cosine",
        "train.warmup_ratio=0.1",
        "train.gradient_accumulation_steps=4",
        "train.weight_decay=0.01",
        "train.label_smoothing=0.1",
        "train.max_grad_norm=0.5",
        "train.early_stopping_patience=2",
        "train.checkpoint_steps=50",
        "train.group_by_length=true",
    )
    args = training_arguments(cfg, 200, tmp_path, Precision("bf16", True), classify=False)
    assert args["lr_scheduler_type"] == "cosine" and args["warmup_steps"] == 20
    assert args["gradient_accumulation_steps"] == 4 and args["weight_decay"] == 0.01
    assert args["label_smoothing_factor"] == 0.1 and args["max_grad_norm"] == 0.5
    assert args["bf16"] and not args["fp16"] and args["tf32"]
    assert args["train_sampling_strategy"] == "group_by_length"  # length-grouped batches
    assert args["save_steps"] == args["eval_steps"] == 50 and args["load_best_model_at_end"]
    assert args["metric_for_best_model"] == "eval_loss" and args["greater_is_better"] is False
    with pytest.raises(BadInputError, match="early_stopping_patience needs checkpoint_steps"):
        demo_config(demo_files, "train.early_stopping_patience=2", "train.checkpoint_steps=0")


def test_nan_losses_stop_training_with_a_clear_error_and_save_nothing(prepared, demo_files, tmp_path):
    cfg = demo_config(demo_files, "train.max_steps=60", "train.fault_nan_after_step=5", "train.max_nonfinite=2")
    seen = []
    with pytest.raises(CanaryflowError) as err:
        fine_tune(cfg, prepared[0], tmp_path / "model", on_metrics=lambda step, m: seen.append((step, m)))
    message = str(err.value)
    assert re.fullmatch(
        r"training stopped: (\d+) non-finite losses and (\d+) non-finite gradient norms, over "
        r"train.max_nonfinite 2; nothing is registered",
        message,
    )
    assert sum(map(int, re.findall(r"\d+", message)[:2])) == 3  # stopped at the first count over the limit
    assert any(m["nonfinite_losses"] > 0 for _, m in seen)  # operators saw the counter rise
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_a_loss_that_does_not_fall_fails_the_did_it_learn_check(prepared, demo_files, tmp_path):
    cfg = demo_config(demo_files, "train.max_steps=20", "train.learning_rate=1e-9")
    with pytest.raises(CanaryflowError, match="training did not learn: loss .* is not below train.min_loss_ratio 0.95"):
        fine_tune(cfg, prepared[0], tmp_path / "model")
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_telemetry_reports_throughput_memory_and_health_counters(trained):
    _, metrics = trained
    assert metrics["tokens_per_second"] > 0 and metrics["samples_per_second"] > 0
    assert metrics["peak_memory_mb"] > 0 and metrics["precision"] == "fp32"
    assert metrics["nonfinite_losses"] == 0 and metrics["nonfinite_grad_norms"] == 0


_TRAIN_SCRIPT = """
import sys
from canaryflow.config import Config
from canaryflow.training.fine_tune import fine_tune
cfg = Config.from_json(open(sys.argv[1]).read())
fine_tune(cfg, sys.argv[2], sys.argv[3], sys.argv[4])
"""


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_last_checkpoint(prepared, demo_files, tmp_path):
    cfg = demo_config(demo_files, "train.max_steps=90", "train.checkpoint_steps=10", "train.checkpoint_limit=3")
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.model_dump_json())
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "model"
    args = [str(config_file), str(prepared[0]), str(out), str(checkpoints)]
    process = subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, *args], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (checkpoints / "checkpoint-30" / "trainer_state.json").is_file():
        assert process.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    # A checkpoint torn by the kill is what a real preemption leaves; the rerun must step back past it.
    torn = checkpoints / f"checkpoint-{killed_at + 10}"
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"global_st')

    metrics = fine_tune(cfg, prepared[0], out, checkpoints)
    assert metrics["resumed_from_step"] >= 30 and metrics["resumed_from_step"] == killed_at
    assert metrics["steps"] == 90  # the step counter carried on; it did not start again at 0
    assert metrics["final_loss"] < metrics["first_loss"]  # the first loss is the killed process's
    assert (out / "model.safetensors").is_file() and not checkpoints.exists()  # done: checkpoints cleared


@pytest.mark.slow
def test_checkpoints_from_other_training_are_not_resumed(prepared, demo_files, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-10").mkdir(parents=True)
    (checkpoints / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (checkpoints / FINGERPRINT).write_text("another config")
    cfg = demo_config(demo_files, "train.max_steps=20", "train.checkpoint_steps=10")
    metrics = fine_tune(cfg, prepared[0], tmp_path / "model", checkpoints)
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 20


def _reviews(count: int, offset: int) -> list[dict]:
    good = ["great", "lovely", "superb", "friendly", "tasty"]
    bad = ["awful", "cold", "rude", "bland", "dirty"]
    rows = []
    for i in range(offset, offset + count):
        words, label = (good, "positive") if i % 2 else (bad, "negative")
        rows.append({"text": f"visit {i}: the food was {words[i % 5]} and {words[(i // 5) % 5]}", "label": label})
    return rows


@pytest.mark.slow
def test_the_classification_path_trains_and_reports_macro_f1(tmp_path):
    from canaryflow.config import load_config
    from canaryflow.data.prepare import prepare_data

    for split, (count, offset) in {"train": (400, 0), "validation": (60, 1000), "test": (60, 2000)}.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _reviews(count, offset)))
    cfg = load_config(
        overrides=[
            *(f"data.{s}={tmp_path / f'{s}.jsonl'}" for s in ("train", "validation", "test")),
            "data.input_column=text",
            "data.target_column=label",
            "model.task=classification",
            "train.max_steps=80",
            "train.learning_rate=3e-3",
        ]
    )
    prepare_data(cfg, tmp_path / "data")
    metrics = fine_tune(cfg, tmp_path / "data", tmp_path / "model")
    assert metrics["task"] == "classification"
    assert metrics["val_macro_f1"] >= 0.9 and metrics["val_accuracy"] >= 0.9
    saved = AutoConfig.from_pretrained(tmp_path / "model")
    assert saved.id2label == {0: "negative", 1: "positive"}

    # Judged against a classifier champion, on macro-F1 and accuracy: asked for an improvement no retraining
    # can make (the champion is the same model), the gate fails with the statistics behind it.
    from canaryflow.evaluation.scoring import evaluate_models
    from canaryflow.inference.predictor import load_predictor

    cfg = load_config(
        overrides=[
            *(f"data.{s}={tmp_path / f'{s}.jsonl'}" for s in ("train", "validation", "test")),
            "model.task=classification",
            "gate.floors={macro_f1: 70.0}",
            "gate.non_inferiority={accuracy: 1.0}",
            "gate.improvement={macro_f1: 50.0}",
        ]
    )
    champion = ("1", load_predictor(tmp_path / "model", cfg.data.max_source_length))
    result = evaluate_models(cfg, tmp_path / "data", tmp_path / "model", champion, tmp_path / "evaluation")
    reasons = result["gate"]["reasons"]
    assert result["gate"]["passed"] is False
    assert any(r.startswith("FAIL macro_f1 vs champion") for r in reasons), reasons
    assert any(r.startswith("ok accuracy vs champion") for r in reasons), reasons
    assert set(result["comparisons"]) >= {"macro_f1", "accuracy"}


def _tiny_bert(where, words: list[str], positions: int) -> None:
    """A BERT-style classifier (learned absolute positions, token_type_ids, a word-level WordPiece vocabulary)
    small enough to train in seconds, saved as a pretrained base."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    tokenizer.save_pretrained(where)
    BertForSequenceClassification(config).save_pretrained(where)


def test_a_model_with_learned_positions_gets_no_longer_inputs_than_it_takes(tmp_path):
    """BERT-style bases (MiniLM among them) learn a fixed number of positions (512); data.max_source_length past
    it failed training, evaluation and serving alike with a tensor size error. Each cuts inputs at the model's
    limit instead, the data card counts against it, and the server refuses longer inputs by it."""
    from canaryflow.config import load_config
    from canaryflow.data.card import render_markdown
    from canaryflow.data.prepare import prepare_data
    from canaryflow.inference.predictor import load_predictor
    from canaryflow.rollout.local import post_json
    from tests.servers import model_server

    padding = " and then we walked home along the river"  # long inputs: 20 words and more, over 16 positions
    rows = {
        split: [dict(r, text=r["text"] + padding) for r in _reviews(count, offset)]
        for split, (count, offset) in {"train": (64, 0), "validation": (20, 1000), "test": (20, 2000)}.items()
    }
    for split, split_rows in rows.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    words = [w.strip(":") for split_rows in rows.values() for r in split_rows for w in r["text"].split()]
    _tiny_bert(tmp_path / "base", words, positions=16)
    cfg = load_config(
        overrides=[
            *(f"data.{s}={tmp_path / f'{s}.jsonl'}" for s in ("train", "validation", "test")),
            "data.input_column=text",
            "data.target_column=label",
            "data.max_source_length=128",
            f"model.base={tmp_path / 'base'}",
            "model.task=classification",
            "train.max_steps=4",
            "train.batch_size=8",
            "train.checkpoint_steps=0",
            "train.min_loss_ratio=null",
        ]
    )
    card = prepare_data(cfg, tmp_path / "data")
    assert card["token_lengths"]["max_source_tokens"] == 16
    assert card["token_lengths"]["inputs_over_max_source_length"] == 1.0  # every input is over 16 tokens
    assert "Sampled inputs over 16 tokens (truncated in training): 100.0%" in render_markdown(card)
    metrics = fine_tune(cfg, tmp_path / "data", tmp_path / "model")
    assert metrics["max_source_tokens"] == 16
    predictor = load_predictor(tmp_path / "model", cfg.data.max_source_length)
    assert predictor.max_source_length == 16
    long_inputs = [r["text"] for r in rows["test"]]
    assert set(predictor.generate(long_inputs)) <= {"negative", "positive"}
    # The server's token limit follows the predictor's: over it, 413 naming the model's limit, not a 500.
    srv = model_server(predictor, "challenger", "1")
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/predict"
        status, raw, _ = post_json(url, json.dumps({"inputs": ["the food was great"]}).encode(), 30)
        assert status == 200 and json.loads(raw)["predictions"][0] in {"negative", "positive"}
        status, raw, _ = post_json(url, json.dumps({"inputs": long_inputs[:1]}).encode(), 30)
        assert status == 413 and "at most 16" in json.loads(raw)["error"]
    finally:
        srv.shutdown()


def test_data_parallel_runs_one_process_per_gpu_through_torchrun(tmp_path):
    cmd = launch.command(4, tmp_path / "c.json", "/data", "/out", "/ckpt/run")
    assert cmd[1:4] == ["-m", "canaryflow.training.torchrun", f"/out/{launch.FAILURE_REPORT}"]
    assert cmd[4:6] == ["--standalone", "--nproc_per_node=4"]
    assert cmd[6:8] == ["-m", "canaryflow.training.launch"] and cmd[-2:] == ["--checkpoints", "/ckpt/run"]


@pytest.mark.slow
def test_early_stopping_evaluates_at_checkpoints_and_keeps_the_best(prepared, demo_files, tmp_path):
    cfg = demo_config(
        demo_files,
        "train.max_steps=400",
        "train.checkpoint_steps=10",
        "train.early_stopping_patience=1",
        "train.learning_rate=0.05",  # far too high: validation loss soon stops improving
        "train.min_loss_ratio=null",
    )
    metrics = fine_tune(cfg, prepared[0], tmp_path / "model", tmp_path / "checkpoints")
    assert metrics["steps"] < 400 and metrics["steps"] % 10 == 0  # stopped early, at an evaluation
    assert (tmp_path / "model" / "model.safetensors").is_file()
    # Why it stopped, and the curve that shows it: a validation loss at every evaluation, the last no better.
    assert metrics["stopped"] == "plateau" and metrics["max_steps"] == 400
    validation = [loss for _, loss in metrics["learning_curve"]["validation"]]
    assert len(validation) >= 2 and validation[-1] >= min(validation[:-1])
    assert metrics["learning_curve"]["train"][0][0] < metrics["learning_curve"]["train"][-1][0]


def test_training_says_it_stopped_on_its_budget_or_its_time_limit(trained, prepared, demo_files, tmp_path):
    from canaryflow.training.health import plot_learning_curve

    assert trained[1]["stopped"] == "budget" and trained[1]["steps"] == 40
    cfg = demo_config(demo_files, "train.max_steps=5000", "train.max_seconds=2", "train.min_loss_ratio=null")
    metrics = fine_tune(cfg, prepared[0], tmp_path / "model")
    assert metrics["stopped"] == "time" and 0 < metrics["steps"] < 5000
    assert (tmp_path / "model" / "model.safetensors").is_file()  # the model so far is kept
    plot_learning_curve(metrics["learning_curve"], metrics["stopped"], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_data_the_user_brings_trains_by_epochs_until_the_validation_loss_stops_falling(demo_files):
    from canaryflow.config import USER_DATA_BUDGET, Config

    assert demo_config(demo_files).train.model_dump(include=set(USER_DATA_BUDGET)) == USER_DATA_BUDGET
    assert Config().train.max_steps == 450 and Config().train.early_stopping_patience == 0  # the demo's budget
    assert demo_config(demo_files, "train.max_steps=80").train.early_stopping_patience == 0  # a budget given


def test_per_example_latency_is_the_time_of_the_batch_it_was_in(trained):
    generator = Seq2SeqGenerator(trained[0])
    inputs = ["name: A", "name: B | job: baker", "name: C | job: baker | city: Oslo | age: 30 | hobby: chess"]
    outputs, latencies = generator.generate_timed(inputs, batch_size=2, max_new_tokens=8)
    assert outputs == generator.generate(inputs, batch_size=2, max_new_tokens=8)
    assert len(latencies) == 3 and all(ms > 0 for ms in latencies)
    assert latencies[0] == latencies[1] != latencies[2]  # the two shortest inputs shared a batch


def test_a_checkpoint_is_resumed_wherever_the_run_goes_but_not_after_what_it_trains_changed(tmp_path):
    from canaryflow.config import load_config
    from canaryflow.training.fine_tune import fingerprint

    (tmp_path / "data_card.json").write_text(json.dumps({"content_hash": "abc"}))

    def mark(*overrides):
        return fingerprint(load_config(overrides=list(overrides)), tmp_path)

    same = mark()
    for where in ("train.runtime=other", "train.max_wall_seconds=60", "train.num_threads=2", "train.tolerations=[]"):
        assert mark(where) == same, where
    for what in ("train.nodes=2", "train.learning_rate=0.01", "model.task=classification"):
        assert mark(what) != same, what
    (tmp_path / "data_card.json").write_text(json.dumps({"content_hash": "other data"}))
    assert mark() != same
