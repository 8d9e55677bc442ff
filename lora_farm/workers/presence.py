"""What a worker's main process does besides Celery: every ``heartbeat_seconds`` it publishes its
card's snapshot and its own heartbeat, then runs a reaper sweep and a dispatch pass (both under
leases, so with many workers one of each runs at a time).

Started on Celery's ``worker_ready`` (after the pool has forked) and stopped on shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

import redis

from lora_farm.errors import GpuInventoryError
from lora_farm.ledger import Ledger
from lora_farm.scheduler.gpus import GpuInfo, read_gpus
from lora_farm.scheduler.policy import Policy, placement_of
from lora_farm.settings import Settings, host_name
from lora_farm.workers.dispatch import dispatch_once, publish_gpu
from lora_farm.workers.reaper import reap

log = logging.getLogger(__name__)
GPU_ENV = "LORAFARM_WORKER_GPU"


def slots_for(info: GpuInfo, policy: Policy) -> int:
    """How many jobs may share the card: the policy's limit (the placement enforces the same)."""
    return policy.cpu_slot_jobs if info.source == "cpu" else policy.max_jobs_per_gpu


def find_card(uuid: str, settings: Settings) -> GpuInfo:
    for info in read_gpus(settings):
        if info.uuid == uuid:
            return info
    known = ", ".join(info.uuid for info in read_gpus(settings))
    raise GpuInventoryError(f"this worker serves card `{uuid}` but this host has only: {known}. "
                            "Fix: `lorafarm gpus` lists the cards; start the worker with one of them.")


class Presence(threading.Thread):
    def __init__(self, ledger: Ledger, gpu_uuid: str, worker_name: str, queues: list[str],
                 settings: Settings | None = None):
        super().__init__(name="lorafarm-presence", daemon=True)
        self.ledger, self.gpu_uuid, self.worker_name, self.queues = ledger, gpu_uuid, worker_name, queues
        self.settings = settings or ledger.settings
        self.since = time.time()  # in the card snapshot: the reaper re-places what was sent before
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.tick()
            except (redis.RedisError, OSError) as error:
                log.warning("presence tick failed (will retry): %s", error)
            except Exception:  # a bug here must not kill the worker's heartbeat for good
                log.exception("presence tick failed")
            if self._stop_event.wait(self.settings.heartbeat_seconds):
                return

    def tick(self) -> None:
        info = find_card(self.gpu_uuid, self.settings)
        slots = slots_for(info, placement_of(self.settings))
        publish_gpu(self.ledger, {**info.to_dict(), "since": self.since}, self.worker_name, slots)
        self.publish_worker(slots)
        reap(self.ledger, self.settings)  # first: what it requeues is placed in this tick
        dispatch_once(self.ledger, settings=self.settings)

    def publish_worker(self, slots: int) -> None:
        active = [job_id for job_id, held in self.ledger.reservations().items()
                  if self.gpu_uuid in held["gpus"]]
        record = {"name": self.worker_name, "host": host_name(), "pid": os.getpid(),
                  "gpu": self.gpu_uuid, "queues": self.queues, "slots": slots, "jobs": active,
                  "heartbeat": time.time(), "torch_imported": "torch" in sys.modules}
        self.ledger.client.hset(self.ledger.keys.workers, self.worker_name, json.dumps(record))

    def stop(self, join: bool = False) -> None:
        """Stop ticking and leave the worker list; ``join``: wait for a tick in progress, so
        nothing is published after this returns."""
        self._stop_event.set()
        if join and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self.settings.heartbeat_seconds + 10)
        try:
            self.ledger.client.hdel(self.ledger.keys.workers, self.worker_name)
        except redis.RedisError:
            pass


def read_workers(ledger: Ledger) -> list[dict]:
    return sorted((json.loads(raw) for raw in ledger.client.hgetall(ledger.keys.workers).values()),
                  key=lambda worker: worker["name"])
