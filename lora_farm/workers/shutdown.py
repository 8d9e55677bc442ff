"""A worker that shuts down checkpoints its trainings instead of waiting for them to finish.

Celery's warm shutdown (SIGTERM or Ctrl-C to the worker: `lorafarm down`, `docker compose stop`,
`systemctl stop`) waits for running tasks, and a task here is a training of hours. So:

- **Main process** (``worker_shutting_down``, see tasks.py): :func:`begin_shutdown` marks the
  worker as stopping in Redis (``Keys.worker_stopping``), withdraws its card from placement (no
  new job is routed to a queue nobody will consume), and sends SIGTERM to the trainer process
  of every job its runners execute (the ledger records worker, host and pid of each); not to
  its group: its DataLoader workers must live until it has written its checkpoint.
- **Pool child** (the runner): each tick it asks :func:`is_stopping`; while a job runs, a SIGTERM
  sent to the child itself (a signal to the worker's whole process group, as `lorafarm down`
  sends) only sets :data:`SIGTERM_SEEN` (:func:`sigterm_sets_flag`) instead of unwinding the
  runner. Either way the runner stops its trainer (SIGTERM: it finishes its step, writes a
  checkpoint, exits 4) and requeues the job without charging its retry budget.

A trainer stopped by a signal from anywhere else is ``interrupted`` and counts as a retry.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from lora_farm.jobs.state import JobState
from lora_farm.ledger import Ledger
from lora_farm.process_group import signal_process
from lora_farm.settings import host_name

log = logging.getLogger(__name__)
STOPPING_TTL_SECONDS = 3600  # longer than any stop grace; cleared when a worker of the name starts
SIGTERM_SEEN = threading.Event()  # set in a pool child that received SIGTERM while running a job


def begin_shutdown(ledger: Ledger, worker_name: str, gpu_uuid: str | None) -> list[str]:
    """Everything the main process does when its worker starts a warm shutdown; returns the
    ids of the jobs whose trainers were told to checkpoint and stop."""
    mark_stopping(ledger, worker_name)
    if gpu_uuid:  # its heartbeat aged, so dispatch stops placing on the card (dispatch.live_gpus)
        ledger.client.hset(ledger.keys.gpu(gpu_uuid), "heartbeat", "0")
    return stop_trainers(ledger, worker_name)


def mark_stopping(ledger: Ledger, worker_name: str) -> None:
    ledger.client.set(ledger.keys.worker_stopping(worker_name), "1", ex=STOPPING_TTL_SECONDS)


def clear_stopping(ledger: Ledger, worker_name: str) -> None:
    """A worker that (re)starts under a name is not stopping (its predecessor may have been)."""
    ledger.client.delete(ledger.keys.worker_stopping(worker_name))


def is_stopping(ledger: Ledger, worker_name: str) -> bool:
    """Whether the worker of this runner shuts down (its own SIGTERM, or the Redis mark)."""
    if SIGTERM_SEEN.is_set():
        return True
    if not worker_name:
        return False
    try:
        return bool(ledger.client.exists(ledger.keys.worker_stopping(worker_name)))
    except redis.RedisError:
        return False  # Redis is away: keep training, ask again next tick


def stop_trainers(ledger: Ledger, worker_name: str) -> list[str]:
    """SIGTERM the trainer of every running job of this worker on this host (the runner
    SIGKILLs the rest of its group after the grace)."""
    host = host_name()
    stopped = []
    for record in ledger.records(ledger.ids_in_state(JobState.RUNNING), with_spec=False):
        if (record.worker == worker_name and record.host == host and record.pid
                and claim_stop_signal(ledger, record.id, record.token)):
            log.warning("worker %s shutting down: SIGTERM to trainer %d of job %s "
                        "(it checkpoints and stops; the job is requeued)", worker_name,
                        record.pid, record.id)
            signal_process(record.pid, signal.SIGTERM)  # not its group: DataLoader workers
            stopped.append(record.id)
    return stopped


def claim_stop_signal(ledger: Ledger, job_id: str, token: str) -> bool:
    """Whether this caller is the one to SIGTERM the trainer of this dispatch at a shutdown.

    Both the main process (:func:`stop_trainers`) and the runner stop a trainer when the worker
    shuts down. The first to claim sends the signal; the other only waits (and SIGKILLs after the
    grace). The trainer also ignores a second stop signal once its run has ended (entry.py), so a
    signal sent twice anyway cannot kill it on its way out."""
    try:
        return bool(ledger.client.set(ledger.keys.stop_signalled(job_id, token), "1", nx=True,
                                      ex=STOPPING_TTL_SECONDS))
    except redis.RedisError:
        return True  # Redis is away: better a second signal than none


@contextmanager
def sigterm_sets_flag() -> Iterator[None]:
    """While a job runs in this process: SIGTERM sets :data:`SIGTERM_SEEN` instead of raising
    ``SystemExit`` somewhere in the runner (billiard's handler in a pool child), so the runner
    can stop its trainer at a checkpoint and write the job's next state. Only the main thread
    can own signal handlers; elsewhere (tests running a runner in a thread) this does nothing."""
    SIGTERM_SEEN.clear()  # a signal consumed by an earlier job of this process is spent
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda _number, _frame: SIGTERM_SEEN.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
