"""The reaper: makes the ledger true again after a runner died.

- ``running`` with no job lock (its heartbeat stopped renewing it): the runner is gone. On this
  host its trainer group is killed; the job is requeued (the trainer resumes from its last
  checkpoint), cancelled if a cancel was pending, or failed when its retries are spent.
- ``scheduled`` for longer than ``stale_after_seconds`` with no lock: the message went to a card
  whose worker vanished; the job goes back to the queue (a late copy of the message finds a new
  token and is dropped).
- ``uploading`` with no lock whose next try is due: the upload is tried again.

Every worker runs it periodically under a lock, so one reaper works at a time.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from lora_farm.archive import archive_at_end
from lora_farm.jobs.state import JobState
from lora_farm.ledger import JobRecord, Ledger
from lora_farm.ledger import transitions as tr
from lora_farm.locks import RedisLock, kept_alive
from lora_farm.process_group import kill_group
from lora_farm.settings import Settings, get_settings
from lora_farm.workers.outcome import retries_left
from lora_farm.workers.upload import ship_and_finish

log = logging.getLogger(__name__)
S = JobState


def reap(ledger: Ledger, settings: Settings | None = None, now: float | None = None) -> list[str]:
    """One sweep; returns a line per job it acted on."""
    settings = settings or get_settings()
    lock = RedisLock(ledger.client, ledger.keys.reaper_lock, ttl_seconds=120)
    if not lock.acquire():
        return []
    actions: list[str] = []
    with lock:
        now = now or time.time()
        for state, handler in ((S.RUNNING, _reap_running), (S.SCHEDULED, _reap_scheduled),
                               (S.UPLOADING, _reap_uploading)):
            for record in ledger.records(ledger.ids_in_state(state)):
                if ledger.client.exists(ledger.keys.job_lock(record.id)):
                    continue  # a live runner owns it
                action = handler(ledger, record, settings, now)
                if action:
                    log.warning("reaper: job %s: %s", record.id, action)
                    actions.append(f"{record.id}: {action}")
    return actions


def _reap_running(ledger: Ledger, record: JobRecord, settings: Settings, now: float) -> str:
    if now - (record.heartbeat or record.started or 0) <= settings.stale_after_seconds:
        return ""
    killed = ""
    if record.host == socket.gethostname() and record.pid and kill_group(record.pid):
        killed = f"; killed its orphaned trainer group {record.pid}"
    reason = f"runner heartbeat stale since {time.strftime('%H:%M:%S', time.localtime(record.heartbeat or 0))} (worker lost)"
    expect = {S.RUNNING}
    if ledger.cancel_requested(record.id):
        archive_at_end(record.job_dir)
        tr.finish_cancelled(ledger, record.id, "cancelled (runner was lost)", expect=expect,
                            token=record.token)
        return "cancelled" + killed
    if retries_left(record):
        tr.requeue(ledger, record.id, reason, expect=expect, token=record.token)
        return f"requeued for attempt {record.attempt + 1}" + killed
    archive_at_end(record.job_dir)
    tr.fail(ledger, record.id, f"{reason}; no retries left", expect=expect, token=record.token)
    return "failed (no retries left)" + killed


def _reap_scheduled(ledger: Ledger, record: JobRecord, settings: Settings, now: float) -> str:
    if now - (record.scheduled_at or now) <= settings.stale_after_seconds:
        return ""
    reason = f"not started on {record.gpu} within {settings.stale_after_seconds:.0f}s"
    if tr.unschedule(ledger, record.id, reason, record.token) is None:
        return ""
    return "back to the queue: " + reason


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
