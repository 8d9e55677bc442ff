"""The placement policy: headroom, jobs per card, starvation, CPU slot, and the guards of a
shared card: the memory cap, the throughput watchdog, the data-bound diagnosis
(``scheduler/policy.yaml``).

It is part of the farm's settings (``Settings.placement``, read once per process): the file named
by ``LORAFARM_POLICY``, else ``scheduler/policy.yaml`` in the current directory, else the one next
to the package (a source checkout); with no file the defaults below hold. ``LORAFARM_HEADROOM``
overrides the file's ``headroom`` (one knob to turn on one host without editing the shared file).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from lora_farm.errors import ConfigError
from lora_farm.settings import Settings, load_settings

_INT_KNOBS = ("max_jobs_per_gpu", "cpu_slot_jobs", "watchdog_warmup_reports")
_REPO_POLICY = Path(__file__).resolve().parents[2] / "scheduler" / "policy.yaml"


@dataclass(frozen=True)
class Policy:
    headroom: float = 0.2  # fraction of each card's total memory never planned for
    max_jobs_per_gpu: int = 8  # processes sharing one card (each has its own CUDA context)
    starvation_seconds: float = 600.0  # after this wait, a job that does not fit holds cards
    cpu_slot_jobs: int = 1  # concurrent jobs on the `cpu` slot of a host without cards
    memory_cap_factor: float = 1.0  # a trainer's allocator cap = reservation x this (0: no cap)
    watchdog_fraction: float = 0.5  # it/s below this share of the job's own median is slow
    watchdog_warmup_reports: int = 3  # progress reports before the median counts
    watchdog_flag_seconds: float = 60.0  # slow this long: flagged (log, ledger, status)
    watchdog_requeue_seconds: float = 300.0  # slow this long: checkpoint, requeue away (0: never)
    suspect_card_seconds: float = 3600.0  # a card a watchdog left is placed last this long
    data_bound_wait_fraction: float = 0.5  # share of step time spent waiting on the loader
    data_bound_util_pct: float = 50.0  # ... while the card's SM-busy is below this

    def __post_init__(self) -> None:
        checks = [("headroom", 0 <= self.headroom < 1, "a fraction in [0, 1), e.g. 0.2"),
                  ("max_jobs_per_gpu", self.max_jobs_per_gpu >= 1, "an integer >= 1"),
                  ("starvation_seconds", self.starvation_seconds >= 0, "seconds >= 0"),
                  ("cpu_slot_jobs", self.cpu_slot_jobs >= 1, "an integer >= 1"),
                  ("memory_cap_factor", self.memory_cap_factor >= 0, "a factor >= 0, e.g. 1.0"),
                  ("watchdog_fraction", 0 < self.watchdog_fraction < 1, "a fraction in (0, 1)"),
                  ("watchdog_warmup_reports", self.watchdog_warmup_reports >= 1, "an integer >= 1"),
                  ("watchdog_flag_seconds", self.watchdog_flag_seconds >= 0, "seconds >= 0"),
                  ("watchdog_requeue_seconds", self.watchdog_requeue_seconds >= 0, "seconds >= 0"),
                  ("suspect_card_seconds", self.suspect_card_seconds >= 0, "seconds >= 0"),
                  ("data_bound_wait_fraction", 0 < self.data_bound_wait_fraction <= 1,
                   "a fraction in (0, 1]"),
                  ("data_bound_util_pct", 0 <= self.data_bound_util_pct <= 100, "a percentage")]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"policy `{name}` must be {expected}, got {getattr(self, name)!r}. "
                                  "Fix: correct it in the policy file (LORAFARM_POLICY) or "
                                  "LORAFARM_HEADROOM.")


def policy_path(configured: str = "") -> Path:
    """Where the policy is read from (it need not exist): the configured file, else the defaults."""
    if configured:
        return Path(configured).expanduser()
    local = Path("scheduler") / "policy.yaml"
    return local if local.is_file() else _REPO_POLICY


def placement_of(settings: Settings) -> Policy:
    """The policy these settings name (``policy``, ``headroom``), read once per process."""
    return _read_once(settings.policy, settings.headroom)


@lru_cache(maxsize=8)
def _read_once(configured: str, headroom: str) -> Policy:
    return read_policy(policy_path(configured), headroom)


def load_policy(path: Path | None = None) -> Policy:
    """The policy of the environment as it is now (fresh settings); ``path`` overrides the file."""
    settings = load_settings()
    return read_policy(path or policy_path(settings.policy), settings.headroom)


def read_policy(path: Path, headroom: str = "") -> Policy:
    """The policy in ``path`` (defaults where it does not exist), ``headroom`` text overriding."""
    values = _read_yaml(path) if path.is_file() else {}
    if headroom:
        values["headroom"] = _headroom_from_env(headroom)
    known = {f.name for f in fields(Policy)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown policy key(s) {unknown}. Fix: use only {sorted(known)}.")
    return Policy(**{name: _typed(path, name, value) for name, value in values.items()})


def _typed(path: Path, name: str, value: Any) -> float | int:
    kind = int if name in _INT_KNOBS else float
    if isinstance(value, bool) or not isinstance(value, (int, float)) or kind(value) != value:
        raise ConfigError(f"{path}: policy `{name}` must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}. Fix: correct it in the policy file.")
    return kind(value)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the policy ({error}). Fix: correct the YAML.") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the policy must be a mapping of key: value, got {type(data).__name__}.")
    return data


def _headroom_from_env(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"LORAFARM_HEADROOM={text!r} is not a number. Fix: set a fraction "
                          "such as 0.2 (20% of each card kept free).") from None
