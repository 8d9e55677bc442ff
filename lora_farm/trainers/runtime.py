"""The training loop that drives any ``TrainingProgram``: phases, optimizer, lr schedule, gradient
accumulation, clipping, mixed precision, checkpoints, resume, SIGTERM, progress and TensorBoard.

Determinism: optimizer step ``s`` always consumes the same micro-batches (epoch ``s // steps_per_epoch``,
micro-batches ``[j * accumulation, (j + 1) * accumulation)`` of that epoch) and every micro-step gets
its randomness from seeds derived from ``(seed, global micro-step)``. A run resumed from a checkpoint
therefore repeats the loss curve of an uninterrupted run, step for step.
"""

from __future__ import annotations

import itertools
import math
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from lora_farm.errors import DatasetError, ModelLoadError
from lora_farm.protocol import EventWriter, Fence, JobDir
from lora_farm.trainers import checkpoint as ckpt
from lora_farm.trainers.base import TrainingProgram
from lora_farm.trainers.device import (
    Precision,
    autocast,
    make_grad_scaler,
    peak_vram_mb,
    reset_peak_vram,
)
from lora_farm.trainers.distributed import DistContext
from lora_farm.trainers.evaluation import Evaluation
from lora_farm.trainers.progress import Reporter
from lora_farm.trainers.publish import export_fenced
from lora_farm.trainers.telemetry import StepClock
from lora_farm.trainers.sampling import Samples

_SEED_MODULUS = 2**63 - 1


class TrainingInterrupted(Exception):
    """Not an error: SIGTERM/SIGINT arrived; a checkpoint at ``step`` was written (control flow)."""

    def __init__(self, step: int, signal_name: str, checkpointed: bool = True):
        self.step = step
        self.signal_name = signal_name
        saved = "checkpoint written" if checkpointed else "outside training, nothing new to save"
        super().__init__(f"interrupted by {signal_name} at step {step}; {saved}")


@dataclass(frozen=True)
class StepPlan:
    """How optimizer steps map onto epochs and micro-batches."""

    micro_per_epoch: int
    accumulation: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.accumulation)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def epoch_of(self, step: int) -> int:
        """0-based epoch of the (0-based) optimizer step ``step``."""
        return step // self.steps_per_epoch

    def first_micro_of(self, step: int) -> int:
        """Index, within its epoch, of the first micro-batch of optimizer step ``step``."""
        return (step % self.steps_per_epoch) * self.accumulation


def make_plan(micro_per_epoch: int, accumulation: int, epochs: int, max_steps: int | None) -> StepPlan:
    if micro_per_epoch < 1:
        raise DatasetError("the training data yields no batch at all; add examples or lower "
                           "`batch_size`")
    return StepPlan(micro_per_epoch, accumulation, max_steps or epochs * math.ceil(micro_per_epoch / accumulation))


def micro_seed(seed: int, global_micro: int, stream: int) -> int:
    """A seed per (job seed, micro-step, stream); stream 0 feeds the program, 1 the global RNG."""
    return ((seed * 1_000_003 + global_micro) * 2 + stream) % _SEED_MODULUS


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (when present) and torch (CPU and every GPU)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


