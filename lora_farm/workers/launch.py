"""``lorafarm worker``: one Celery worker process per card of this host, each consuming only its
card's queue ``gpu.<uuid>`` with as many slots as jobs may share the card.

The processes run in the foreground under this supervisor: SIGINT/SIGTERM are passed on (a warm
shutdown: each worker's trainings checkpoint, stop and are requeued, see shutdown.py), and if one
worker dies the others are stopped too and the exit status says so, so systemd / compose restarts
the set.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from lora_farm.errors import GpuInventoryError
from lora_farm.process_group import signal_running
from lora_farm.redis_conn import connect
from lora_farm.scheduler.gpus import GpuInfo, read_gpus
from lora_farm.settings import get_settings, host_name
from lora_farm.workers.broker import gpu_queue
from lora_farm.scheduler.policy import placement_of
from lora_farm.workers.presence import GPU_ENV, slots_for

log = logging.getLogger(__name__)


def select_cards(wanted: list[str] | None) -> list[GpuInfo]:
    cards = read_gpus(get_settings())
    if not wanted:
        return cards
    known = {card.uuid: card for card in cards}
    missing = [uuid for uuid in wanted if uuid not in known]
    if missing:
        raise GpuInventoryError(f"--gpus names {', '.join(missing)} but this host has "
                                f"{', '.join(known) or 'no cards'}. Fix: pick from `lorafarm gpus` "
                                "or LORAFARM_GPUS.")
    return [known[uuid] for uuid in wanted]


def worker_argv(card: GpuInfo, pool: str, loglevel: str) -> list[str]:
    slots = slots_for(card, placement_of(get_settings()))
    return [sys.executable, "-m", "celery", "-A", "lora_farm.workers.app", "worker",
            "-Q", gpu_queue(card.uuid), "-c", str(slots), "-P", pool, "-E",
            "-n", f"gpu-{card.uuid}@{host_name()}", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle"]


def run_workers(wanted: list[str] | None, pool: str = "prefork", loglevel: str = "INFO") -> int:
    connect()  # fail now, with the fix, if Redis is not there
    cards = select_cards(wanted)
    processes = {card.uuid: subprocess.Popen(worker_argv(card, pool, loglevel),
                                             env={**os.environ, GPU_ENV: card.uuid})
                 for card in cards}
    print(f"lorafarm: {len(processes)} worker(s): " +
          ", ".join(f"{uuid} (pid {p.pid})" for uuid, p in processes.items()), flush=True)
    stopping = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        signal_running(processes.values(), signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return _supervise(processes, stopping)


def _supervise(processes: dict[str, subprocess.Popen], stopping: list[int]) -> int:
    while True:
        exited = {uuid: p.returncode for uuid, p in processes.items() if p.poll() is not None}
        if len(exited) == len(processes):
            return 0 if stopping else 1
        if exited and not stopping:
            uuid, code = next(iter(exited.items()))
            print(f"lorafarm: the worker of {uuid} exited with {code}; stopping the others",
                  file=sys.stderr, flush=True)
            stopping.append(signal.SIGTERM)
            signal_running(processes.values(), signal.SIGTERM)
        time.sleep(0.5)
