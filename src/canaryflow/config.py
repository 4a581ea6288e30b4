"""Typed configuration for the whole lifecycle.

One YAML file in, validated on entry; `--set a.b=c` overrides any field. The defaults are the offline
demo task, so `canaryflow run` with no config file works on a fresh machine. The same object crosses the
KFP boundary as JSON (`Config.to_json()` / `Config.from_json()`).
"""

from __future__ import annotations

import json
import math
import re
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
    on_leakage: Literal["drop", "fail"] = Field(
        "drop",
        description="An input in two of the splits given: drop it from train (and from validation when test holds "
        "it), keeping the split the gate scores intact, and count it in the data card; or fail.",
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


# A Kubernetes quantity such as 20Gi. The KFP driver parses claim and emptyDir sizes with MustParse, which
# panics on anything else (kubeflow/pipelines 2.17.0, backend/src/v2/driver/k8s.go), so they are checked here.
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"


# The training budget of data the user brings, where the config sets none: the demo's fixed 450 steps stopped a
# public data-to-text set (4k pairs) at BLEU 30.8 where 2,500 steps reach 48.3. Epochs bound it; the validation
# loss, checked at each checkpoint, ends it once it stops falling.
USER_DATA_BUDGET: dict[str, float] = {"max_steps": 0, "epochs": 10.0, "early_stopping_patience": 3}


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
        "canaryflow-checkpoints",
        description="The checkpoint claim a one-off Job made writable for uid 1000 (manifests/base/"
        "pvc-checkpoints.yaml): each run's own claim is cloned from it (per-run), or it is mounted as it is "
        "(shared). Unset: no claim, and a retried fine_tune starts over.",
    )
    checkpoint_claim: Literal["per-run", "shared"] = Field(
        "per-run",
        description="per-run: each pipeline run gets its own ReadWriteOnce claim, cloned from checkpoint_pvc, "
        "so concurrent runs never meet on one volume (needs KFP backend >= 2.17). shared: every run mounts "
        "checkpoint_pvc itself, so two runs at once wait on each other's volume attachment (Multi-Attach).",
    )
    checkpoint_source_kind: Literal["PersistentVolumeClaim", "VolumeSnapshot"] = Field(
        "PersistentVolumeClaim",
        description="What a per-run claim is cloned from: the checkpoint_pvc claim (CSI volume cloning: GCE PD, "
        "Azure Disk, Ceph, Longhorn), or a VolumeSnapshot of it with the same name (EBS, which cannot clone).",
    )
    checkpoint_size: str = Field(
        "20Gi",
        pattern=QUANTITY,
        description="Size of a per-run checkpoint claim; a clone is at least its source's.",
    )
    # The KFP driver writes the class into every claim it creates ("standard" when none is given, "" means no
    # provisioning), so the cluster's default class cannot be asked for; a clone must have its source's class.
    checkpoint_storage_class: str = Field(
        "standard",
        min_length=1,
        description="StorageClass of a per-run claim: the checkpoint_pvc claim's own (a clone must match it; "
        "kubectl get pvc canaryflow-checkpoints -o jsonpath='{.spec.storageClassName}').",
    )
    early_stopping_patience: int = Field(
        0, ge=0, description="Stop after this many checkpoints without a lower validation loss (0: off)."
    )
    max_seconds: float | None = Field(
        None, gt=0, description="Stop training after this many seconds and keep the model so far (null: no limit)."
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
        1,
        ge=0,
        description="Accelerators for fine_tune on a cluster, per node with train.nodes > 1 (0: CPU only; >1: "
        "data-parallel via torchrun).",
    )
    cpu_request: str | None = Field(None, description="CPU request of fine_tune on a cluster, e.g. '4'.")
    memory_request: str | None = Field(None, description="Memory request of fine_tune on a cluster, e.g. '16Gi'.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels fine_tune must run on, e.g. {'gpu-type': 'a100'}."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints fine_tune may run on.")
    nodes: int = Field(
        1,
        ge=1,
        description="Nodes fine_tune trains on. 1: in the step's own pod. More: the step creates a Kubeflow Trainer "
        "TrainJob of this many nodes (each with accelerator_limit accelerators, the node selector and tolerations "
        "below) and waits for it; its checkpoint claim must be ReadWriteMany (docs/design/multi-node-training.md).",
    )
    max_wall_seconds: int = Field(
        86400,
        gt=0,
        description="With nodes > 1: the longest fine_tune waits for its TrainJob (also the TrainJob's "
        "activeDeadlineSeconds); past it the TrainJob is deleted and the step fails.",
    )
    runtime: str = Field(
        "torch-distributed",
        min_length=1,
        description="With nodes > 1: the Kubeflow Trainer runtime the TrainJob references (the PyTorch one).",
    )
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = Field(
        "ClusterTrainingRuntime",
        description="Whether train.runtime is cluster-wide or a TrainingRuntime in the pipeline's namespace.",
    )
    shm_size: str | None = Field(
        None,
        pattern=QUANTITY,
        description="Size of the memory-backed /dev/shm of fine_tune on more than one accelerator, where NCCL "
        "and DataLoader workers pass tensors through it (the container default is 64Mi). It counts against the "
        "pod's memory. Unset: 2Gi per accelerator.",
    )

    @property
    def shm(self) -> str:
        # NVIDIA's NCCL and NGC container guides ask for at least 1 GiB of /dev/shm; the second covers the
        # DataLoader workers' batches, which also pass through it, one set per rank.
        return self.shm_size or f"{2 * self.accelerator_limit}Gi"

    @field_validator("cpu_request", "memory_request", "checkpoint_size", "shm_size", mode="before")
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


# Owned by config rather than evaluation/: the gate's config is validated against these names, and config
# must import nothing from the stages built on it.
CORPUS_METRICS = ("bleu", "chrf")
MEAN_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "token_f1", "exact_match")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
GATEABLE = CORPUS_METRICS + MEAN_METRICS + CLASSIFICATION_METRICS


