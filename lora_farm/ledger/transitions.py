"""Checked state transitions. Each one WATCHes the job record, checks the move against the state
machine, and writes the record, the state sets, the queue, the reservation and the timeline in
one MULTI/EXEC, so a reader never sees half a transition.

A caller that may lose a race (a user cancelled while a runner starts) passes ``expect``: when the
job is no longer in one of those states (or its dispatch token changed) the call returns ``None``
and writes nothing. Without ``expect`` an illegal move raises ``IllegalTransition`` (a bug).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from lora_farm.errors import JobNotFound
from lora_farm.jobs.state import HOLDS_RESERVATION, JobState, check_transition
from lora_farm.ledger.record import JobRecord, encode_fields
from lora_farm.ledger.store import Ledger, queue_score

S = JobState
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


def apply(ledger: Ledger, job_id: str, move: Move, *, expect: set[JobState] | None = None,
          token: str | None = None, now: float | None = None) -> JobRecord | None:
    """Run one checked transition; see the module docstring for ``expect`` and ``token``."""
    keys = ledger.keys

    def write(pipe: redis.client.Pipeline) -> JobRecord | None:
        data = pipe.hgetall(keys.job(job_id))
        if not data:
            raise JobNotFound(f"no job `{job_id}` in the ledger (prefix {keys.prefix!r}).")
        record = JobRecord.from_hash(data)
        old = S(record.state)
        if expect is not None and (old not in expect or (token is not None and record.token != token)):
            return None
        steps = [move.via, move.to] if move.via else [move.to]
        current = old
        for step in steps:
            check_transition(current, step, job_id)
            current = step
        stamp = now or time.time()
        released = pipe.hget(keys.reservations, job_id)
        pipe.multi()
        _write_move(pipe, ledger, record, old, move, stamp, released)
        return record

    before = ledger.client.transaction(write, keys.job(job_id), value_from_callable=True)
    return None if before is None else ledger.get(job_id)


def _write_move(pipe: redis.client.Pipeline, ledger: Ledger, record: JobRecord, old: JobState,
                move: Move, now: float, released: str | None) -> None:
    keys, job_id = ledger.keys, record.id
    values = {**move.fields, "state": move.to.value, "updated": now}
    if move.requeued:
        values["queued_at"] = now
    pipe.hset(keys.job(job_id), mapping=encode_fields(values))
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


# ---- the named transitions the farm uses ------------------------------------------------------

def schedule(ledger: Ledger, job_id: str, gpus: list[str], mb: float, token: str,
             now: float | None = None) -> JobRecord | None:
    """queued -> scheduled on ``gpus``, reserving ``mb`` on each (dispatch, under its lock)."""
    move = Move(S.SCHEDULED, fields={"gpus": gpus, "token": token, "scheduled_at": now or time.time()},
                reserve={"gpus": gpus, "mb": round(mb, 1)}, reason="placed")
    return apply(ledger, job_id, move, expect={S.QUEUED}, now=now)


def start(ledger: Ledger, job_id: str, token: str, host: str, worker: str = "",
          now: float | None = None) -> JobRecord | None:
    """scheduled -> running, only for the message carrying the job's current dispatch token.

    ``worker`` is the Celery worker whose runner executes it: the one that stops it when it
    shuts down."""
    now = now or time.time()
    move = Move(S.RUNNING, reason="runner started", fields={
        "host": host, "worker": worker, "started": now, "finished": None, "heartbeat": now,
        "phase": "",
        "step": None, "total_steps": None, "loss": None, "eta_s": None, "exit_code": None,
        "exit_reason": ""})
    return apply(ledger, job_id, move, expect={S.SCHEDULED}, token=token, now=now)


def requeue(ledger: Ledger, job_id: str, reason: str, *, expect: set[JobState],
            plan: dict[str, Any] | None = None, token: str | None = None,
            exit_code: int | None = None, shutdown: bool = False) -> JobRecord | None:
    """running/scheduled -> retrying -> queued, next attempt, optionally with a degraded plan.

    ``shutdown``: the attempt ended because its worker shut down; it is counted in
    ``shutdowns`` and so does not use up the job's retry budget."""
    current = ledger.get(job_id)
    fields = {**_RUN_FIELDS_CLEARED, "attempt": current.attempt + 1, "exit_reason": reason,
              "exit_code": exit_code}
    if shutdown:
        fields["shutdowns"] = current.shutdowns + 1
    if plan is not None:
        fields["plan"] = plan
    move = Move(S.QUEUED, via=S.RETRYING, fields=fields, reason=reason, requeued=True)
    return apply(ledger, job_id, move, expect=expect, token=token)


