"""Which numeric precision training uses, decided from the device: a pure function, table-tested."""

from __future__ import annotations

from dataclasses import dataclass

from canaryflow.errors import BadInputError


@dataclass(frozen=True)
class Device:
    cuda: bool
    bf16: bool = False  # the GPU computes in bfloat16 natively (Ampere and newer)
    capability: tuple[int, int] = (0, 0)
    name: str = "cpu"


@dataclass(frozen=True)
class Precision:
    name: str  # bf16, fp16 or fp32
    tf32: bool  # TF32 matmuls allowed

    def trainer_arguments(self) -> dict[str, bool]:
        # fp16 in the Trainer comes with its gradient scaler: the loss scaler fp16 needs.
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16", "tf32": self.tf32}


def current_device() -> Device:
    import torch

    if not torch.cuda.is_available():
        return Device(cuda=False)
    return Device(
        cuda=True,
        bf16=torch.cuda.is_bf16_supported(),
        capability=torch.cuda.get_device_capability(),
        name=torch.cuda.get_device_name(),
    )


def choose(requested: str, device: Device, allow_tf32: bool = True) -> Precision:
    """bf16 where the GPU supports it, fp16 (with a loss scaler) on other GPUs, fp32 on the CPU; TF32 on
    Ampere (compute capability 8.0) and newer when allowed. An explicit request the device cannot honour
    is refused rather than silently changed."""
    tf32 = allow_tf32 and device.cuda and device.capability >= (8, 0)
    if requested == "auto":
        if not device.cuda:
            return Precision("fp32", False)
        return Precision("bf16" if device.bf16 else "fp16", tf32)
    if requested in ("bf16", "fp16") and not device.cuda:
        raise BadInputError(f"train.precision {requested} needs a GPU; this step runs on the CPU (use auto or fp32)")
    if requested == "bf16" and not device.bf16:
        raise BadInputError(f"train.precision bf16: {device.name} does not support bfloat16 (use auto or fp16)")
    return Precision(requested, tf32)