# The gate a task gets where the config names none: seq2seq's is the demo's (configs/demo.yaml), whose 160 test
# inputs resolve about 3.1 BLEU and 1.0 chrF between two similar models (at a margin that fine an equal challenger
# fails half the time, at 1.6 times it, BLEU here, about one time in nine, at twice it, chrF, one in forty); a
# classifier's is configs/classification.yaml's.
TASK_GATES: dict[str, dict[str, dict[str, float]]] = {
    "seq2seq": {"floors": {"bleu": 15.0, "chrf": 30.0}, "non_inferiority": {"bleu": 5.0, "chrf": 2.0}},
    "classification": {"floors": {"macro_f1": 70.0}, "non_inferiority": {"macro_f1": 1.0, "accuracy": 1.0}},
}


class GateConfig(_Section):
    floors: dict[str, float] = Field(
        default_factory=lambda: dict(TASK_GATES["seq2seq"]["floors"]),
        description="Absolute minimum per metric for the challenger. Unset: the task's (TASK_GATES).",
    )
    non_inferiority: dict[str, float] = Field(
        default_factory=lambda: dict(TASK_GATES["seq2seq"]["non_inferiority"]),
        description="Per metric, how far below the champion it may fall: passes when the paired bootstrap shows "
        "the difference is above -margin (its confidence interval's lower end). Keep it above what the test set "
        "resolves (each check states it; `canaryflow run` warns when a margin is finer).",
    )
    improvement: dict[str, float] = Field(
        default_factory=dict,
        description="Per metric, an improvement over the champion required instead of a margin, judged the same way.",
    )
    resamples: int = Field(1000, ge=100, description="Paired bootstrap resamples of the test items.")
    seed: int = Field(12345, description="Seed of the bootstrap resamples, so a verdict can be reproduced.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence of the intervals (two-sided).")
    correction: Literal["none", "holm"] = Field(
        "none",
        description="Correction for judging several metrics at once. none: each metric at alpha = (1 - confidence)"
        " / 2, which already bounds at alpha the chance of passing a challenger worse on any one metric, because "
        "passing needs every metric (an intersection-union test, Berger 1982). holm: Holm's step-down, stricter "
        "than that bound needs; each added metric then makes an equal challenger less likely to pass.",
    )

    @model_validator(mode="after")
    def _one_rule_per_known_metric(self) -> GateConfig:
        both = sorted(set(self.non_inferiority) & set(self.improvement))
        if both:
            raise ValueError(f"{both[0]} has both a non_inferiority margin and an improvement; give one")
        unknown = sorted((set(self.non_inferiority) | set(self.improvement)) - set(GATEABLE))
        if unknown:
            raise ValueError(f"cannot compare {unknown[0]!r} against the champion; use one of {', '.join(GATEABLE)}")
        return self

    @model_validator(mode="after")
    def _enough_resamples(self) -> GateConfig:
        # The bootstrap's smallest p-value is 1 / (resamples + 1): above the strictest level a metric is held
        # to, no challenger could ever pass, however much better.
        alpha = (1 - self.confidence) / 2
        compared = len(self.thresholds())
        strictest = alpha / compared if self.correction == "holm" and compared else alpha
        if 1 / (self.resamples + 1) > strictest:
            raise ValueError(
                f"gate.resamples {self.resamples} cannot pass any challenger at level {strictest:.4g} (the smallest "
                f"p-value is 1/{self.resamples + 1}); use at least {math.ceil(1 / strictest)}"
            )
        return self

    def thresholds(self) -> dict[str, float]:
        """H0 per compared metric is "challenger - champion <= threshold"; the gate needs it rejected."""
        return {**{m: -margin for m, margin in self.non_inferiority.items()}, **self.improvement}


