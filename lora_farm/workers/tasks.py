"""Thin Celery tasks: each one hands its JSON arguments to a plain function.

``lorafarm.run_job(job_id, token)`` goes to ``gpu.<uuid>``; ``lorafarm.dispatch()`` to ``farm``.
The worker's main process also starts :class:`Presence` (snapshot, heartbeat, periodic dispatch,
reaper) once it is ready.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from celery import signals

from lora_farm.ledger import Ledger
from lora_farm.scheduler.dispatch import dispatch_once
from lora_farm.settings import get_settings
from lora_farm.workers.app import app
from lora_farm.workers.presence import GPU_ENV, Presence
from lora_farm.workers.runner import RunnerOptions, run_job

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _ledger_for(pid: int) -> Ledger:
    # one client per process: a pool child must not share the parent's sockets
    return Ledger.from_settings(get_settings())


def worker_ledger() -> Ledger:
    return _ledger_for(os.getpid())


@app.task(name="lorafarm.run_job")
def run_job_task(job_id: str, token: str) -> str:
    ledger = worker_ledger()
    options = RunnerOptions(settings=get_settings(), after_release=lambda: dispatch_once(ledger))
    return run_job(ledger, job_id, token, options)


@app.task(name="lorafarm.dispatch")
def dispatch_task() -> int:
    return len(dispatch_once(worker_ledger()).placed)


_presence: list[Presence] = []


@signals.worker_ready.connect
def _start_presence(sender, **_: object) -> None:
    queues = sorted(sender.app.amqp.queues.consume_from or {})
    gpu = os.environ.get(GPU_ENV) or next((q[4:] for q in queues if q.startswith("gpu.")), "")
    if not gpu:
        log.warning("this worker consumes no gpu.<uuid> queue (%s): no card to publish", queues)
        return
    presence = Presence(worker_ledger(), gpu, sender.hostname, queues)
    presence.start()
    _presence.append(presence)


@signals.worker_shutdown.connect
def _stop_presence(**_: object) -> None:
    while _presence:
        _presence.pop().stop()
