"""Checked state transitions. Each one WATCHes the job record, checks the move against the state
machine, and writes the record, the state sets, the queue, the reservation and the timeline in
one MULTI/EXEC, so a reader never sees half a transition; it returns the record it wrote.

A move may lose a race (a user cancelled while a runner starts): each named transition expects
the job in one of the states the table lets it leave from (``state.sources``), or in the narrower
set its caller passes, and with the caller's dispatch ``token``. Otherwise it writes nothing and
returns :class:`Refused`, which says why; callers handle it. ``apply`` without ``expect`` raises
``IllegalTransition`` for an illegal move (a bug). Entering ``failed`` or ``cancelled`` archives
the job's logs (``logs.tar.gz``): every end of a job keeps them, whoever ends it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from lora_farm.archive import archive_at_end
from lora_farm.errors import JobNotFound
from lora_farm.jobs.state import ENDED_UNSHIPPED, HOLDS_RESERVATION, JobState, check_transition, sources
from lora_farm.ledger.record import JobRecord, encode_fields
from lora_farm.ledger.store import Ledger, queue_score

S = JobState
_TELEMETRY_CLEARED = {"gpu_util": None, "sm_busy_mean": None, "util_source": "", "co_tenants": [],
                      "it_s": None, "data_wait_pct": None, "warning": ""}
_RUN_FIELDS_CLEARED = {"host": "", "worker": "", "gpus": [], "pid": None, "token": "",
                       "heartbeat": None, "scheduled_at": None}


@dataclass
class Move:
    """What one transition writes besides the state itself."""

    to: JobState
    via: JobState | None = None  # a state passed through in the same pipeline (retrying)
    fields: dict[str, Any] = field(default_factory=dict)
    reserve: dict[str, Any] | None = None  # {gpus, mb}: take a reservation
    reason: str = ""
    requeued: bool = False  # back in the queue as a new attempt: its wait starts now (queued_at)
    derive: Callable[[JobRecord], dict[str, Any]] | None = None  # fields from the record as read


@dataclass(frozen=True)
class Refused:
    """A transition that did not happen: the job had moved on (``state``) or was re-dispatched."""

    job_id: str
    state: str
    why: str

    def __bool__(self) -> bool:
        return False


def apply(ledger: Ledger, job_id: str, move: Move, *, expect: set[JobState] | None = None,
          token: str | None = None, now: float | None = None) -> JobRecord | Refused:
    """Run one checked transition; see the module docstring for ``expect`` and ``token``."""
    keys = ledger.keys

    def write(pipe: redis.client.Pipeline) -> JobRecord | Refused:
        data = pipe.hgetall(keys.job(job_id))
        if not data:
            raise JobNotFound(f"no job `{job_id}` in the ledger (prefix {keys.prefix!r}).")
        record = JobRecord.from_hash(data)
        old = S(record.state)
        refused = _refusal(record, move, expect, token)
        if refused is not None:
            return refused
        if move.via:
            check_transition(old, move.via, job_id)
        check_transition(move.via or old, move.to, job_id)
        stamp = now or time.time()
        released = pipe.hget(keys.reservations, job_id)
        pipe.multi()
        values = _write_move(pipe, ledger, record, old, move, stamp, released)
        return JobRecord.from_hash({**data, **values})

    written = ledger.client.transaction(write, keys.job(job_id), value_from_callable=True)
    if isinstance(written, JobRecord) and move.to in ENDED_UNSHIPPED:
        archive_at_end(written.job_dir)
    return written


def _refusal(record: JobRecord, move: Move, expect: set[JobState] | None,
             token: str | None) -> Refused | None:
    if expect is not None and S(record.state) not in expect:
        return Refused(record.id, record.state, f"is {record.state}, not {' or '.join(sorted(expect))}")
    if expect is not None and token is not None and record.token != token:
        return Refused(record.id, record.state, "was dispatched again (another token)")
    return None


def _write_move(pipe: redis.client.Pipeline, ledger: Ledger, record: JobRecord, old: JobState,
                move: Move, now: float, released: str | None) -> dict[str, str]:
    """Queue the writes of one move; returns the job hash fields it sets."""
    keys, job_id = ledger.keys, record.id
    values = {**move.fields, **(move.derive(record) if move.derive else {}), "state": move.to.value,
              "updated": now}
    if move.requeued:
        values["queued_at"] = now
    encoded = encode_fields(values)
    pipe.hset(keys.job(job_id), mapping=encoded)
    pipe.srem(keys.state(old.value), job_id)
    pipe.sadd(keys.state(move.to.value), job_id)
    if move.to == S.QUEUED:
        pipe.zadd(keys.queue, {job_id: queue_score(record.priority, record.seq)})
    elif old == S.QUEUED:
        pipe.zrem(keys.queue, job_id)
    entries = []
    if move.via:
        entries.append({"t": now, "from": old.value, "to": move.via.value, "reason": move.reason})
    entry: dict[str, Any] = {"t": now, "from": (move.via or old).value, "to": move.to.value,
                             "reason": move.reason, "attempt": values.get("attempt", record.attempt)}
    if move.reserve is not None:
        pipe.hset(keys.reservations, job_id, json.dumps({**move.reserve, "since": now}))
        entry.update(gpus=move.reserve["gpus"], reserved_mb=move.reserve["mb"])
    elif released and move.to not in HOLDS_RESERVATION:
        held = json.loads(released)
        pipe.hdel(keys.reservations, job_id)
        entry.update(gpus=held["gpus"], released_mb=held["mb"])
    entries.append(entry)
    pipe.rpush(keys.timeline(job_id), *(json.dumps(item) for item in entries))
    return encoded


# ---- the named transitions the farm uses ------------------------------------------------------
# Each expects the job in a state the table lets it leave from (``sources``), unless the caller
# narrows that (a runner: only its own ``running`` job, with its token).

Result = JobRecord | Refused


def schedule(ledger: Ledger, job_id: str, gpus: list[str], mb: float, token: str,
             now: float | None = None) -> Result:
    """queued -> scheduled on ``gpus``, reserving ``mb`` on each (dispatch, under its lock)."""
    move = Move(S.SCHEDULED, fields={"gpus": gpus, "token": token, "scheduled_at": now or time.time()},
                reserve={"gpus": gpus, "mb": round(mb, 1)}, reason="placed")
    return apply(ledger, job_id, move, expect=sources(S.SCHEDULED), now=now)


def start(ledger: Ledger, job_id: str, token: str, host: str, worker: str = "",
          now: float | None = None) -> Result:
    """scheduled -> running, only for the message carrying the job's current dispatch token.

    ``worker`` is the Celery worker whose runner executes it: the one that stops it when it
    shuts down."""
    now = now or time.time()
    move = Move(S.RUNNING, reason="runner started", fields={
        "host": host, "worker": worker, "started": now, "finished": None, "heartbeat": now,
        "phase": "",
        "step": None, "total_steps": None, "loss": None, "eta_s": None, "exit_code": None,
        "exit_reason": "", **_TELEMETRY_CLEARED})
    return apply(ledger, job_id, move, expect=sources(S.RUNNING), token=token, now=now)


def requeue(ledger: Ledger, job_id: str, reason: str, *, expect: set[JobState] | None = None,
            plan: dict[str, Any] | None = None, token: str | None = None,
            exit_code: int | None = None, shutdown: bool = False,
            avoid: list[str] | None = None) -> Result:
    """running/scheduled -> retrying -> queued, next attempt, optionally with a degraded plan.

    ``shutdown``: the attempt ended because its worker shut down; it is counted in
    ``shutdowns`` and so does not use up the job's retry budget. ``avoid``: cards placement
    keeps it off while they are suspect (the throughput watchdog's requeue)."""
    fields = {**_RUN_FIELDS_CLEARED, "exit_reason": reason, "exit_code": exit_code}
    if plan is not None:
        fields["plan"] = plan
    if avoid is not None:
        fields["avoid_gpus"] = avoid

    def next_attempt(record: JobRecord) -> dict[str, Any]:
        counted = {"attempt": record.attempt + 1}
        return {**counted, "shutdowns": record.shutdowns + 1} if shutdown else counted

    move = Move(S.QUEUED, via=S.RETRYING, fields=fields, reason=reason, requeued=True,
                derive=next_attempt)
    return apply(ledger, job_id, move, expect=expect or sources(S.RETRYING), token=token)


def unschedule(ledger: Ledger, job_id: str, reason: str, token: str) -> Result:
    """scheduled -> queued (same attempt): the card's worker went away before the job started.
    Its wait goes on (``queued_at`` is kept): it never ran."""
    move = Move(S.QUEUED, fields=dict(_RUN_FIELDS_CLEARED), reason=reason)
    return apply(ledger, job_id, move, expect={S.SCHEDULED}, token=token)


def fail(ledger: Ledger, job_id: str, reason: str, *, expect: set[JobState] | None = None,
         exit_code: int | None = None, token: str | None = None) -> Result:
    move = Move(S.FAILED, reason=reason, fields={"exit_reason": reason, "exit_code": exit_code,
                                                  "finished": time.time()})
    return apply(ledger, job_id, move, expect=expect or sources(S.FAILED), token=token)


def finish_cancelled(ledger: Ledger, job_id: str, reason: str = "cancelled by user", *,
                     expect: set[JobState] | None = None, token: str | None = None) -> Result:
    move = Move(S.CANCELLED, reason=reason, fields={"exit_reason": reason,
                                                     "finished": time.time()})
    return apply(ledger, job_id, move, expect=expect or sources(S.CANCELLED), token=token)


def begin_upload(ledger: Ledger, job_id: str, token: str, job_dir: str,
                 exit_code: int = 0) -> Result:
    """running -> uploading: training is done, the weights are on disk; the card is released."""
    move = Move(S.UPLOADING, reason="trained", fields={"job_dir": job_dir, "exit_code": exit_code,
                                                       "exit_reason": "trained", "phase": "upload"})
    return apply(ledger, job_id, move, expect=sources(S.UPLOADING), token=token)


def upload_succeeded(ledger: Ledger, job_id: str, uris: dict[str, str],
                     manifest_uri: str) -> Result:
    """uploading -> succeeded with the artifact URIs (also the end of `lorafarm retry-upload`)."""
    move = Move(S.SUCCEEDED, reason="uploaded", fields={
        "artifacts": uris, "manifest_uri": manifest_uri, "finished": time.time(),
        "exit_reason": "succeeded", "phase": "done"})
    return apply(ledger, job_id, move, expect=sources(S.SUCCEEDED))


def upload_waits(ledger: Ledger, job_id: str, error: str) -> Result:
    """The upload did not work: stay ``uploading`` (weights on disk) and try again later."""
    reason = f"upload failed: {error}"
    return apply(ledger, job_id, Move(S.UPLOADING, reason=reason, fields={"exit_reason": reason}),
                 expect={S.UPLOADING})


def retry(ledger: Ledger, job_id: str) -> Result:
    """failed/cancelled -> queued (`lorafarm retry`): a fresh retry budget, same degraded plan."""
    def fresh_budget(record: JobRecord) -> dict[str, Any]:
        return {"attempt": record.attempt + 1,
                "max_retries": record.max_retries + record.retries_used + 1}

    move = Move(S.QUEUED, reason="retry requested", fields={
        **_RUN_FIELDS_CLEARED, "cancel_requested": "", "exit_reason": "", "exit_code": None,
        "finished": None}, requeued=True, derive=fresh_budget)
    return apply(ledger, job_id, move, expect={S.FAILED, S.CANCELLED})