# What the shipped PodMonitor (manifests/observability/podmonitor.yaml) puts on every series of a predictor: the
# namespace and the InferenceService, beside the model_version the server itself adds.
_OWN = 'namespace="{namespace}",inferenceservice="{service}",model_version="{version}"'
_REQUESTS = "canaryflow_server_requests_total"
_LATENCY = "canaryflow_server_latency_seconds"


class KServeConfig(_Section):
    """Where the KServe canary runs and how its SLIs are read from Prometheus.

    Query templates are PromQL with `{namespace}`, `{service}` (the InferenceService), `{version}` (the
    registered version one variant serves), `{revision}` (its Knative revision), `{window}` (the time since the
    canary began, never under four scrape intervals, e.g. `300s`) and `{threshold}` (a regex matching the `le`
    of the latency bucket bound at or above the slow threshold) filled in by `str.format`, so PromQL's own
    braces are doubled. Each returns one number, except `quality`, which returns one series per `le` bound of
    the chrF histogram. The defaults read canaryflow's own server metrics, which carry `model_version` and do
    not change with the Knative version; counts are increases since the canary began, so they cannot vanish
    between two scrapes. `knative_metrics` adds Knative's queue-proxy counts as a second signal.
    """

    namespace: str = Field("canaryflow", min_length=1, description="Namespace of the InferenceService.")
    service: str | None = Field(None, description="InferenceService name; unset: registry.model_name.")
    prometheus_url: str = Field(
        "http://prometheus-operated.monitoring.svc:9090", description="Prometheus that scrapes the predictors."
    )
    look_interval_s: float = Field(30.0, gt=0, description="Seconds between looks at the canary's metrics.")
    scrape_interval_s: float = Field(
        30.0,
        gt=0,
        description="How often Prometheus scrapes the predictors (the PodMonitor's interval): no count is read "
        "over less than four of them.",
    )
    baseline_s: float = Field(
        600.0,
        gt=0,
        description="The champion's p95 over this many seconds before the canary is the slow threshold for the "
        "whole canary (canary.max_p95_ms when the champion served nothing then).",
    )
    max_empty_looks: int = Field(
        3,
        gt=0,
        description="Looks in a row at which a query may find no series before the canary fails and rolls back.",
    )
    knative_metrics: Literal["auto", "legacy", "otel", "off"] = Field(
        "auto",
        description="Knative's queue-proxy metrics as a second signal, for failures that never reach the server: "
        "legacy (Knative up to 1.18, revision_app_request_*), otel (1.19 on, OpenTelemetry), auto (the first "
        "whose series exist; none is not an error), off.",
    )
    lease_duration_s: int = Field(
        60, ge=10, description="Seconds the canary's Lease on the InferenceService lasts unless renewed."
    )
    lease_wait_s: float = Field(
        900.0, ge=0, description="Seconds to wait for another run's canary on the same InferenceService to end."
    )
    artifacts_destination: str | None = Field(
        None,
        description="The MLflow server's --artifacts-destination (e.g. s3://mlflow/artifacts), where its "
        "mlflow-artifacts:/ URIs live: KServe's storage initializer downloads models from there.",
    )
    queries: dict[str, str] = Field(
        default_factory=lambda: {
            "requests": f"sum(increase({_REQUESTS}{{{{{_OWN}}}}}[{{window}}]))",
            # `or` keeps the variant's other series at 0, so that no 5xx yet is 0 rather than no series.
            "errors": (
                f'sum(increase({_REQUESTS}{{{{{_OWN},code=~"5.."}}}}[{{window}}])'
                f" or 0 * increase({_REQUESTS}{{{{{_OWN}}}}}[{{window}}]))"
            ),
            "slow": (
                f"sum(increase({_LATENCY}_count{{{{{_OWN}}}}}[{{window}}]))"
                f' - sum(increase({_LATENCY}_bucket{{{{{_OWN},le=~"{{threshold}}"}}}}[{{window}}]))'
            ),
            "p95_ms": (
                f"1000 * histogram_quantile(0.95, sum by (le) (rate({_LATENCY}_bucket{{{{{_OWN}}}}}[{{window}}])))"
            ),
            "quality": f"sum by (le) (increase(canaryflow_server_quality_chrf_bucket{{{{{_OWN}}}}}[{{window}}]))",
        },
        description="PromQL templates for requests, errors, slow requests, p95 ms and (optional) answers per "
        "chrF bucket of one variant.",
    )

    @field_validator("knative_metrics", mode="before")
    @classmethod
    def _off_is_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("queries")
    @classmethod
    def _all_queries(cls, queries: dict[str, str]) -> dict[str, str]:
        missing = sorted({"requests", "errors", "slow", "p95_ms"} - set(queries))
        if missing:
            raise ValueError(f"missing query templates: {', '.join(missing)}")
        unknown = sorted(set(queries) - {"requests", "errors", "slow", "p95_ms", "quality"})
        if unknown:
            raise ValueError(f"unknown query templates: {', '.join(unknown)}")
        for name, template in queries.items():
            # A typo in a placeholder, or PromQL braces left single, would otherwise surface mid-canary.
            try:
                template.format(
                    namespace="ns", service="svc", version="1", revision="rev", window="30s", threshold="0[.]5"
                )
            except (KeyError, IndexError, ValueError) as exc:
                problem = f"unknown placeholder {{{exc.args[0]}}}" if isinstance(exc, KeyError) else str(exc)
                raise ValueError(
                    f"{name}: {problem}; the placeholders are {{namespace}}, {{service}}, {{version}}, "
                    "{revision}, {window} and {threshold}, and PromQL's own braces are written doubled"
                ) from None
        return queries


