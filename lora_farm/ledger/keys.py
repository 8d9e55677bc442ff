"""Every Redis key the farm writes, from one prefix (``LORAFARM_KEY_PREFIX``).

A test with prefix ``lorafarm-test-<uuid>`` is isolated from every other user of the server and
cleans up with one ``SCAN <prefix>:*`` + ``DEL``. Celery's own keys (queues, unacked messages,
bindings) live under the same prefix through kombu's ``global_keyprefix`` (see workers/broker.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def job(self, job_id: str) -> str:
        """Hash: the job record."""
        return f"{self.prefix}:job:{job_id}"

    def timeline(self, job_id: str) -> str:
        """List of JSON entries: every transition, reservation and release of the job."""
        return f"{self.prefix}:job:{job_id}:timeline"

    def job_lock(self, job_id: str) -> str:
        """String with a TTL: held by the one runner executing the job (SET NX + heartbeat)."""
        return f"{self.prefix}:lock:job:{job_id}"

    @property
    def jobs(self) -> str:
        """Sorted set: every job id, scored by submission sequence."""
        return f"{self.prefix}:jobs"

    @property
    def queue(self) -> str:
        """Sorted set: queued job ids, scored so that ZRANGE gives priority, then FIFO."""
        return f"{self.prefix}:queue"

    def state(self, state: str) -> str:
        """Set: ids of the jobs currently in that state."""
        return f"{self.prefix}:state:{state}"

    def batch(self, name: str) -> str:
        """Sorted set: ids of the jobs of a batch, by submission sequence."""
        return f"{self.prefix}:batch:{name}"

    @property
    def batches(self) -> str:
        return f"{self.prefix}:batches"

    def config_index(self, batch: str) -> str:
        """Hash: config hash -> job id within a batch (idempotent resubmits)."""
        return f"{self.prefix}:confighash:{batch}"

    @property
    def reservations(self) -> str:
        """Hash: job id -> JSON {gpus, mb, since}: VRAM held on cards by scheduled/running jobs."""
        return f"{self.prefix}:reservations"

    @property
    def seq(self) -> str:
        return f"{self.prefix}:seq"

    def gpu(self, uuid: str) -> str:
        """Hash: a card's snapshot, published by the worker that serves it."""
        return f"{self.prefix}:gpu:{uuid}"

    @property
    def gpus(self) -> str:
        """Set: uuids of every card a worker ever published."""
        return f"{self.prefix}:gpus"

    @property
    def workers(self) -> str:
        """Hash: worker name -> JSON heartbeat (host, pid, gpu, queue, slots, active jobs)."""
        return f"{self.prefix}:workers"

    def worker_stopping(self, name: str) -> str:
        """String with a TTL: set while worker ``name`` shuts down (its trainings checkpoint)."""
        return f"{self.prefix}:worker-stopping:{name}"

    def stop_signalled(self, job_id: str, token: str) -> str:
        """Set by whoever SIGTERMs the trainer of this dispatch at a shutdown (main process or
        runner): a second SIGTERM could land after the trainer checkpointed and kill it."""
        return f"{self.prefix}:stop-signalled:{job_id}:{token}"

    @property
    def dispatch_lock(self) -> str:
        return f"{self.prefix}:lock:dispatch"

    @property
    def dispatch_dirty(self) -> str:
        """Set while a dispatch was asked for during a running one: run again after it."""
        return f"{self.prefix}:dispatch:dirty"

    @property
    def reaper_lock(self) -> str:
        return f"{self.prefix}:lock:reaper"

    @property
    def pattern(self) -> str:
        """Every key of this prefix (farm and Celery): for SCAN."""
        return f"{self.prefix}:*"
