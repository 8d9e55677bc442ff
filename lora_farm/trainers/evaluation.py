"""The evaluation loss: the mean loss over the examples ``validation_split`` held out, every
``eval_every_steps`` (default: at each checkpoint) and at the end.

Each held-out batch gets the same noise and timesteps at every evaluation (a generator seeded by
the job's seed and the batch's index), so two evaluations differ only by the LoRA. Like samples, it
runs without grad, in eval mode, on a forked RNG: training does not notice.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lora_farm.protocol import EventWriter
from lora_farm.trainers.base import TrainingProgram
from lora_farm.trainers.device import Precision
from lora_farm.trainers.sampling import detached

_SEED_MODULUS = 2**63 - 1


def eval_seed(seed: int, index: int) -> int:
    """The seed of held-out batch ``index``'s noise; apart from every training micro-step's."""
    return ((seed * 1_000_003 + index) * 4 + 3) % _SEED_MODULUS


class Evaluation:
    """Computes and reports the evaluation loss at the steps it is due (rank 0 only)."""

    def __init__(self, program: TrainingProgram, events: EventWriter, precision: Precision):
        self.program = program
        self.events = events
        self.precision = precision
        self.every = program.spec.eval_every

    @property
    def wanted(self) -> bool:
        return self.program.spec.validation_split > 0

    def due(self, step: int, final: bool) -> bool:
        return self.wanted and (final or step % self.every == 0)

    def loss(self) -> float:
        """The weighted mean loss over every held-out batch (as a training step averages)."""
        total, weight = 0.0, 0.0
        with detached(self.program, self.precision):
            for index, batch in enumerate(self.program.eval_batches()):
                generator = torch.Generator(self.program.device).manual_seed(
                    eval_seed(self.program.spec.seed, index))
                share = self.program.loss_weight(batch)
                total += self.program.compute_loss(batch, generator).float().item() * share
                weight += share
        return total / weight if weight else float("nan")

    def run(self, step: int, board: Any) -> float:
        started = time.perf_counter()
        value = self.loss()
        board.add_scalar("eval/loss", value, step)
        self.events.emit("eval", step=step, eval_loss=round(value, 6),
                         seconds=round(time.perf_counter() - started, 3))
        return value
