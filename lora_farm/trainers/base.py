"""The seam between the training runtime (loop, checkpoints, signals, progress) and one kind of
LoRA training (image or LLM). The runtime owns *when*; a program owns *what*.

The runtime calls, in order: ``load()`` (phase ``load``), ``prepare()`` (phase ``prepare``), then
for each micro-step ``compute_loss(batch, generator)`` over ``batches(epoch)``; it saves and restores
``lora_state_dict()`` in checkpoints and finally calls ``export()`` (phase ``export``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lora_farm.jobs.spec import JobSpec


class TrainingProgram(ABC):
    """One kind of LoRA training, driven by the runtime."""

    def __init__(self, spec: JobSpec, job_dir: Path, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.job_dir = job_dir
        self.device = device
        self.dtype = dtype  # the frozen weights' dtype; LoRA weights stay float32

    @abstractmethod
    def load(self) -> None:
        """Load the base model (frozen), inject LoRA, apply ``resume_from`` if set."""

    @abstractmethod
    def prepare(self) -> None:
        """Check every example (raise ``DatasetError`` naming the file) and build the data."""

    @abstractmethod
    def micro_batches_per_epoch(self) -> int:
        """How many batches ``batches(epoch)`` yields."""

    @abstractmethod
    def batches(self, epoch: int) -> Iterator[Any]:
        """The epoch's micro-batches, in an order fixed by (seed, epoch) so a resume can skip."""

    @abstractmethod
    def compute_loss(self, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Forward pass of one micro-batch; randomness (noise, timesteps) comes from ``generator``."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters (the only ones the optimizer sees)."""

    @abstractmethod
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights, for checkpoints."""

    @abstractmethod
    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put checkpointed LoRA weights back."""

    @abstractmethod
    def export(self) -> list[tuple[Path, str]]:
        """Write the final adapter files into ``job_dir``; return ``(path, kind)`` pairs."""

    def loss_weight(self, batch: Any) -> float:
        """How much a micro-batch counts in its optimizer step's mean loss (its examples, its
        label tokens): accumulation then averages exactly as one big batch would."""
        return 1.0

    def train_mode(self, training: bool) -> None:
        """Switch dropout etc. (default: nothing)."""

    def describe(self) -> dict[str, Any]:
        """Facts for the log and the summary (model family, trainable params, examples)."""
        return {}

    def sample_defaults(self) -> dict[str, Any]:
        """What an unset option of a sample prompt means (image: ``width``, ``height``, ``steps``,
        ``guidance`` of the family; llm: ``max_new_tokens``), see ``jobs.prompts.resolve_prompts``."""
        return {}

    def render_sample(self, prompt: dict[str, Any]) -> Any:
        """One resolved sample prompt with the current LoRA: a PIL image (image) or the completion
        (llm). The caller holds no grad, eval mode and a forked RNG (``trainers.sampling``)."""
        raise NotImplementedError(f"{type(self).__name__} renders no samples")

    def eval_batches(self) -> list[Any]:
        """The held-out micro-batches (``validation_split``) in a fixed order; [] when none."""
        return []

    def check_data(self) -> None:
        """Cheap checks of the training data, run before ``load()`` so bad data fails in seconds
        (raise ``DatasetError`` naming the file). Default: nothing; ``prepare()`` still checks."""
