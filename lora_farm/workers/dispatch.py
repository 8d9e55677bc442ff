"""Dispatch: one placement pass under a Redis lock, routing each placed job to ``gpu.<uuid>``.

Triggered by submit, by the end of every job (its card is free) and periodically by every
worker. Passes never overlap: a trigger that finds the lock taken leaves a "dirty" mark, and the
holder runs one more pass before it lets go, so no trigger is lost.

Only cards whose worker heartbeat is fresh (``card_alive``) are placed on: a job is never routed
to a queue no worker listens to. The dispatch lock is a lease (locks.lease): a holder that died
blocks the next pass for at most a heartbeat period.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable

from lora_farm.ledger import Ledger
from lora_farm.ledger import transitions as tr
from lora_farm.locks import kept_alive, lease
from lora_farm.scheduler.place import GpuSnapshot, Placement, QueuedJob, Reservation, place
from lora_farm.scheduler.policy import Policy, placement_of
from lora_farm.settings import Settings

log = logging.getLogger(__name__)

# send(job_id, token, queue): puts the run message on the card's queue (Celery in production)
Sender = Callable[[str, str, str], None]
MAX_PASSES = 5
QUEUE_WINDOW = 5000  # queued jobs one pass looks at (the rest wait their turn)
LOST_BEATS = 3  # heartbeat periods without a card snapshot before its worker counts as gone


def celery_sender(job_id: str, token: str, queue: str) -> None:
    from lora_farm.workers.broker import send_run_job

    send_run_job(job_id, token, queue)


def dispatch_once(ledger: Ledger, send: Sender = celery_sender, *, settings: Settings | None = None,
                  policy: Policy | None = None, now: float | None = None) -> list[Placement]:
    """Run placement passes until nobody asked for another one; never blocks on the lock.

    Returns the jobs placed; empty also when another pass held the lock (it runs again for us).
    """
    settings = settings or ledger.settings
    policy = policy or placement_of(settings)
    keys = ledger.keys
    lock = lease(ledger.client, keys.dispatch_lock, settings.heartbeat_seconds)
    if not lock.acquire():
        ledger.client.set(keys.dispatch_dirty, "1", ex=120)
        return []
    placed: list[Placement] = []
    with lock, kept_alive(lock):
        for _ in range(MAX_PASSES):
            ledger.client.delete(keys.dispatch_dirty)
            placed += placement_pass(ledger, send, settings, policy, now)
            if not ledger.client.exists(keys.dispatch_dirty):
                break
    return placed


def placement_pass(ledger: Ledger, send: Sender, settings: Settings, policy: Policy,
                   now: float | None = None) -> list[Placement]:
    now = now or time.time()
    jobs = queued_jobs(ledger)
    if not jobs:
        return []
    gpus = live_gpus(ledger, settings, now)
    placements = place(jobs, gpus, reservations(ledger), policy, now)
    estimates = {job.job_id: job.estimate_mb for job in jobs}
    return [placement for placement in placements
            if _route(ledger, placement, estimates[placement.job_id], send)]


def _route(ledger: Ledger, placement: Placement, mb: float, send: Sender) -> bool:
    """Reserve in the ledger first, then send; a failed send gives the job back to the queue."""
    token = uuid.uuid4().hex[:16]
    if isinstance(tr.schedule(ledger, placement.job_id, placement.gpu_uuids, mb, token), tr.Refused):
        return False  # cancelled since the pass read the queue
    queue = f"gpu.{placement.gpu_uuids[0]}"
    try:
        send(placement.job_id, token, queue)
    except Exception as error:  # the broker refused: never leave a job scheduled with no message
        log.error("job %s: could not send to %s (%s); back to the queue", placement.job_id, queue, error)
        tr.unschedule(ledger, placement.job_id, f"send to {queue} failed: {error}", token)
        return False
    log.info("job %s -> %s (%.0f MiB reserved)", placement.job_id, queue, mb)
    return True


def queued_jobs(ledger: Ledger, limit: int = QUEUE_WINDOW) -> list[QueuedJob]:
    ids = ledger.queued_ids(limit)
    pipe = ledger.client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(ledger.keys.job(job_id), "priority", "submitted", "estimate_mb", "gpus_needed",
                   "queued_at", "host_ram_mb", "avoid_gpus")
    jobs = []
    for job_id, (priority, submitted, estimate, gpus, queued_at, host_ram, avoid) in zip(ids, pipe.execute()):
        if submitted is None:
            continue  # a record deleted under us
        jobs.append(QueuedJob(job_id, int(priority or 0), float(submitted), float(estimate or 0),
                              int(gpus or 1), float(queued_at) if queued_at else None, float(host_ram or 0),
                              tuple(json.loads(avoid)) if avoid else ()))
    return jobs


def reservations(ledger: Ledger) -> list[Reservation]:
    """Every card a job holds, with the job's host RAM (read from its record, one pipeline)."""
    held_by = ledger.reservations()
    pipe = ledger.client.pipeline(transaction=False)
    for job_id in held_by:
        pipe.hget(ledger.keys.job(job_id), "host_ram_mb")
    host_ram = dict(zip(held_by, pipe.execute()))
    return [Reservation(job_id, gpu, float(held["mb"]), float(host_ram[job_id] or 0))
            for job_id, held in held_by.items() for gpu in held["gpus"]]