def unschedule(ledger: Ledger, job_id: str, reason: str, token: str) -> JobRecord | None:
    """scheduled -> queued (same attempt): the card's worker went away before the job started.
    Its wait goes on (``queued_at`` is kept): it never ran."""
    move = Move(S.QUEUED, fields=dict(_RUN_FIELDS_CLEARED), reason=reason)
    return apply(ledger, job_id, move, expect={S.SCHEDULED}, token=token)


def fail(ledger: Ledger, job_id: str, reason: str, *, expect: set[JobState],
         exit_code: int | None = None, token: str | None = None) -> JobRecord | None:
    move = Move(S.FAILED, reason=reason, fields={"exit_reason": reason, "exit_code": exit_code,
                                                  "finished": time.time()})
    return apply(ledger, job_id, move, expect=expect, token=token)


def finish_cancelled(ledger: Ledger, job_id: str, reason: str = "cancelled by user", *,
                     expect: set[JobState], token: str | None = None) -> JobRecord | None:
    move = Move(S.CANCELLED, reason=reason, fields={"exit_reason": reason,
                                                     "finished": time.time()})
    return apply(ledger, job_id, move, expect=expect, token=token)


def begin_upload(ledger: Ledger, job_id: str, token: str, job_dir: str,
                 exit_code: int = 0) -> JobRecord | None:
    """running -> uploading: training is done, the weights are on disk; the card is released."""
    move = Move(S.UPLOADING, reason="trained", fields={"job_dir": job_dir, "exit_code": exit_code,
                                                       "exit_reason": "trained", "phase": "upload"})
    return apply(ledger, job_id, move, expect={S.RUNNING}, token=token)


def upload_succeeded(ledger: Ledger, job_id: str, uris: dict[str, str],
                     manifest_uri: str) -> JobRecord | None:
    """uploading -> succeeded with the artifact URIs (also the end of `lorafarm retry-upload`)."""
    move = Move(S.SUCCEEDED, reason="uploaded", fields={
        "artifacts": uris, "manifest_uri": manifest_uri, "finished": time.time(),
        "exit_reason": "succeeded", "phase": "done"})
    return apply(ledger, job_id, move, expect={S.UPLOADING})


def upload_failed(ledger: Ledger, job_id: str, error: str, *, final: bool = False) -> JobRecord | None:
    """The upload did not work: stay ``uploading`` (weights on disk, retry later) or fail."""
    reason = f"upload failed: {error}"
    if final:
        return fail(ledger, job_id, reason, expect={S.UPLOADING})
    return apply(ledger, job_id, Move(S.UPLOADING, reason=reason, fields={"exit_reason": reason}),
                 expect={S.UPLOADING})


def retry(ledger: Ledger, job_id: str) -> JobRecord | None:
    """failed/cancelled -> queued (`lorafarm retry`): a fresh retry budget, same degraded plan."""
    current = ledger.get(job_id)
    move = Move(S.QUEUED, reason="retry requested", fields={
        **_RUN_FIELDS_CLEARED, "attempt": current.attempt + 1, "cancel_requested": "",
        "exit_reason": "", "exit_code": None, "finished": None,
        "max_retries": current.max_retries + current.retries_used + 1}, requeued=True)
    return apply(ledger, job_id, move, expect={S.FAILED, S.CANCELLED})


def cancel(ledger: Ledger, job_id: str) -> str:
    """Cancel a job wherever it is; returns what happened, for the user.

    Not yet running: ``cancelled`` at once (a message already on a card's queue then finds the
    job cancelled and is dropped). Running: the runner is asked to stop the trainer's process
    group and moves the job to ``cancelled`` itself (the reaper does it if the runner is gone).
    """
    for _ in range(3):  # the job may move on between reading it and writing (a runner starting)
        record = ledger.get(job_id)
        state = S(record.state)
        if state in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
            return f"already {state.value}"
        if state == S.RUNNING:
            ledger.request_cancel(job_id)
            if ledger.get(job_id).state == S.RUNNING.value:
                return "stopping (the runner kills the trainer, then marks it cancelled)"
            continue
        if finish_cancelled(ledger, job_id, expect={state}) is not None:
            return "cancelled"
    return f"not cancelled: it kept changing state (now {ledger.get(job_id).state}); try again"
