"""The data-parallel path, run for real: torchrun starts two ranks on the CPU (gloo) and they train the tiny
model together, as several GPUs of one pod do on a cluster."""

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from canaryflow.errors import CanaryflowError
from canaryflow.inference.predictor import load_predictor
from canaryflow.training.launch import data_parallel
from tests.conftest import demo_config

pytestmark = pytest.mark.slow  # torchrun with two ranks


@pytest.fixture(scope="module")
def trained_on_two_ranks(prepared, demo_files, tmp_path_factory):
    cfg = demo_config(demo_files, "train.max_steps=8", "train.checkpoint_steps=4")
    root = tmp_path_factory.mktemp("data-parallel")
    out, checkpoints = root / "model", root / "checkpoints"
    return cfg, out, checkpoints, data_parallel(cfg, 2, str(prepared[0]), str(out), str(checkpoints))


def test_rank_zero_alone_reports_the_steps_and_writes_the_model(trained_on_two_ranks):
    cfg, out, checkpoints, metrics = trained_on_two_ranks
    # Each logged step once: two ranks reporting (or two ranks each training alone) would log every step twice.
    assert [entry["step"] for entry in metrics["steps_log"]] == list(range(1, 9))
    assert metrics["steps"] == 8 and metrics["resumed_from_step"] == 0
    assert json.loads((out / "train_metrics.json").read_text()) == {
        k: v for k, v in metrics.items() if k != "steps_log"
    }
    # An untrained model's loss is about log(vocabulary); the Trainer's average_tokens_across_devices would
    # report (and train on) twice that, each rank's mean multiplied by the number of ranks.
    assert metrics["first_loss"] < 1.5 * math.log(cfg.model.tiny.vocab_size)
    assert metrics["final_loss"] < metrics["first_loss"]
    assert not [p.name for p in out.iterdir() if p.name.startswith("_") or p.suffix == ".jsonl"]  # no leftovers
    assert not checkpoints.exists()  # the model is saved; its checkpoints are cleared


def test_the_model_the_ranks_trained_loads_and_generates(trained_on_two_ranks):
    cfg, out, _, _ = trained_on_two_ranks
    predictor = load_predictor(out, cfg.data.max_source_length)
    outputs = predictor.generate(["name: Ada Xu | job: baker | city: Oslo | age: 30"], batch_size=1, max_new_tokens=8)
    assert len(outputs) == 1 and outputs[0].strip()


def _kill_rank_once(rank: int, when: Path, running) -> None:
    """SIGKILL the training process of `rank` (a child of this one) as soon as the file `when` appears: a
    preempted or out-of-memory process, stopped at a known point of the run."""
    deadline = time.monotonic() + 240
    while not when.is_file():
        assert not running.done(), "training ended before it could be killed"
        assert time.monotonic() < deadline, f"no {when} after 240 s"
        time.sleep(0.01)
    for process in psutil.Process().children(recursive=True):
        try:
            if process.environ().get("RANK") == str(rank) and "canaryflow.training.launch" in process.cmdline():
                process.kill()
                return
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank} to kill")


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def _complete(checkpoint: Path) -> bool:
    # Rank 0, stopped by torchrun when rank 1 died, may have been writing the next checkpoint.
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == _step(checkpoint)
    except (OSError, ValueError, KeyError):
        return False


def test_a_killed_rank_fails_the_step_in_one_line_and_the_rerun_resumes(prepared, demo_files, tmp_path, capfd):
    cfg = demo_config(demo_files, "train.max_steps=12", "train.checkpoint_steps=4")
    out, checkpoints = tmp_path / "model", tmp_path / "checkpoints"
    args = (cfg, 2, str(prepared[0]), str(out), str(checkpoints))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(data_parallel, *args)
        _kill_rank_once(1, checkpoints / "checkpoint-4" / "trainer_state.json", running)
        with pytest.raises(CanaryflowError) as failed:
            running.result(timeout=240)
    message = str(failed.value)
    assert re.fullmatch(
        r"data-parallel training on 2 CPU processes failed \(torchrun exit 1\): rank 1 killed by SIGKILL", message
    ), message
    assert "Traceback" not in capfd.readouterr().err  # neither torchrun's nor the surviving rank's
    assert not (out / "model.safetensors").exists()
    killed_at = max(map(_step, filter(_complete, checkpoints.glob("checkpoint-*"))))
    assert 4 <= killed_at < 12

    metrics = data_parallel(*args)
    assert metrics["resumed_from_step"] == killed_at and metrics["steps"] == 12
    # The rerun's own log starts after the checkpoint: the failed run's lines are not reported again.
    assert [entry["step"] for entry in metrics["steps_log"]] == list(range(killed_at + 1, 13))
    assert f"resuming from {checkpoints / f'checkpoint-{killed_at}'}" in capfd.readouterr().out
    assert (out / "model.safetensors").is_file() and not checkpoints.exists()


def test_the_failed_ranks_are_told_by_cause_in_one_line(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from canaryflow.training import launch, torchrun

    def failure(rank: int, exitcode: int, message: str | None = None) -> ProcessFailure:
        error_file = tmp_path / f"{rank}.json"
        if message is not None:  # what a rank of launch.main leaves when fine_tune raises a CanaryflowError
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
            with pytest.raises(SystemExit) as ended:
                launch._fail(message, exitcode)
            assert ended.value.code == exitcode
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(error_file))

    did_not_learn = "training did not learn: loss 6.1 is not below train.min_loss_ratio 0.95 of its start 6.2"
    alike = {rank: failure(rank, 1, did_not_learn) for rank in (0, 1)}
    assert torchrun.describe(alike) == f"ranks 0, 1: {did_not_learn}"
    # Rank 0 stopped by torchrun because rank 2 was killed: the kill is the cause, the stop is not news.
    collateral = {0: failure(0, -15), 2: failure(2, -9), 3: failure(3, 1)}
    assert torchrun.describe(collateral) == "rank 2 killed by SIGKILL; rank 3 exited 1"
    assert torchrun.describe({0: failure(0, -15)}) == "rank 0 killed by SIGTERM"