class CanaryConfig(_Section):
    """The rollout policy: an optional shadow phase, then traffic steps, each judged after every batch of
    requests by anytime-valid sequential tests (rollout/analysis.py)."""

    backend: Literal["local", "kserve"] = Field(
        "local",
        description="local: two model servers on loopback behind a weighted router, fed by replayed test inputs; "
        "kserve: the InferenceService's canary, judged on Prometheus metrics of live traffic.",
    )
    shadow_requests: int = Field(
        0,
        ge=0,
        description="Requests mirrored to the challenger before traffic shifts (answers compared, not "
        "returned); 0: no shadow phase.",
    )
    steps: list[int] = Field(
        default_factory=lambda: [10, 25, 50, 100], description="Challenger traffic percentages, in order."
    )
    min_requests_per_step: int = Field(
        50, gt=0, description="Challenger requests a step must see before it may be promoted."
    )
    max_requests_per_step: int = Field(
        3000,
        gt=0,
        description="Challenger requests after which a step is undecided: it is extended "
        "(undecided_extensions), then the canary ends inconclusive.",
    )
    max_step_seconds: float = Field(
        600.0, gt=0, description="Seconds after which a step is undecided, as for max_requests_per_step."
    )
    batch_requests: int = Field(20, gt=0, description="Requests replayed between two looks (local backend).")
    alpha: float = Field(
        0.05, gt=0, lt=0.5, description="Bound on the chance of rolling back a healthy challenger, over all looks."
    )
    error_tolerance: float = Field(
        1.0, ge=1, description="Roll back once the challenger's error rate is surely more than this many times the "
        "champion's (a ratio: 1.0, any worse)."
    )  # fmt: skip
    slow_tolerance: float = Field(
        1.0, ge=1, description="Roll back once the challenger's share of requests slower than the champion's p95 is "
        "surely more than this many times the champion's (a ratio)."
    )  # fmt: skip
    quality_tolerance: float = Field(
        0.02, ge=0, le=1, description="Roll back once online chrF (as a 0-1 share) is surely worse by more."
    )
    error_margin: float = Field(
        2.0, description="Promote a step once the challenger's error rate is surely below this many times the "
        "champion's (a ratio above 1), or surely within error_floor of it."
    )  # fmt: skip
    error_floor: float = Field(
        0.02, gt=0, le=1, description="An excess error rate (a share) small enough to promote on: where errors "
        "are too rare for their ratio to be known, this decides."
    )  # fmt: skip
    slow_margin: float = Field(
        1.5, description="Promote a step once the challenger's share of slow requests is surely below this many "
        "times the champion's (a ratio above 1), or surely within slow_floor of it."
    )  # fmt: skip
    slow_floor: float = Field(0.10, gt=0, le=1, description="The same floor, for the share of slow requests.")
    quality_margin: float = Field(
        0.05, gt=0, le=1, description="Promote a step once online chrF (0-1 share) is surely worse by less."
    )
    undecided_extensions: int = Field(
        1, ge=0, description="Times a step still undecided at its request or time limit is given those limits "
        "again; after the last, the canary ends inconclusive: the champion keeps serving and the challenger "
        "stays registered with that verdict."
    )  # fmt: skip
    max_error_rate: float = Field(
        0.05, gt=0, le=1, description="Smoke check (no champion): the error rate must be surely below this."
    )
    max_p95_ms: float = Field(
        2000.0, gt=0, description="Smoke check: the share of requests slower than this must be surely under 15%."
    )
    min_chrf: float = Field(30.0, ge=0, le=100, description="Smoke check: online chrF must be surely above this.")
    # 8: each server batches what arrives together (serving.batch). With the clients sending ahead of the
    # controller's looks, the demo's canary (about 1,400 requests, 2 cores) took 19-23 s at 8; 12 and 16
    # clients took 18-27 s, no faster, with more requests queued behind any stall.
    concurrency: int = Field(8, gt=0, description="Replay clients sending at once (local backend).")
    request_timeout_s: float = Field(15.0, gt=0, description="Per-request timeout of the replay client.")
    server_start_timeout_s: float = Field(120.0, gt=0, description="Time a model server gets to answer /health.")
    num_threads: int = Field(1, gt=0, description="torch threads per model server.")
    kserve: KServeConfig = Field(default_factory=KServeConfig)

    @field_validator("steps")
    @classmethod
    def _steps_rise_to_100(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise ValueError("must rise strictly, each in 1..100, and end at 100")
        if len(steps) < 2:
            raise ValueError("needs a step below 100: the challenger is compared with the champion serving beside it")
        return steps

    @field_validator("error_margin", "slow_margin")
    @classmethod
    def _margins_are_ratios(cls, value: float, info) -> float:
        if value <= 1:
            sli = info.field_name.removesuffix("_margin")
            raise ValueError(
                f"is a ratio to the champion's rate, above 1 (1.5: half as many again); an absolute share "
                f"goes in canary.{sli}_floor"
            )
        return value

    @model_validator(mode="after")
    def _margins_above_tolerances(self) -> CanaryConfig:
        if self.quality_margin <= self.quality_tolerance:
            raise ValueError("canary.quality_margin must exceed canary.quality_tolerance")
        if self.backend == "kserve" and self.shadow_requests:
            raise ValueError("canary.shadow_requests needs the local backend: KServe's canary does not mirror")
        if 0 < self.shadow_requests < self.min_requests_per_step:
            raise ValueError("canary.shadow_requests must be 0 or at least canary.min_requests_per_step")
        if self.max_requests_per_step < self.min_requests_per_step:
            raise ValueError("canary.max_requests_per_step must be at least canary.min_requests_per_step")
        return self


class InputLogConfig(_Section):
    """A sample of what the model servers are asked, kept for drift checks, with a privacy filter applied
    before anything is written."""

    enabled: bool = Field(True, description="Write sampled inputs; false: keep nothing.")
    dir: str | None = Field(
        None,
        description="Directory of the log files (one per server: inputs-<variant>-v<version>.jsonl, rotated); "
        "unset: <workdir>/input-log locally, no log on a cluster unless set.",
    )
    upload_uri: str | None = Field(
        None,
        description="Where each server ships its log files once closed, for `drift check` to read after the pod "
        "is gone: an MLflow artifact URI (mlflow-artifacts:/input-log through the tracking server, s3://, gs://, "
        "...) or a directory. Unset: the files stay in `dir`.",
    )
    upload_interval_s: float = Field(
        300.0, gt=0, description="With upload_uri: the open log file is closed and shipped at least this often."
    )
    sample_rate: float = Field(0.1, ge=0, le=1, description="Share of requests whose inputs are logged.")
    max_bytes: int = Field(10 << 20, gt=0, description="A log file is rotated once it reaches this size.")
    backups: int = Field(
        5, ge=0, description="Rotated files kept per server; older ones are deleted. With upload_uri: files "
        "kept while the upload fails."
    )  # fmt: skip
    drop_fields: list[str] = Field(
        default_factory=list, description="Request fields never written (besides inputs, which always are)."
    )
    hash_fields: list[str] = Field(
        default_factory=list,
        description="Request fields written only as a salted SHA-256 (joinable, not readable). The salt comes "
        "from $CANARYFLOW_INPUT_LOG_SALT, else a random one kept beside the log.",
    )
    mask_emails: bool = Field(True, description="Replace e-mail addresses in logged text with <email>.")
    mask_numbers: bool = Field(True, description="Replace digit runs in logged text with <num>.")


class BatchConfig(_Section):
    """Dynamic batching in the model server: concurrent requests generated together."""

    max_size: int = Field(16, gt=0, description="Most inputs generated as one batch.")
    max_latency_ms: float = Field(
        10.0,
        ge=0,
        description="Longest the first request of a batch waits for others to join it; it waits only for requests "
        "already on their way in, or for as many as the last batch had, so one request at a time never waits.",
    )


class ServingConfig(_Section):
    max_input_tokens: int | None = Field(
        None,
        gt=0,
        description="Longest input, in tokens, a model server accepts (413 beyond it, the first defence against "
        "out-of-memory); unset: data.max_source_length.",
    )
    max_inputs_per_request: int = Field(64, gt=0, description="Most inputs one /predict request may carry.")
    drift_window: int = Field(
        500, gt=0, description="Recent inputs over which a model server measures drift for its /metrics."
    )
    input_log: InputLogConfig = Field(default_factory=InputLogConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    max_in_flight: int = Field(
        64, gt=0, description="Prediction requests a server takes at once; past it, 503 with Retry-After."
    )
    drain_s: float = Field(
        20.0, ge=0, description="On SIGTERM, seconds the requests in flight get to finish before the server exits."
    )


class DriftConfig(_Section):
    """Drift of serving inputs against the champion's training data (the data card's input profile), measured
    as Jensen-Shannon distance, and the retraining it may trigger (`canaryflow drift watch --submit`)."""

    # A Jensen-Shannon distance is the square root of the divergence: moving a share m of the mass to where the
    # other side has none gives about sqrt(m), so 0.5 is roughly a quarter of the words (or lengths) unseen.
    threshold: float = Field(
        0.5, gt=0, le=1, description="Drifted once either distance (input length, vocabulary) exceeds this."
    )
    window: int = Field(500, gt=0, description="Most recent logged inputs compared with the training data.")
    min_inputs: int = Field(
        200, gt=0, description="Fewer logged inputs than this: too few to judge, so nothing is triggered."
    )
    cooldown_hours: float = Field(
        24.0, ge=0, description="At most one triggered retraining per this many hours, whatever the drift."
    )
    interval_s: float = Field(300.0, gt=0, description="Seconds between two checks of `drift watch`.")


class RegistryConfig(_Section):
    model_name: str = Field("canaryflow-demo", min_length=1, description="Registered model name in MLflow.")
    lock: str = Field(
        "auto",
        description="What serializes promotions and rollbacks: auto (a file lock beside a SQLite store, an "
        "advisory lock on a PostgreSQL store, none behind an http server), none, file:PATH, a "
        "postgresql+psycopg2:// URI (the database behind an MLflow server) for its advisory lock, or env:NAME "
        "to read one of those from an environment variable (a Secret, on a cluster).",
    )

    @field_validator("lock")
    @classmethod
    def _known_lock(cls, value: str) -> str:
        if value in ("auto", "none") or value.startswith(("file:", "postgresql", "env:")):
            return value
        raise ValueError("must be auto, none, file:PATH, a postgresql+psycopg2:// URI or env:NAME")


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; unset: SQLite under the workdir.")
    experiment: str = Field("canaryflow", min_length=1, description="MLflow experiment for pipeline runs.")
    # MLflow's own HTTP client retries connection errors and 429/5xx answers with exponential backoff; these
    # bound it, so a server that stays down fails the step in about backoff_s * 2**retries seconds.
    retries: int = Field(4, ge=0, le=10, description="Retries of a failed request to an MLflow server.")
    backoff_s: int = Field(1, ge=0, le=60, description="Backoff factor of those retries, in seconds.")
    timeout_s: int = Field(60, gt=0, description="Seconds one request to an MLflow server may take.")


# The pipeline's steps by their component names; canaryflow.steps.STEPS lists those a run must finish.
Step = Literal["prepare_data", "fine_tune", "evaluate_model", "register_model", "canary_rollout", "record_outcome"]


class SecretEnv(_Section):
    secret: str = Field(min_length=1, description="Name of a Kubernetes Secret in the pipeline's namespace.")
    keys: dict[str, str] = Field(description="Secret data key -> environment variable of the steps that get it.")
    optional: bool = Field(False, description="Steps start without it when the Secret is missing.")
    steps: list[Step] | None = Field(
        None, description="The steps that get it, e.g. [canary_rollout]; unset: every step."
    )

    def env(self) -> list[dict]:
        """Its keys as a container's environment, by reference: nothing secret is written into the object."""
        ref = {"name": self.secret, **({"optional": True} if self.optional else {})}
        return [{"name": var, "valueFrom": {"secretKeyRef": {**ref, "key": key}}} for key, var in self.keys.items()]


class ClusterConfig(_Section):
    """What a cluster run takes from Kubernetes rather than from this config, so that nothing secret is ever
    compiled into the pipeline YAML (kfp-kubernetes use_secret_as_env on every step)."""

    secrets: list[SecretEnv] = Field(
        default_factory=lambda: [
            SecretEnv(secret="canaryflow-mlflow", keys={"tracking-uri": "MLFLOW_TRACKING_URI"}),
            # Only where the MLflow server sits behind basic auth.
            SecretEnv(
                secret="canaryflow-mlflow-auth",
                keys={"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
                optional=True,
            ),
            SecretEnv(
                secret="canaryflow-s3",
                keys={
                    "access-key-id": "AWS_ACCESS_KEY_ID",
                    "secret-access-key": "AWS_SECRET_ACCESS_KEY",
                    "endpoint-url": "MLFLOW_S3_ENDPOINT_URL",
                },
            ),
            SecretEnv(secret="canaryflow-hf", keys={"token": "HF_TOKEN"}, optional=True),
            # The promotion lock (registry.lock env:...): the MLflow server's database, as a role that may log in
            # and nothing more (an advisory lock needs no table), so the step that holds it cannot move an alias
            # around the server's login. Without it the re-read before every alias move is the only guard. Only
            # the step that moves champion gets it: canary_rollout (models.promote / reject ->
            # ledger.move_aliases); register_model's challenger alias is set without the lock.
            SecretEnv(
                secret="canaryflow-mlflow-lock",
                keys={"uri": "CANARYFLOW_PROMOTION_LOCK"},
                optional=True,
                steps=["canary_rollout"],
            ),
        ],
        description="Secrets the steps get as environment variables: MLflow, S3/MinIO, the HF token, and the "
        "promotion lock on the MLflow database (canary_rollout only).",
    )
    kfp_backend_version: str = Field(
        "2.17",
        pattern=r"^\d+\.\d+(\.\d+)?$",
        description="The KFP backend the pipeline runs on (MAJOR.MINOR). compile refuses what it would silently "
        "drop: optional Secrets below 2.15 (kubeflow/pipelines#12216), per-run checkpoint claims below 2.17.",
    )

    @field_validator("kfp_backend_version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # `--set cluster.kfp_backend_version=2.16` arrives as the number 2.16 (quote 2.10: YAML reads 2.1).
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @property
    def kfp_backend(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.kfp_backend_version.split("."))

    # Runs and recurring runs execute as this ServiceAccount, not as the namespace's default-editor (which
    # holds kubeflow-edit): manifests/base/rbac.yaml grants it what the KFP driver, launcher and the steps call.
    service_account: str | None = Field(
        "canaryflow-runner",
        description="Kubernetes ServiceAccount that every step of a submitted or scheduled run executes as "
        "(manifests/base/rbac.yaml); null leaves it to KFP: pipeline-runner, or default-editor on multi-user "
        "Kubeflow.",
    )

    @field_validator("service_account")
    @classmethod
    def _kubernetes_name(cls, value: str | None) -> str | None:
        # A ServiceAccount's name is a DNS-1123 subdomain; KFP would only fail the run once Argo tried it.
        subdomain = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
        if value is not None and not (len(value) <= 253 and re.fullmatch(subdomain, value)):
            raise ValueError(f"{value!r} is not a Kubernetes name: lowercase letters, digits, '-' and '.'")
        return value


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
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)

    def to_json(self) -> str:
        """The config as the `config_json` parameter of the DAG. kfp.local's SubprocessRunner replaces the text
        `python3` in every executor argument with its interpreter's path (kfp 2.17 local/subprocess_task_handler.py
        replace_python_executable; kubeflow/pipelines#14459, open), which would corrupt a model or data path inside
        a virtualenv (`.../lib/python3.11/...`). The JSON escape `\\u0033` for the 3 spells the same string
        without that text; `from_json` reads it back as it was."""
        return self.model_dump_json().replace("python3", "python\\u0033")

    @model_validator(mode="before")
    @classmethod
    def _budget_follows_the_data(cls, raw: Any) -> Any:
        """The demo trains a fixed, fast budget; data the user brings trains by epochs until the validation loss
        stops falling (USER_DATA_BUDGET), unless the config sets the budget itself."""
        if not isinstance(raw, dict) or not isinstance(raw.get("data", {}), dict):
            return raw
        train = raw.get("train", {})
        given = raw.get("data", {}).get("train") or raw.get("data", {}).get("dataset")
        if not given or not isinstance(train, dict) or any(k in train for k in USER_DATA_BUDGET):
            return raw
        return {**raw, "train": {**train, **USER_DATA_BUDGET}}

    @model_validator(mode="before")
    @classmethod
    def _gate_follows_the_task(cls, raw: Any) -> Any:
        """What the config leaves out of the gate comes from its task's (TASK_GATES): `--set
        model.task=classification` alone gates on accuracy and macro-F1. A metric that must improve has no
        default margin as well."""
        if not isinstance(raw, dict):
            return raw
        model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        defaults = TASK_GATES.get(model.get("task", "seq2seq"))
        gate = raw.get("gate", {})
        if defaults is None or not isinstance(gate, dict):
            return raw  # a field validator names what is wrong
        gate = dict(gate)
        gate.setdefault("floors", dict(defaults["floors"]))
        if "non_inferiority" not in gate:
            improved = gate.get("improvement") if isinstance(gate.get("improvement"), dict) else {}
            gate["non_inferiority"] = {m: v for m, v in defaults["non_inferiority"].items() if m not in improved}
        return {**raw, "gate": gate}

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
