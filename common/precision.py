"""The numeric precision of a run, one object for all of it: how forwards are autocast, whether the loss is
scaled, and how frozen weights are held.

    fp32   no autocast; every weight fp32
    bf16   forwards under bf16 autocast; frozen weights held in bf16 (half the memory of a frozen tower);
           LoRA weights and trained heads stay fp32, so the optimizer updates full-precision values
    fp16   forwards under fp16 autocast over fp32 weights (fp16's range is too narrow to hold them), and
           the loss scaled (torch.amp.GradScaler) because fp16 gradients underflow without it

Training, evaluation, `load_run` and the benchmarks all read their precision from here, so a reloaded
model computes what training evaluated.
"""

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp16")  # the --precision choices
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str = "fp32"

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise ValueError(f"precision {self.name!r} is not one of {', '.join(PRECISIONS)}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype forwards compute in under autocast; None for fp32 (no autocast)."""
        return AUTOCAST_DTYPES[self.name]

    @property
    def frozen_dtype(self) -> torch.dtype | None:
        """The dtype frozen weights are held in (lora.cast_frozen), or None to leave them as loaded."""
        return torch.bfloat16 if self.name == "bf16" else None

    def autocast(self, device: torch.device | str):
        """A fresh context manager: autocast on `device`'s type in this precision, or nothing for fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)

    def grad_scaler(self, device: torch.device | str) -> torch.amp.GradScaler:
        """fp16's loss scaler; for the others a disabled scaler whose calls pass values through."""
        return torch.amp.GradScaler(torch.device(device).type, enabled=self.name == "fp16")
