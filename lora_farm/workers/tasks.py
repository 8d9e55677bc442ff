"""Thin Celery tasks: each one hands its JSON arguments to a plain function.

``lorafarm.run_job(job_id, token)`` goes to ``gpu.<uuid>``; dispatch runs in-process (submit,
the end of a job, and the presence tick), never as a task.
The worker's main process also starts :class:`Presence` (snapshot, heartbeat, periodic dispatch,
reaper) once it is ready, and on a warm shutdown has its trainings checkpoint and stop
(shutdown.py) instead of waiting hours for them.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from celery import shared_task, signals

from lora_farm.ledger import Ledger
from lora_farm.settings import get_settings
from lora_farm.workers.dispatch import dispatch_once
from lora_farm.workers.presence import GPU_ENV, Presence
from lora_farm.workers.runner import RunnerOptions, run_job
from lora_farm.workers.shutdown import begin_shutdown, clear_stopping

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _ledger_for(pid: int) -> Ledger:
    # one client per process: a pool child must not share the parent's sockets
    return Ledger.from_settings(get_settings())


def worker_ledger() -> Ledger:
    return _ledger_for(os.getpid())


@shared_task(name="lorafarm.run_job", bind=True)
def run_job_task(self, job_id: str, token: str) -> str:
    ledger = worker_ledger()
    options = RunnerOptions(settings=get_settings(), after_release=lambda: dispatch_once(ledger),
                            worker_name=self.request.hostname or "")
    return run_job(ledger, job_id, token, options)


_presence: list[Presence] = []


@signals.worker_ready.connect
def _start_presence(sender, **_: object) -> None:
    clear_stopping(worker_ledger(), sender.hostname)  # a predecessor of this name may have stopped
    queues = sorted(sender.app.amqp.queues.consume_from or {})
    gpu = os.environ.get(GPU_ENV) or next((q[4:] for q in queues if q.startswith("gpu.")), "")
    if not gpu:
        log.warning("this worker consumes no gpu.<uuid> queue (%s): no card to publish", queues)
        return
    presence = Presence(worker_ledger(), gpu, sender.hostname, queues)
    presence.start()
    _presence.append(presence)


@signals.worker_shutting_down.connect
def _checkpoint_running_jobs(sender: str, **_: object) -> None:
    """Warm shutdown began (main process, inside the signal handler): stop publishing the card,
    then have this worker's trainers checkpoint and stop; their runners requeue the jobs."""
    gpu = _presence[0].gpu_uuid if _presence else None
    _stop_presence()
    try:
        # a client of its own: the handler may interrupt the main thread anywhere
        stopped = begin_shutdown(Ledger.from_settings(get_settings()), sender, gpu)
    except Exception as error:  # noqa: BLE001 - never break Celery's own shutdown
        log.error("shutdown: could not stop the running trainers (%s); the worker waits for "
                  "them to finish", error)
        return
    if stopped:
        log.warning("shutdown: %d training(s) checkpoint and stop: %s", len(stopped),
                    ", ".join(stopped))


@signals.worker_shutdown.connect
def _stop_presence(**_: object) -> None:
    while _presence:
        _presence.pop().stop(join=True)