def live_gpus(ledger: Ledger, settings: Settings, now: float) -> list[GpuSnapshot]:
    """Cards whose worker is alive (``card_alive``)."""
    return [card_snapshot(card, now) for card in read_gpu_snapshots(ledger)
            if card_alive(card, settings, now)]


def card_snapshot(card: dict, now: float) -> GpuSnapshot:
    """What placement reads of a card as its worker published it (``publish_gpu``)."""
    ram = card.get("host_ram_mb")
    return GpuSnapshot(uuid=card["uuid"], host=card["host"], total_mb=float(card["total_mb"]),
                       free_mb=float(card["free_mb"]), cpu=card.get("source") == "cpu",
                       host_ram_mb=float(ram) if ram else None, suspect=is_suspect(card, now))


def card_alive(card: dict, settings: Settings, now: float) -> bool:
    """Whether the card's worker beat within ``LOST_BEATS`` heartbeat periods (one or two late
    beats under load are not a death; ``stale_after_seconds`` is far longer: it waits out a
    runner's Redis outage, not a worker's)."""
    return now - float(card.get("heartbeat") or 0) <= LOST_BEATS * settings.heartbeat_seconds


def is_suspect(card: dict, now: float) -> bool:
    """Whether a throughput watchdog marked the card suspect and the mark still holds."""
    return float(card.get("suspect_until") or 0) > now


def mark_suspect(ledger: Ledger, uuid: str, reason: str, seconds: float, now: float | None = None) -> None:
    """The watchdog requeued a job away from this card: placement takes it last for ``seconds``
    (fields the worker's own heartbeat, ``publish_gpu``, leaves alone)."""
    now = now or time.time()
    ledger.client.hset(ledger.keys.gpu(uuid), mapping={"suspect_until": str(now + seconds),
                                                        "suspect_reason": reason})


def read_gpu_snapshots(ledger: Ledger) -> list[dict]:
    uuids = sorted(ledger.client.smembers(ledger.keys.gpus))
    pipe = ledger.client.pipeline(transaction=False)
    for gpu in uuids:
        pipe.hgetall(ledger.keys.gpu(gpu))
    return [card for card in pipe.execute() if card.get("uuid")]


def publish_gpu(ledger: Ledger, info: dict, worker: str, slots: int, now: float | None = None) -> None:
    """A worker's view of its card (GpuInfo.to_dict()) + heartbeat, for dispatch and `lorafarm gpus`."""
    flat = {key: json.dumps(value) if isinstance(value, (list, dict)) else
            ("" if value is None else str(value)) for key, value in info.items()}
    flat.update(worker=worker, slots=str(slots), heartbeat=str(now or time.time()))
    pipe = ledger.client.pipeline(transaction=True)
    pipe.hset(ledger.keys.gpu(info["uuid"]), mapping=flat)
    pipe.sadd(ledger.keys.gpus, info["uuid"])
    pipe.execute()
