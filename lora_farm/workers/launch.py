"""``lorafarm worker``: one Celery worker process per card of this host, each consuming only its
card's queue ``gpu.<uuid>`` with as many slots as jobs may share the card.

The processes run in the foreground under this supervisor: SIGINT/SIGTERM are passed on (a warm
shutdown: each worker's trainings checkpoint, stop and are requeued, see shutdown.py). A worker
that exits unasked (e.g. kombu's "Unrecoverable error" after a Redis restart) is started again
after a backoff while the others keep running; one that exits more than ``MAX_RESTARTS`` times
within ``RESTART_WINDOW`` seconds is a crash loop: the others are stopped and the exit status 1
leaves it to systemd / compose.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from lora_farm.backoff import backoff_seconds
from lora_farm.errors import GpuInventoryError
from lora_farm.process_group import signal_running
from lora_farm.redis_conn import connect
from lora_farm.scheduler.gpus import GpuInfo, read_gpus
from lora_farm.settings import get_settings, host_name
from lora_farm.workers.broker import gpu_queue
from lora_farm.scheduler.policy import placement_of
from lora_farm.workers.presence import GPU_ENV, slots_for

MAX_RESTARTS, RESTART_WINDOW = 5, 300.0  # a crash loop: give up
RESTART_FIRST, RESTART_MOST = 1.0, 30.0  # backoff before a restart (doubles per recent exit)
GAVE_UP = 0  # in `stopping`: the supervisor itself stopped the set (no signal asked it)


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
    cards = {card.uuid: card for card in select_cards(wanted)}

    def start(uuid: str) -> subprocess.Popen:
        return subprocess.Popen(worker_argv(cards[uuid], pool, loglevel),
                                env={**os.environ, GPU_ENV: uuid})

    processes = {uuid: start(uuid) for uuid in cards}
    print(f"lorafarm: {len(processes)} worker(s): " +
          ", ".join(f"{uuid} (pid {p.pid})" for uuid, p in processes.items()), flush=True)
    stopping = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        signal_running(processes.values(), signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return _supervise(processes, start, stopping)


def _supervise(processes: dict[str, subprocess.Popen], start: Callable[[str], subprocess.Popen],
               stopping: list[int]) -> int:
    """Restart what exits until a stop is asked (or a crash loop), then wait for all to exit."""
    exits: dict[str, list[float]] = {uuid: [] for uuid in processes}
    due: dict[str, float] = {}  # card -> when its worker starts again
    while not stopping or any(p.poll() is None for p in processes.values()):
        if not stopping:
            _note_exits(processes, exits, due, stopping)
        for uuid in [uuid for uuid, at in due.items() if at <= time.monotonic() and not stopping]:
            del due[uuid]
            processes[uuid] = start(uuid)
            if stopping:  # the signal came while it was starting
                processes[uuid].terminate()
            print(f"lorafarm: restarted the worker of {uuid} (pid {processes[uuid].pid})", flush=True)
        time.sleep(0.5)
    return 1 if stopping[0] == GAVE_UP else 0


def _note_exits(processes: dict[str, subprocess.Popen], exits: dict[str, list[float]],
                due: dict[str, float], stopping: list[int]) -> None:
    """Schedule the restart of each worker that exited; give up on a crash loop."""
    now = time.monotonic()
    for uuid, process in processes.items():
        if process.poll() is None or uuid in due:
            continue
        exits[uuid] = [t for t in exits[uuid] if now - t < RESTART_WINDOW] + [now]
        if len(exits[uuid]) > MAX_RESTARTS:
            print(f"lorafarm: the worker of {uuid} exited {len(exits[uuid])} times in "
                  f"{RESTART_WINDOW:.0f}s (last code {process.returncode}): a crash loop; "
                  "stopping the others", file=sys.stderr, flush=True)
            stopping.append(GAVE_UP)
            signal_running(processes.values(), signal.SIGTERM)
            return
        wait = backoff_seconds(len(exits[uuid]), RESTART_FIRST, RESTART_MOST)
        print(f"lorafarm: the worker of {uuid} (pid {process.pid}) exited with code "
              f"{process.returncode}; restarting it in {wait:.0f}s", file=sys.stderr, flush=True)
        due[uuid] = now + wait
