"""The job record as Python sees it; stored as a flat Redis hash of strings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lora_farm.jobs.state import JobState


@dataclass
class JobRecord:
    id: str
    name: str
    batch: str
    task: str
    config_hash: str
    state: str = JobState.QUEUED.value
    attempt: int = 1
    shutdowns: int = 0  # attempts ended by a worker shutdown: they do not count against max_retries
    priority: int = 0
    max_retries: int = 2
    timeout: float | None = None
    gpus_needed: int = 1
    estimate_mb: float = 0.0
    host_ram_mb: float = 0.0  # peak host RAM (scheduler.host_ram): placement keeps hosts within theirs
    seq: int = 0
    host: str = ""
    worker: str = ""  # the Celery worker (hostname) whose runner executes the job
    gpus: list[str] = field(default_factory=list)  # uuids of the cards it is on
    pid: int | None = None
    submitted: float | None = None
    queued_at: float | None = None  # when it last (re-)entered the queue: starvation counts from it
    scheduled_at: float | None = None
    started: float | None = None
    finished: float | None = None
    updated: float | None = None
    heartbeat: float | None = None
    phase: str = ""
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    eta_s: float | None = None
    peak_vram_mb: float | None = None
    gpu_util: float | None = None  # the card's (or this job's) last SM-busy sample, %
    # telemetry of the running attempt (workers/monitor.py; cleared when an attempt starts)
    sm_busy_mean: float | None = None  # mean SM-busy of the attempt's samples, %
    util_source: str = ""  # process (NVML per process) | card (shared with co_tenants) | none
    co_tenants: list[str] = field(default_factory=list)  # other jobs on the card while sampled
    it_s: float | None = None  # optimizer steps per second over the last progress window
    data_wait_pct: float | None = None  # share of step time spent waiting on the loader (mean)
    warning: str = ""  # data-bound / throughput watchdog, with the fix
    avoid_gpus: list[str] = field(default_factory=list)  # cards a watchdog requeued it away from
    exit_code: int | None = None
    exit_reason: str = ""
    token: str = ""  # the dispatch token: a message whose token differs is stale
    cancel_requested: str = ""
    job_dir: str = ""
    manifest_uri: str = ""
    upload_tries: int = 0
    next_upload_at: float | None = None  # when the reaper tries a failed upload again
    artifacts: dict[str, str] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)  # degraded-plan overrides of the spec
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu(self) -> str:
        return ",".join(self.gpus)

    @property
    def retries_used(self) -> int:
        """Attempts after the first that count against ``max_retries`` (not worker shutdowns)."""
        return max(0, self.attempt - 1 - self.shutdowns)

    def effective_spec(self) -> dict[str, Any]:
        """The spec with the degraded plan applied (what the next attempt trains)."""
        return {**self.spec, **self.plan}

    def duration(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.finished or now) - self.started

    def to_public(self) -> dict[str, Any]:
        """Everything but the spec, JSON-ready (status --json)."""
        return {key: value for key, value in asdict(self).items() if key != "spec"}

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> "JobRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{key: decode_field(key, raw) for key, raw in data.items() if key in known})


# how each field is stored, read from its annotation: lists and dicts as JSON, int, float, else text
_KIND = {f.name: next((kind for kind in ("list", "dict", "int", "float") if f.type.startswith(kind)), "str")
         for f in fields(JobRecord)}


def decode_field(key: str, raw: str) -> Any:
    kind = _KIND.get(key, "str")
    if kind in ("list", "dict"):
        return json.loads(raw) if raw else ([] if kind == "list" else {})
    if raw == "":
        return "" if kind == "str" else None
    if kind == "int":
        return int(float(raw))
    return float(raw) if kind == "float" else raw


def encode_fields(values: dict[str, Any]) -> dict[str, str]:
    """Python values -> hash strings (None -> "", dict/list -> JSON)."""
    encoded: dict[str, str] = {}
    for key, value in values.items():
        if _KIND.get(key) in ("list", "dict"):
            encoded[key] = json.dumps(value, sort_keys=True, default=str)
        elif value is None:
            encoded[key] = ""
        elif isinstance(value, JobState):
            encoded[key] = value.value
        elif isinstance(value, bool):
            encoded[key] = "1" if value else ""
        else:
            encoded[key] = str(value)
    return encoded
