"""Typed configuration for the whole lifecycle.

One YAML file in, validated on entry; `--set a.b=c` overrides any field. The defaults are the offline
demo task, so `canaryflow run` with no config file works on a fresh machine. The same object crosses the
KFP boundary as JSON (`Config.model_dump_json()` / `Config.from_json()`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from canaryflow.errors import BadInputError


class _Section(BaseModel):
    # A typo in a key must fail loudly, not be ignored: scripts rely on these names.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DemoConfig(_Section):
    records_per_drop: int = Field(600, gt=10, description="Records generated for each synthetic data drop.")
    test_records: int = Field(160, gt=4, description="Held-out test records per drop (entities unseen in train).")
    bootstrap: bool = Field(
        True, description="With no champion in the registry, first train and promote one on the first drop."
    )
    bootstrap_max_steps: int = Field(250, gt=0, description="train.max_steps for the bootstrap champion.")


class DataConfig(_Section):
    train: list[str] | None = Field(
        None, description="Training file(s) or globs (jsonl, json, csv, parquet). Unset: the synthetic demo task."
    )
    validation: list[str] | None = Field(None, description="Validation file(s); unset: split from train.")
    test: list[str] | None = Field(None, description="Test file(s); unset: split from train.")
    dataset: str | None = Field(
        None, description="A Hugging Face dataset id (or a local dataset folder) instead of train/validation/test."
    )
    dataset_config: str | None = Field(None, description="The dataset's configuration name, if it has several.")
    dataset_splits: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"},
        description="Which of the dataset's splits serves as train, validation and test.",
    )
    input_column: str = Field("input", min_length=1, description="Column holding the model input text.")
    target_column: str = Field("target", min_length=1, description="Column holding the reference output text.")
    max_source_length: int = Field(128, gt=0, description="Inputs longer than this (in tokens) are truncated.")
    max_target_length: int = Field(64, gt=0, description="Targets longer than this (in tokens) are truncated.")
    split_seed: int = Field(42, description="Seed of the split when validation/test are carved out of train.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of inputs split off for validation.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of inputs split off for test.")
    max_invalid_fraction: float = Field(
        0.05, ge=0, le=1, description="Share of null, empty or non-text rows a split may hold before it is refused."
    )
    min_split_rows: int = Field(10, ge=1, description="Fewest rows a split may have after cleaning and deduplication.")
    overlength: Literal["truncate", "drop"] = Field(
        "truncate", description="Inputs over max_source_length words: keep them (truncated when tokenized) or drop."
    )
    drift_threshold: float | None = Field(
        None, ge=0, le=1, description="Fail when drift against the champion's data exceeds this; unset: report only."
    )

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TinyModelConfig(_Section):
    d_model: int = Field(128, gt=0, description="Hidden size of the tiny T5 built when model.base is 'tiny-t5'.")
    num_layers: int = Field(2, gt=0, description="Encoder layers.")
    num_decoder_layers: int = Field(2, gt=0, description="Decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads.")
    d_ff: int = Field(256, gt=0, description="Feed-forward width.")
    vocab_size: int = Field(1200, gt=100, description="Size of the BPE vocabulary trained on the train split.")


TINY_BASE = "tiny-t5"  # model.base value for the tiny T5 built from config, its tokenizer trained on the data


class ModelConfig(_Section):
    base: str = Field(
        TINY_BASE,
        description="'tiny-t5' (built from model.tiny, tokenizer trained on the data), a local model directory, "
        "a hub id, or models:/NAME@ALIAS (e.g. models:/canaryflow-demo@champion) to continue from a registered model.",
    )
    task: Literal["seq2seq", "classification"] = Field(
        "seq2seq", description="seq2seq (generate the target) or classification (the target column is the label)."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub model. Off unless you trust its authors."
    )


class Toleration(_Section):
    key: str = Field(..., min_length=1, description="Taint key, e.g. nvidia.com/gpu.")
    operator: Literal["Equal", "Exists"] = Field("Exists", description="Equal matches value; Exists any value.")
    value: str | None = Field(None, description="Taint value, with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; unset: all."
    )


class TrainConfig(_Section):
    max_steps: int = Field(450, description="Optimizer steps; 0 or less means train.epochs decides.")
    epochs: float = Field(1.0, gt=0, description="Epochs, used only when max_steps <= 0.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt"] = Field(
        "linear", description="Learning-rate schedule after warmup (transformers' lr_scheduler_type)."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming the rate up from 0.")
    batch_size: int = Field(32, gt=0, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for model init and data order.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the GPU supports it, fp16 with a loss scaler on other GPUs, fp32 on CPU."
    )
    tf32: bool = Field(True, description="Allow TF32 matmuls on Ampere and newer GPUs (ignored elsewhere).")
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length together: less padding, so faster (1.1x on the demo), "
        "but less random batches; on small data that costs quality (see BENCHMARKS.md). Worth it on large data.",
    )
    num_threads: int = Field(1, gt=0, description="torch threads: 1 is stable under load, 2 is faster when idle.")
    checkpoint_steps: int = Field(
        100, ge=0, description="Checkpoint every N steps (0: never); a rerun after a crash resumes from the last."
    )
    checkpoint_limit: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    checkpoint_dir: str | None = Field(
        None,
        description="Where checkpoints outlive the step's process: the PVC mount on a cluster; unset locally: "
        "<workdir>/checkpoints. One subfolder per pipeline run.",
    )
    checkpoint_pvc: str | None = Field(
        "canaryflow-checkpoints", description="PVC mounted for checkpoints on a cluster (unset: no mount)."
    )
    early_stopping_patience: int = Field(
        0, ge=0, description="Stop after this many checkpoints without a lower validation loss (0: off)."
    )
    max_nonfinite: int = Field(
        3, ge=0, description="NaN/Inf losses or gradient norms tolerated before the step fails (fp16 may skip a few)."
    )
    min_loss_ratio: float | None = Field(
        0.95,
        gt=0,
        le=1,
        description="The step fails unless the last logged loss is below this fraction of the first (did it learn?). "
        "Unset: no check.",
    )
    retries: int = Field(
        2,
        ge=0,
        description="Reruns of fine_tune after a failure such as a preempted pod; each resumes from a checkpoint.",
    )
    fault_nan_after_step: int | None = Field(
        None, ge=0, description="Fault drill: from this step on the loss is NaN, to rehearse the health guard."
    )
    accelerator_type: str = Field("nvidia.com/gpu", description="Accelerator resource asked for on a cluster.")
    accelerator_limit: int = Field(
        1, ge=0, description="Accelerators for fine_tune on a cluster (0: CPU only; >1: data-parallel via torchrun)."
    )
    cpu_request: str | None = Field(None, description="CPU request of fine_tune on a cluster, e.g. '4'.")
    memory_request: str | None = Field(None, description="Memory request of fine_tune on a cluster, e.g. '16Gi'.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels fine_tune must run on, e.g. {'gpu-type': 'a100'}."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints fine_tune may run on.")

    @field_validator("cpu_request", "memory_request", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> Any:
        # `--set train.cpu_request=4` arrives as the number 4; Kubernetes quantities are strings.
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _early_stopping_needs_checkpoints(self) -> TrainConfig:
        if self.early_stopping_patience and not self.checkpoint_steps:
            raise ValueError("early_stopping_patience needs checkpoint_steps > 0 (validation runs at each checkpoint)")
        return self


class EvalConfig(_Section):
    batch_size: int = Field(64, gt=0, description="Generation batch size (batches are sorted by input length).")
    num_beams: int = Field(1, gt=0, description="Beam width for generation.")
    max_new_tokens: int = Field(64, gt=0, description="Longest generated output.")


class GateConfig(_Section):
    floors: dict[str, float] = Field(
        default_factory=lambda: {"bleu": 15.0, "chrf": 30.0},
        description="Absolute minimum per metric for the challenger.",
    )
    non_inferiority: dict[str, float] = Field(
        default_factory=lambda: {"bleu": 1.0, "chrf": 1.0},
        description="Per metric, how far below the champion it may fall: passes when the paired bootstrap shows "
        "the difference is above -margin (its confidence interval's lower end).",
    )
    improvement: dict[str, float] = Field(
        default_factory=dict,
        description="Per metric, an improvement over the champion required instead of a margin, judged the same way.",
    )
    resamples: int = Field(1000, ge=100, description="Paired bootstrap resamples of the test items.")
    seed: int = Field(12345, description="Seed of the bootstrap resamples, so a verdict can be reproduced.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence of the intervals (two-sided).")
    correction: Literal["holm", "none"] = Field(
        "holm", description="Correction for judging several metrics at once (Holm's step-down), or none."
    )

    @model_validator(mode="after")
    def _one_rule_per_known_metric(self) -> GateConfig:
        from canaryflow.evaluation.bootstrap import GATEABLE

        both = sorted(set(self.non_inferiority) & set(self.improvement))
        if both:
            raise ValueError(f"{both[0]} has both a non_inferiority margin and an improvement; give one")
        unknown = sorted((set(self.non_inferiority) | set(self.improvement)) - set(GATEABLE))
        if unknown:
            raise ValueError(f"cannot compare {unknown[0]!r} against the champion; use one of {', '.join(GATEABLE)}")
        return self

    def thresholds(self) -> dict[str, float]:
        """H0 per compared metric is "challenger - champion <= threshold"; the gate needs it rejected."""
        return {**{m: -margin for m, margin in self.non_inferiority.items()}, **self.improvement}


class CanaryConfig(_Section):
    steps: list[int] = Field(
        default_factory=lambda: [10, 25, 50, 100], description="Challenger traffic percentages, in order."
    )
    min_requests_per_step: int = Field(20, gt=0, description="Challenger requests needed before a step is judged.")
    max_requests_per_step: int = Field(600, gt=0, description="Requests after which an undecided step rolls back.")
    smoke_requests: int = Field(40, gt=0, description="Requests of the smoke check when there is no champion.")
    concurrency: int = Field(2, gt=0, description="Replay clients sending at once.")
    request_timeout_s: float = Field(15.0, gt=0, description="Per-request timeout of the replay client.")
    max_error_rate: float = Field(0.02, ge=0, le=1, description="Highest challenger error rate that passes.")
    max_p95_ms: float = Field(2000.0, gt=0, description="Absolute p95 latency ceiling for the challenger.")
    max_p95_ratio: float = Field(2.5, gt=0, description="Challenger p95 may be at most this times the champion's.")
    min_chrf: float = Field(30.0, ge=0, description="Lowest mean online chrF that passes (where references exist).")
    chrf_margin: float = Field(
        5.0, ge=0, description="How far below the champion's online chrF the challenger may fall."
    )
    server_start_timeout_s: float = Field(120.0, gt=0, description="Time a model server gets to answer /health.")
    num_threads: int = Field(1, gt=0, description="torch threads per model server.")

    @field_validator("steps")
    @classmethod
    def _steps_rise_to_100(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise ValueError("must rise strictly, each in 1..100, and end at 100")
        return steps


class RegistryConfig(_Section):
    model_name: str = Field("canaryflow-demo", min_length=1, description="Registered model name in MLflow.")


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; unset: SQLite under the workdir.")
    experiment: str = Field("canaryflow", min_length=1, description="MLflow experiment for pipeline runs.")


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return _validate(json.loads(text))

    @property
    def uses_demo_data(self) -> bool:
        return self.data.train is None and self.data.dataset is None


def _validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise BadInputError(f"config: {where}: {first['msg']}{more}") from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is read as YAML so `3`, `true`, `[1,2]` keep types."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise BadInputError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.max_steps=50")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BadInputError(f"--set {assignment!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults), apply `--set` overrides, validate. Bad input raises BadInputError."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BadInputError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise BadInputError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise BadInputError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        raw = loaded or {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return _validate(raw)
