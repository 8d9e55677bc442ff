"""The trainer's human progress line (the events themselves are in ``lora_farm.protocol``)."""

from __future__ import annotations

from lora_farm.protocol import format_duration


def progress_line(epoch: int, epochs: int, step: int, total: int, loss: float, it_s: float,
                  eta_s: float | None) -> str:
    """``Epoch 1/10 | Step 85/250 | Loss 0.142 | 3.1 it/s | ETA 23m``"""
    return (f"Epoch {epoch}/{epochs} | Step {step}/{total} | Loss {loss:.3f} | "
            f"{it_s:.1f} it/s | ETA {format_duration(eta_s)}")
