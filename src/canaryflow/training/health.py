"""The training health guard and telemetry, as transformers Trainer callbacks.

The guard counts non-finite losses (every micro-batch) and gradient norms (every logged step); past
train.max_nonfinite it stops training, and fine_tune then fails the step, so such a model is never
registered. Telemetry turns the Trainer's logs into the per-step figures operators watch: loss, gradient
norm, tokens/s, samples/s, peak memory and the guard's counters.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable

from transformers import TrainerCallback

OnMetrics = Callable[[int, dict[str, float]], None]


class HealthGuard(TrainerCallback):
    def __init__(self, max_nonfinite: int, nan_after_step: int | None = None):
        self.max_nonfinite = max_nonfinite
        self.nan_after_step = nan_after_step
        self.nonfinite_losses = 0
        self.nonfinite_grad_norms = 0

    @property
    def tripped(self) -> bool:
        return self.nonfinite_losses + self.nonfinite_grad_norms > self.max_nonfinite

    def counters(self) -> dict[str, int]:
        return {"nonfinite_losses": self.nonfinite_losses, "nonfinite_grad_norms": self.nonfinite_grad_norms}

    def inspect_loss(self, loss, step: int, control):
        """Called with every training micro-batch's loss; returns the loss (NaN from the drill's step on)."""
        import torch

        if self.nan_after_step is not None and step >= self.nan_after_step:
            loss = loss * float("nan")
        if not bool(torch.isfinite(loss.detach()).all()):
            self.nonfinite_losses += 1
            control.should_training_stop = control.should_training_stop or self.tripped
        return loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        norm = (logs or {}).get("grad_norm")
        if norm is not None and not math.isfinite(float(norm)):
            self.nonfinite_grad_norms += 1
        if self.tripped:
            control.should_training_stop = True

    def error(self) -> str:
        return (
            f"training stopped: {self.nonfinite_losses} non-finite losses and {self.nonfinite_grad_norms} "
            f"non-finite gradient norms, over train.max_nonfinite {self.max_nonfinite}; nothing is registered"
        )


class TimeLimit(TrainerCallback):
    """Ends training after `seconds` (train.max_seconds), keeping the model as it is then."""

    def __init__(self, seconds: float | None):
        self.seconds, self.started, self.tripped = seconds, 0.0, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is not None and time.perf_counter() - self.started >= self.seconds:
            # Logged too, so the loss of the last step is known whatever logging_steps says.
            self.tripped = control.should_training_stop = control.should_log = True


def learning_curve(log_history: list[dict]) -> dict[str, list[list[float]]]:
    """[step, loss] of every logged training step and every validation, from the Trainer's log history."""
    return {
        "train": [[entry["step"], float(entry["loss"])] for entry in log_history if "loss" in entry],
        "validation": [[entry["step"], float(entry["eval_loss"])] for entry in log_history if "eval_loss" in entry],
    }


def plot_learning_curve(curve: dict[str, list[list[float]]], stopped: str, path) -> None:
    """Training and validation loss against the step, titled with why training stopped, saved to `path` (a file
    name or a binary file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, marker in (("train", ""), ("validation", "o")):
        if curve[name]:
            steps, losses = zip(*curve[name])
            ax.plot(steps, losses, marker=marker, label=f"{name} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"learning curve (stopped: {stopped})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def peak_memory_mb() -> float:
    """Peak accelerator memory where training runs on one, else the process's peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Telemetry(TrainerCallback):
    """Per logged step: what the Trainer logged, plus throughput since the previous log and peak memory."""

    def __init__(self, guard: HealthGuard, samples_per_step: int, on_metrics: OnMetrics, on_progress):
        self.guard, self.samples_per_step = guard, samples_per_step
        self.on_metrics, self.on_progress = on_metrics, on_progress
        self.last: tuple[float, int, int] | None = None  # time, step, tokens seen
        self.begin_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume the state already counts the tokens of the earlier process.
        self.begin_tokens = state.num_input_tokens_seen or 0
        self.last = (time.perf_counter(), state.global_step, self.begin_tokens)

    def tokens_seen(self, state) -> int:
        """Input tokens (padding excluded) this process trained on."""
        return (state.num_input_tokens_seen or 0) - self.begin_tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # evaluation and end-of-training summaries carry their own keys
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen or 0
        metrics = {"loss": float(logs["loss"]), "learning_rate": float(logs.get("learning_rate", 0.0))}
        if "grad_norm" in logs:
            metrics["grad_norm"] = float(logs["grad_norm"])
        if self.last is not None and now > self.last[0]:
            seconds = now - self.last[0]
            metrics["tokens_per_second"] = (tokens - self.last[2]) / seconds
            metrics["samples_per_second"] = (state.global_step - self.last[1]) * self.samples_per_step / seconds
        self.last = (now, state.global_step, tokens)
        metrics["peak_memory_mb"] = peak_memory_mb()
        metrics.update(self.guard.counters())
        self.on_metrics(state.global_step, metrics)
        self.on_progress(state.global_step, state.max_steps, metrics["loss"])
