import json
import math

from safetensors.torch import load_file

from canaryflow.evaluation.generate import Seq2SeqGenerator
from canaryflow.training.tokenizer import train_tokenizer


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