class StopFlag:
    """SIGTERM/SIGINT handling. While ``deferred`` (the train loop) a signal only sets a flag the
    loop checks after each optimizer step, so the step finishes and a checkpoint is written; at any
    other time (loading, export) there is nothing to save and it raises ``TrainingInterrupted``."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.deferred = False
        self.step = 0  # the step a checkpoint already covers, for the immediate case

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, name: str = "request") -> None:
        self.signal_name = self.signal_name or name
        if not self.deferred:
            raise TrainingInterrupted(self.step, name, checkpointed=False)

    @contextmanager
    def installed(self, after: Any = None) -> Iterator[None]:
        """Handle SIGTERM/SIGINT inside the block; on leaving, put back the previous handlers, or
        ``after`` (e.g. ``signal.SIG_IGN`` once the process only has to finish up)."""
        previous = {sig: signal.signal(sig, lambda number, _frame: self.request(signal.Signals(number).name))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if after is None else after)


class Runtime:
    """Runs one program from load to export in this process."""

    def __init__(self, program: TrainingProgram, events: EventWriter, precision: Precision,
                 out: IO[str] | None = None, progress_interval: float = 1.0,
                 dist: DistContext | None = None, fence: Fence | None = None):
        self.program = program
        self.fence = fence or Fence(Path())  # the job folder is written only while it is ours
        self.spec = program.spec
        self.device = program.device
        self.events = events
        self.precision = precision
        self.out = out if out is not None else sys.stdout
        self.progress_interval = progress_interval
        self.dist = dist or DistContext()  # gpus: N -> this process is one of N ranks
        self.stop = StopFlag()
        self.phase_seconds: dict[str, float] = {}
        self.checkpoint_root = JobDir(Path(program.job_dir)).checkpoints
        self.step_losses: dict[int, float] = {}  # optimizer step (1-based) -> loss, this attempt
        self._cursor = _EpochCursor()
        self.clock = StepClock()  # loader wait and steps/s per report (trainers/telemetry.py)
        # samples and the evaluation loss (rank 0): timed apart from the train phase
        self.observers = {"sample": Samples(program, events, self.fence, precision),
                          "eval": Evaluation(program, events, precision)}
        self._observed_seconds = 0.0

    # -- phases -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Load, prepare, train, export; returns the summary event."""
        reset_peak_vram(self.device)
        with self.stop.installed():
            with self._phase("load"):
                seed_everything(self.spec.seed)  # LoRA init draws from the global RNGs
                self.program.check_data()  # bad data fails in seconds, not after a model load
                self.program.load()
                for note in self.program.describe().get("notes", ()):
                    self.say(f"note: {note}")
            with self._phase("prepare"):
                self.program.prepare()
                if self.dist.is_main:
                    self.observers["sample"].prepare()  # a bad prompt file fails now, not mid-run
                plan = make_plan(self.program.micro_batches_per_epoch(),
                                 self.spec.gradient_accumulation_steps * self.dist.world,
                                 self.spec.epochs, self.spec.max_steps)
            with self._phase("train"):
                self._train(plan)
            with self._phase("export"):
                self.program.train_mode(False)
                exported = export_fenced(self.program, self.fence) if self.dist.is_main else []
                for path, kind in exported:
                    self.events.emit("artifact", path=str(path), kind=kind)
        return self._summary(plan)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        self.events.emit("phase", phase=name)
        self.say(f"phase {name}")
        started, observed = time.perf_counter(), self._observed_seconds
        try:
            yield
        finally:
            inside = self._observed_seconds - observed  # samples and evaluations have their own
            self.phase_seconds[name] = round(time.perf_counter() - started - inside, 3)

    def _observe(self, step: int, final: bool, board: Any) -> None:
        """Samples and the evaluation loss due at ``step``, each timed under its own name."""
        if not self.dist.is_main:
            return
        for name, observer in self.observers.items():
            if observer.due(step, final):
                started = time.perf_counter()
                observer.run(step, board)
                spent = time.perf_counter() - started
                self._observed_seconds += spent
                self.phase_seconds[name] = round(self.phase_seconds.get(name, 0.0) + spent, 3)

    def _summary(self, plan: StepPlan) -> dict[str, Any]:
        summary = self.events.emit(
            "summary", final_loss=self.step_losses[max(self.step_losses)] if self.step_losses else None,
            steps=plan.total_steps, epochs=plan.epochs, phase_seconds=self.phase_seconds,
            peak_vram_mb=peak_vram_mb(self.device), precision=self.precision.name,
            **self.program.describe())
        self.say(f"done: {plan.total_steps} steps, final loss {summary['final_loss']}, "
                 f"phases {self.phase_seconds}")
        return summary

    # -- training -----------------------------------------------------------------------------
    def _train(self, plan: StepPlan) -> None:
        params = list(self.program.trainable_parameters())
        if not params:
            raise ModelLoadError("the program has no trainable LoRA parameter; check `target_modules`")
        optimizer = torch.optim.AdamW(params, lr=self.spec.learning_rate)
        scheduler = _make_scheduler(self.spec, optimizer, plan.total_steps)
        scaler = make_grad_scaler(self.device, self.precision)
        step = self._resume(optimizer, scheduler, scaler)
        if step >= plan.total_steps:
            return
        self.program.train_mode(True)
        reporter = Reporter(self, plan, step)
        self.clock.window_fields()  # the first window starts with training, not with the load
        self.stop.step, self.stop.deferred = step, True
        try:
            while step < plan.total_steps:
                loss = self._optimizer_step(plan, step, params, optimizer, scheduler, scaler)
                step += 1
                self.clock.step_done(step)
                self.step_losses[step] = loss
                reporter.step_done(step, loss, scheduler.get_last_lr()[0])
                stopping = self.dist.any(self.stop.requested)  # every rank stops at one step
                if stopping or step % self.spec.save_steps == 0:
                    self._save(plan, step, optimizer, scheduler, scaler, loss)
                    reporter.flush()
                if not stopping:
                    self._observe(step, step >= plan.total_steps, reporter.board)
                if stopping:
                    raise TrainingInterrupted(step, self.stop.signal_name or "signal")
        finally:
            self.stop.deferred = False
            reporter.close()

    def _optimizer_step(self, plan: StepPlan, step: int, params: list[torch.nn.Parameter],
                        optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> float:
        epoch = plan.epoch_of(step)
        first = plan.first_micro_of(step)
        with self.clock.fetching() as micro:
            micro += self._cursor.take(self.program, epoch, first, plan.accumulation)
        if not micro:
            raise DatasetError(f"epoch {epoch + 1} yielded fewer batches than "
                               f"micro_batches_per_epoch()={plan.micro_per_epoch} said")
        weights = [self.program.loss_weight(batch) for batch in micro]  # every rank sees all
        step_weight = sum(weights) or 1.0
        total = 0.0
        for offset, batch in enumerate(micro):
            if offset % self.dist.world != self.dist.rank:
                continue  # rank r computes micro-batches r, r+N, ...
            global_micro = epoch * plan.micro_per_epoch + first + offset
            total += self._micro_step(batch, global_micro, weights[offset] / step_weight, scaler)
        self.dist.sum_gradients(params)
        scaler.unscale_(optimizer)
        if self.spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.spec.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return self.dist.sum(total)  # the step's weighted mean loss

    def _micro_step(self, batch: Any, global_micro: int, share: float, scaler: Any) -> float:
        """Forward + backward of one micro-batch counting ``share`` of its step; its weighted loss."""
        generator = torch.Generator(self.device).manual_seed(micro_seed(self.spec.seed, global_micro, 0))
        torch.manual_seed(micro_seed(self.spec.seed, global_micro, 1))  # dropout draws from here
        with autocast(self.device, self.precision):
            loss = self.program.compute_loss(batch, generator)
        loss = loss.float()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at micro-step {global_micro}; lower "
                                     "`learning_rate` or use `mixed_precision: bf16`/`no`")
        scaler.scale(loss * share).backward()
        return loss.item() * share

    # -- checkpoints --------------------------------------------------------------------------
    def _save(self, plan: StepPlan, step: int, optimizer: Any, scheduler: Any, scaler: Any,
              loss: float) -> None:
        if not self.dist.is_main:
            return
        trainer_state = {"epoch": plan.epoch_of(step - 1) + 1, "total_steps": plan.total_steps,
                         "loss": loss, "config_hash": self.spec.config_hash(), "time": time.time()}
        tensor_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "rng": ckpt.capture_rng_state()}
        saved = ckpt.save_checkpoint(self.checkpoint_root, step, self.program.lora_state_dict(),
                                     trainer_state, tensor_state, self.spec.keep_checkpoints,
                                     self.fence)
        self.events.emit("checkpoint", step=step, path=str(saved.path))

    def _resume(self, optimizer: Any, scheduler: Any, scaler: Any) -> int:
        found = ckpt.latest_checkpoint(self.checkpoint_root)
        if found is None:
            return 0
        try:
            self.program.load_lora_state_dict(found.lora_weights())
            state = found.tensor_state()
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state["scaler"] and scaler.is_enabled():
                scaler.load_state_dict(state["scaler"])
            ckpt.restore_rng_state(state["rng"])
        except (KeyError, ValueError, RuntimeError, OSError) as error:
            raise ModelLoadError(
                f"checkpoint {found.path} does not fit this job ({error}); delete that folder to "
                "start over, or restore the spec it was written with") from error
        self.events.emit("resume", step=found.step, path=str(found.path))
        self.say(f"resumed from {found.path} at step {found.step}")
        return found.step

    def say(self, line: str) -> None:
        if self.dist.is_main:
            print(line, file=self.out, flush=True)


class _EpochCursor:
    """One pass of ``batches(epoch)`` shared by consecutive optimizer steps; a jump (a resume
    mid-epoch) opens a new pass and skips the micro-batches already consumed."""

    def __init__(self) -> None:
        self.epoch, self.position = -1, -1
        self.iterator: Iterator[Any] = iter(())

    def take(self, program: TrainingProgram, epoch: int, first: int, count: int) -> list[Any]:
        if (epoch, first) != (self.epoch, self.position):
            self.iterator = itertools.islice(program.batches(epoch), first, None)
            self.epoch, self.position = epoch, first
        taken = list(itertools.islice(self.iterator, count))
        self.position += len(taken)
        return taken


def _make_scheduler(spec: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = spec.lr_scheduler
    if name == "constant" and spec.lr_warmup_steps > 0:
        name = "constant_with_warmup"  # a warmup the user asked for is never silently dropped
    return get_scheduler(name, optimizer, num_warmup_steps=spec.lr_warmup_steps,
                         num_training_steps=total_steps)
