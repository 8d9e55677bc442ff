"""One error hierarchy for the whole farm.

Every error a user can cause carries a message that says what was wrong, with which value,
and what to do. The CLI prints ``str(error)`` and exits 1, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class LoraFarmError(Exception):
    """Raised for any failure lora-farm reports to its user (base of all our errors)."""


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong in one job spec file."""

    file: str
    field: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.file}: `{self.field}` {self.message}" if self.field else f"{self.file}: {self.message}"
        return f"{text} Fix: {self.fix}" if self.fix else text


class SpecError(LoraFarmError):
    """Raised when one or more job spec files are invalid; holds every problem found."""

    def __init__(self, problems: list[SpecProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class DatasetError(LoraFarmError):
    """Raised when training data is missing, empty or unreadable (names the file)."""


class ModelLoadError(LoraFarmError):
    """Raised when a base model or a LoRA to resume from cannot be loaded."""


class ConfigError(LoraFarmError):
    """Raised when a farm setting (environment variable, inventory, policy file) is invalid."""


class BrokerUnavailable(LoraFarmError):
    """Raised when Redis does not answer at the configured URL."""


class JobNotFound(LoraFarmError):
    """Raised when a job id (or prefix) matches no job in the ledger."""


class IllegalTransition(LoraFarmError):
    """Raised when code tries a job state change the state machine forbids (a bug)."""


class NoCapacity(LoraFarmError):
    """Raised when a job needs more VRAM or cards than any host of the farm has."""


class StorageError(LoraFarmError):
    """Raised when artifact storage fails (upload, download or verification)."""


class StorageUnavailable(StorageError):
    """Raised when storage cannot be reached (outage, 5xx); the upload is worth retrying later."""


class ArtifactMissing(LoraFarmError):
    """Raised when a job folder lacks the weights a finished training must have exported."""


class GpuInventoryError(LoraFarmError):
    """Raised when the GPU inventory cannot be read or a declared inventory is malformed."""
