"""The trainer's progress: events (defined in ``lora_farm.protocol``), the human progress line
and TensorBoard."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_farm.protocol import JobDir, format_duration
from lora_farm.trainers.device import peak_vram_mb

if TYPE_CHECKING:
    from lora_farm.trainers.runtime import Runtime, StepPlan


def progress_line(epoch: int, epochs: int, step: int, total: int, loss: float, it_s: float,
                  eta_s: float | None) -> str:
    """``Epoch 1/10 | Step 85/250 | Loss 0.142 | 3.1 it/s | ETA 23m``"""
    return (f"Epoch {epoch}/{epochs} | Step {step}/{total} | Loss {loss:.3f} | "
            f"{it_s:.1f} it/s | ETA {format_duration(eta_s)}")


class Reporter:
    """Progress events (at most one per interval, plus the last step), stdout lines, TensorBoard."""

    def __init__(self, runtime: Runtime, plan: StepPlan, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.runtime = runtime
        self.plan = plan
        self.start_step = start_step
        self.started = time.perf_counter()
        self.last_emit = -math.inf
        self.window: list[float] = []
        self.pending: tuple[int, float] | None = None
        self.lr = 0.0
        # purge_step drops what a crashed attempt logged after the checkpoint we resume from
        self.board: Any = NullBoard()  # only rank 0 writes TensorBoard events
        if runtime.dist.is_main:
            self.board = SummaryWriter(log_dir=str(JobDir(Path(runtime.program.job_dir)).tensorboard),
                                       purge_step=start_step + 1 if start_step else None)

    def step_done(self, step: int, loss: float, lr: float) -> None:
        self.board.add_scalar("train/loss", loss, step)
        self.board.add_scalar("train/lr", lr, step)
        self.window.append(loss)
        self.pending, self.lr = (step, loss), lr
        now = time.perf_counter()
        if step >= self.plan.total_steps or now - self.last_emit >= self.runtime.progress_interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self.pending is None:
            return
        now = time.perf_counter() if now is None else now
        step, _ = self.pending
        elapsed = max(now - self.started, 1e-9)
        it_s = (step - self.start_step) / elapsed
        eta = (self.plan.total_steps - step) / it_s if it_s > 0 else None
        loss = sum(self.window) / len(self.window)  # mean since the last report: steadier to watch
        epoch = self.plan.epoch_of(step - 1) + 1
        self.runtime.events.emit(
            "progress", epoch=epoch, epochs=self.plan.epochs, step=step,
            total_steps=self.plan.total_steps, loss=round(loss, 6), lr=self.lr, it_s=round(it_s, 3),
            eta_s=round(eta, 1) if eta is not None else None,
            peak_vram_mb=peak_vram_mb(self.runtime.device), **self.runtime.clock.window_fields())
        self.runtime.say(progress_line(epoch, self.plan.epochs, step, self.plan.total_steps, loss,
                                        it_s, eta))
        self.board.flush()
        self.window, self.pending, self.last_emit = [], None, now

    def close(self) -> None:
        self.flush()
        self.board.close()


class NullBoard:
    """The TensorBoard writer of ranks other than 0: every call (add_scalar, flush...) does nothing."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *_args, **_kwargs: None
