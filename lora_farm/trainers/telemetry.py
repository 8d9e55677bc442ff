"""What the training loop measures about itself for the farm's guards, and the fault hooks that
let tests and the GPU suite's dry run provoke what a real card does.

- :class:`StepClock`: time spent waiting on the data loader vs the whole step, and steps per
  second, over the window since the last progress event (``window_fields``: ``data_wait_frac``,
  ``step_it_s``). The loop's fetch of a step's micro-batches is timed (``fetching``); a program
  whose batches are handles that load later (images) times its DataLoader with
  :func:`loader_wait`. The runner turns them into the data-bound warning and the throughput watchdog
  (scheduler/guards.py).
- :class:`Faults` (``LORAFARM_FAULT_*``, read once; none set in production):

  ``LORAFARM_FAULT_LOADER_SLEEP_S``  sleep this long per batch the image DataLoader hands over
                                     (a starved loader)
  ``LORAFARM_FAULT_STEP_S``          sleep this long per optimizer step, always (a steady pace)
  ``LORAFARM_FAULT_SLOW_STEP_S``     sleep this long more per optimizer step ...
  ``LORAFARM_FAULT_SLOW_AFTER_STEP`` ... once past this step (default 0) ...
  ``LORAFARM_FAULT_SLOW_CARD``       ... only on this card (``CUDA_VISIBLE_DEVICES``; default any)
  ``LORAFARM_FAULT_OOM_ABOVE_BATCH`` raise a CUDA out-of-memory error for a micro-batch larger
                                     than this (the dry run's stand-in for a real OOM)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Faults:
    loader_sleep_s: float = 0.0
    step_s: float = 0.0
    slow_step_s: float = 0.0
    slow_after_step: int = 0
    oom_above_batch: int = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Faults":
        env = os.environ if environ is None else environ
        card = env.get("LORAFARM_FAULT_SLOW_CARD", "")
        on_this_card = not card or card == env.get("CUDA_VISIBLE_DEVICES", "")
        return cls(loader_sleep_s=float(env.get("LORAFARM_FAULT_LOADER_SLEEP_S") or 0),
                   step_s=float(env.get("LORAFARM_FAULT_STEP_S") or 0),
                   slow_step_s=float(env.get("LORAFARM_FAULT_SLOW_STEP_S") or 0) if on_this_card else 0.0,
                   slow_after_step=int(env.get("LORAFARM_FAULT_SLOW_AFTER_STEP") or 0),
                   oom_above_batch=int(env.get("LORAFARM_FAULT_OOM_ABOVE_BATCH") or 0))

    def after_fetch(self, batches: list[Any]) -> None:
        if self.oom_above_batch and any(_batch_size(b) > self.oom_above_batch for b in batches):
            import torch

            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (LORAFARM_FAULT_OOM_ABOVE_BATCH={self.oom_above_batch}: "
                "a micro-batch too large for the job's cap)")

    def after_step(self, step: int) -> None:
        slow = self.slow_step_s if step > self.slow_after_step else 0.0
        if self.step_s + slow:
            time.sleep(self.step_s + slow)


def _batch_size(batch: Any) -> int:
    """The micro-batch's size: the first dimension of its first tensor."""
    values = batch.values() if isinstance(batch, dict) else [batch]
    for value in values:
        shape = getattr(value, "shape", None)
        if shape:
            return int(shape[0])
        if isinstance(value, (list, tuple)):
            return len(value)
    return 1


_ACTIVE: list["StepClock"] = []  # the clock of this process's training loop, once it runs


@contextmanager
def loader_wait() -> Iterator[None]:
    """Time a wait on the DataLoader into the running loop's clock (none: not counted)."""
    started = time.perf_counter()
    try:
        if _ACTIVE and _ACTIVE[-1].faults.loader_sleep_s:
            time.sleep(_ACTIVE[-1].faults.loader_sleep_s)
        yield
    finally:
        if _ACTIVE:
            _ACTIVE[-1].waiting += time.perf_counter() - started


class StepClock:
    """Loader wait vs step time over the window since the last report."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults.from_env()
        self._reset(time.perf_counter())
        _ACTIVE[:] = [self]

    def _reset(self, now: float) -> None:
        self.window_start, self.waiting, self.steps = now, 0.0, 0

    @contextmanager
    def fetching(self) -> Iterator[list[Any]]:
        """Wrap the fetch of one step's micro-batches; append them to the yielded list."""
        started = time.perf_counter()
        taken: list[Any] = []
        try:
            yield taken
            self.faults.after_fetch(taken)
        finally:
            self.waiting += time.perf_counter() - started

    def step_done(self, step: int) -> None:
        self.faults.after_step(step)
        self.steps += 1

    def window_fields(self) -> dict[str, float | None]:
        """``data_wait_frac`` and ``step_it_s`` of the window; starts the next one."""
        now = time.perf_counter()
        elapsed = now - self.window_start
        fields: dict[str, float | None] = {"data_wait_frac": None, "step_it_s": None}
        if elapsed > 0 and self.steps:
            fields = {"data_wait_frac": round(min(1.0, self.waiting / elapsed), 3),
                      "step_it_s": round(self.steps / elapsed, 4)}
        self._reset(now)
        return fields
