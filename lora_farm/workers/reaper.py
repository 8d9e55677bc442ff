"""The reaper: makes the ledger true again after a runner died.

- ``running`` with no job lock (its heartbeat stopped renewing it): the runner is gone. On this
  host its trainer group is killed; on any host the attempt is fenced out of the job folder
  (its trainer, which stops by itself when its runner dies, writes nothing more). The job is
  requeued (the trainer resumes from its last checkpoint), cancelled if a cancel was pending, or
  failed when its retries are spent.
- ``scheduled`` with no lock whose card's worker is gone (no heartbeat for ``LOST_BEATS``
  periods), was restarted since the message was sent, or never started it within
  ``stale_after_seconds``: the job goes back to the queue and is placed again (a late copy of the
  message finds a new token and is dropped).
- ``uploading`` with no lock whose next try is due: the upload is tried again.

Every worker runs it on each presence tick under a lease (locks.lease), so one reaper works at a
time and a holder that died (or lost Redis mid-sweep) delays the next sweep by at most a period.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lora_farm.jobs.state import JobState
from lora_farm.ledger import JobRecord, Ledger
from lora_farm.ledger import transitions as tr
from lora_farm.locks import RedisLock, kept_alive, lease
from lora_farm.process_group import kill_group
from lora_farm.protocol import Fence, JobDir
from lora_farm.settings import Settings, host_name
from lora_farm.workers import lifecycle
from lora_farm.workers.dispatch import LOST_BEATS, card_alive
from lora_farm.workers.upload import ship_and_finish

log = logging.getLogger(__name__)
S = JobState


def reap(ledger: Ledger, settings: Settings | None = None, now: float | None = None) -> list[str]:
    """One sweep; returns a line per job it acted on."""
    settings = settings or ledger.settings
    lock = lease(ledger.client, ledger.keys.reaper_lock, settings.heartbeat_seconds)
    if not lock.acquire():
        return []
    actions: list[str] = []
    with lock, kept_alive(lock):
        now = now or time.time()
        for state, handler in ((S.RUNNING, _reap_running), (S.SCHEDULED, _reap_scheduled),
                               (S.UPLOADING, _reap_uploading)):
            for record in ledger.records(_unowned(ledger, ledger.ids_in_state(state))):
                action = handler(ledger, record, settings, now)
                if action:
                    log.warning("reaper: job %s: %s", record.id, action)
                    actions.append(f"{record.id}: {action}")
    return actions


def _unowned(ledger: Ledger, job_ids: set[str]) -> list[str]:
    """The jobs no live runner holds (its job lock); only those records are read."""
    ids = sorted(job_ids)
    pipe = ledger.client.pipeline(transaction=False)
    for job_id in ids:
        pipe.exists(ledger.keys.job_lock(job_id))
    return [job_id for job_id, held in zip(ids, pipe.execute()) if not held]


def _reap_running(ledger: Ledger, record: JobRecord, settings: Settings, now: float) -> str:
    if now - (record.heartbeat or record.started or 0) <= settings.stale_after_seconds:
        return ""
    killed = ""
    if record.host == host_name() and record.pid and kill_group(record.pid):
        killed = f"; killed its orphaned trainer group {record.pid}"
    if record.job_dir and Path(record.job_dir).is_dir():  # and fenced out, on whatever host
        Fence(JobDir(Path(record.job_dir)).fence, record.attempt + 1).raise_to()
    stale = time.strftime('%H:%M:%S', time.localtime(record.heartbeat or 0))
    after = lifecycle.end_attempt(ledger, record, f"runner heartbeat stale since {stale} (worker lost)",
                                  cancel_reason="cancelled (runner was lost)")
    if isinstance(after, tr.Refused):
        return ""
    if after.state == S.QUEUED.value:
        return f"requeued for attempt {after.attempt}" + killed
    return ("failed (no retries left)" if after.state == S.FAILED.value else after.state) + killed


def _reap_scheduled(ledger: Ledger, record: JobRecord, settings: Settings, now: float) -> str:
    reason = _undelivered(ledger, record, settings, now)
    if not reason or isinstance(tr.unschedule(ledger, record.id, reason, record.token), tr.Refused):
        return ""
    return "back to the queue: " + reason


def _undelivered(ledger: Ledger, record: JobRecord, settings: Settings, now: float) -> str:
    """Why the run message of a scheduled job will not be taken; empty while it still may be.

    The message is lost when the card's worker is gone, or when it was restarted after the
    message was sent and has not taken it within ``LOST_BEATS`` heartbeat periods (the dead
    worker had fetched it: Redis keeps it unacked until the visibility timeout)."""
    card = ledger.client.hgetall(ledger.keys.gpu(record.gpus[0])) if record.gpus else {}
    scheduled, since = record.scheduled_at or now, float(card.get("since") or 0)
    if not card_alive(card, settings, now):
        return f"the worker of {record.gpu} is gone (no heartbeat for {LOST_BEATS} periods)"
    if scheduled < since < now - LOST_BEATS * settings.heartbeat_seconds:
        return f"the worker of {record.gpu} restarted after the job was sent to it"
    if now - scheduled > settings.stale_after_seconds:
        return f"not started on {record.gpu} within {settings.stale_after_seconds:.0f}s"
    return ""


def _reap_uploading(ledger: Ledger, record: JobRecord, settings: Settings, now: float) -> str:
    due = record.next_upload_at if record.next_upload_at is not None else (
        (record.updated or now) + settings.stale_after_seconds)  # its runner died mid-upload
    if due > now or not record.job_dir:
        return ""
    lock = RedisLock(ledger.client, ledger.keys.job_lock(record.id), settings.stale_after_seconds)
    if not lock.acquire():
        return ""
    with lock, kept_alive(lock, settings.heartbeat_seconds):
        after = ship_and_finish(ledger, record.id, Path(record.job_dir), settings=settings)
    return f"upload retried: now {after.state if after else '?'}"
