"""How a trainer run ended, decided from evidence (exit status, its last events, our own actions),
and what the farm does next. Pure functions: tested without processes.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lora_farm.ledger.record import JobRecord
from lora_farm.protocol import ExitCode


class Outcome(str, Enum):
    SUCCEEDED = "succeeded"
    OOM = "oom"
    CRASHED = "crashed"
    BAD_INPUT = "bad_input"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    INTERRUPTED = "interrupted"  # SIGTERM from outside the farm: retry, counted
    SHUTDOWN = "shutdown"  # our worker shut down and stopped it: requeue, not counted
    LOST = "lost"  # another runner owns the job now: write nothing
    THROTTLED = "throttled"  # the throughput watchdog stopped it: requeue away from the card


@dataclass
class RunEvidence:
    returncode: int | None
    cancelled: bool = False  # we stopped it because the user cancelled
    timed_out: bool = False  # we stopped it because it ran past its timeout
    lost: bool = False  # we stopped it because our job lock was taken over
    shutdown: bool = False  # our worker was shutting down when the trainer stopped
    last_error: dict[str, Any] | None = None  # the trainer's last `error` event
    exported: bool = False  # an `artifact` or `summary` event was seen
    timeout_s: float | None = None
    throttled: bool = False  # we stopped it because the throughput watchdog said so
    throttle_reason: str = ""


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str  # one line for `exit_reason` in the ledger
    extra: dict[str, Any] = field(default_factory=dict)


def classify(run: RunEvidence) -> Verdict:
    """Our own actions first (cancel, timeout, lost lock), then the trainer's word, then its code."""
    verdict = _classify(run)
    return Verdict(verdict.outcome, verdict.reason, {**verdict.extra, "returncode": run.returncode})


def _classify(run: RunEvidence) -> Verdict:
    if run.lost:
        return Verdict(Outcome.LOST, "job lock taken over by another runner")
    if run.cancelled:
        return Verdict(Outcome.CANCELLED, "cancelled by user")
    if run.timed_out:
        return Verdict(Outcome.TIMED_OUT, f"timed out after {run.timeout_s:.0f}s (spec `timeout`)")
    code = run.returncode
    kind = (run.last_error or {}).get("kind")
    message = (run.last_error or {}).get("message", "")
    if run.shutdown and _stopped_as_asked(code):
        return _shutdown_verdict(code)
    if run.throttled and _stopped_as_asked(code):
        return Verdict(Outcome.THROTTLED, f"{run.throttle_reason}; stopped at a checkpoint and "
                                          "requeued away from the card")
    if code == ExitCode.SUCCESS:
        if run.exported:
            return Verdict(Outcome.SUCCEEDED, "trained")
        return Verdict(Outcome.CRASHED, "trainer exited 0 without exporting weights")
    if code == ExitCode.OUT_OF_MEMORY or kind == "oom":
        return Verdict(Outcome.OOM, _with(f"out of memory (exit {code})", message))
    if code == ExitCode.BAD_INPUT or kind == "bad_input":
        return Verdict(Outcome.BAD_INPUT, _with(f"bad input (exit {code})", message))
    if code == ExitCode.INTERRUPTED or kind == "interrupted":
        return Verdict(Outcome.INTERRUPTED, "trainer interrupted by a signal from outside the farm")
    if code is not None and code < 0:
        name = _signal_name(-code)
        return Verdict(Outcome.CRASHED, f"trainer killed by {name} (the host OOM killer sends "
                                        "SIGKILL; see the job log)")
    return Verdict(Outcome.CRASHED, _with(f"crashed (exit {code})", message))


def _stopped_as_asked(code: int | None) -> bool:
    """Exit 4 after our SIGTERM, or our SIGKILL after the grace: not a failure of the job. A
    trainer that finished, ran out of memory or crashed meanwhile is classified as usual."""
    return code == ExitCode.INTERRUPTED or (code is not None and code < 0)


def _shutdown_verdict(code: int | None) -> Verdict:
    how = ("the trainer stopped at a checkpoint" if code == ExitCode.INTERRUPTED else
           f"the trainer did not stop within the grace ({_signal_name(-(code or 0))})")
    return Verdict(Outcome.SHUTDOWN, f"{how}; the next attempt resumes from the last checkpoint")


def _with(head: str, message: str) -> str:
    message = " ".join(str(message).split())  # whole: the status table cuts it, `status JOB` shows it
    return f"{head}: {message}" if message else head


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def degraded_plan(spec: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any] | None:
    """The plan after an OOM: half the micro-batch, the same effective batch through gradient
    accumulation, gradient checkpointing on. ``None`` when nothing is left to degrade."""
    current = {**spec, **plan}
    batch_size = int(current.get("batch_size", 1))
    accumulation = int(current.get("gradient_accumulation_steps", 1))
    checkpointing = bool(current.get("gradient_checkpointing", False))
    if batch_size <= 1 and checkpointing:
        return None
    new_batch = max(1, batch_size // 2)
    new_accumulation = math.ceil(batch_size * accumulation / new_batch)
    return {**plan, "batch_size": new_batch, "gradient_accumulation_steps": new_accumulation,
            "gradient_checkpointing": True}


def retries_left(record: JobRecord) -> bool:
    """Attempt 1 is the first run; ``max_retries`` more may follow. Attempts that a worker
    shutdown ended are not counted (``JobRecord.retries_used``)."""
    return record.retries_used < record.max_retries
