"""Where and in what precision a trainer runs: device, dtypes, autocast, OOM detection, peak VRAM.

The rules (design notes): on CPU everything is float32; on a GPU ``mixed_precision: auto`` takes
bf16 where the card supports it, else fp16 with a GradScaler. Frozen base weights are stored in the
mixed dtype (that is where the VRAM goes); LoRA weights always stay float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """What the runtime and the program need to know about numerics."""

    weight_dtype: torch.dtype  # frozen base weights
    autocast_dtype: torch.dtype | None  # None: no autocast (fp32)
    use_grad_scaler: bool  # fp16 needs loss scaling; bf16 and fp32 do not

    @property
    def name(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.autocast_dtype, "fp32")


def choose_device(local_rank: int = 0) -> torch.device:
    """Visible CUDA device ``local_rank`` (the runner pins the job's cards with
    CUDA_VISIBLE_DEVICES; rank r of a ``gpus: N`` job takes the r-th), else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def choose_precision(mixed_precision: str, device: torch.device) -> Precision:
    """Map the spec's ``mixed_precision`` to dtypes for this device."""
    if device.type != "cuda" or mixed_precision == "no":
        return Precision(torch.float32, None, False)
    if mixed_precision == "bf16" or (mixed_precision == "auto" and torch.cuda.is_bf16_supported()):
        return Precision(torch.bfloat16, torch.bfloat16, False)
    return Precision(torch.float16, torch.float16, True)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """The autocast context of one forward pass (a no-op in fp32)."""
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast_dtype)


def make_grad_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only where fp16 needs it (a disabled one is a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)


def is_out_of_memory(error: BaseException) -> bool:
    """True for a CUDA OOM (any torch version) or a host MemoryError."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(error, RuntimeError):
        return False
    # some kernels raise a plain RuntimeError with the CUDA message instead of the subclass;
    # torch's CPU allocator says "can't allocate memory"
    text = str(error).lower()
    return ("out of memory" in text and "cuda" in text) or "can't allocate memory" in text


def peak_vram_mb(device: torch.device) -> float | None:
    """Peak memory the caching allocator reserved (what nvidia-smi sees), in MiB; None on CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**20, 1)


def reset_peak_vram(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_label(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)`` for the start event and the log."""
    if device.type != "cuda":
        return "cpu"
    return f"{device} ({torch.cuda.get_device_name(device)})"


def apply_memory_cap(device: torch.device, environ: dict[str, str]) -> dict[str, object] | None:
    """Cap this process's CUDA allocator at the share of the card the farm reserved for it
    (``LORAFARM_VRAM_CAP_FRACTION``), so an under-estimated job runs out of memory itself
    instead of its neighbours; what was asked and whether it applied, for the start event.
    On the CPU (a declared card) nothing can be capped: ``applied`` is False."""
    from lora_farm.protocol import VRAM_CAP_FRACTION_ENV, VRAM_CAP_MB_ENV

    text = environ.get(VRAM_CAP_FRACTION_ENV, "")
    if not text:
        return None
    fraction = float(text)
    applied = device.type == "cuda"
    if applied:
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"fraction": fraction, "cap_mb": float(environ.get(VRAM_CAP_MB_ENV) or 0),
            "applied": applied}
