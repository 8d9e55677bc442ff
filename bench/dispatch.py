"""Dispatch figures against the real Redis (prints, never asserts).

    .venv/bin/python bench/dispatch.py [--jobs 1000] [--cards 64] [--records 10000]

1. time to submit 1,000 jobs (validated specs -> estimate -> ledger -> dispatch pass);
2. one placement pass of 1,000 queued jobs over 64 declared cards (pure ``place`` alone, and the
   whole pass: read queue + snapshots + reservations, place, reserve + route each placed job);
3. ``lorafarm status`` with 10,000 records (ledger read + table render in-process, and the CLI
   as a subprocess in an 80x24 terminal, interpreter start included: the default view, ``--all``
   and ``--json``).

Everything is written under a fresh ``lorafarm-bench-<uuid>`` prefix and deleted at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from lora_farm.cli.status_view import print_status, read_view  # noqa: E402
from lora_farm.jobs.spec import LlmJobSpec  # noqa: E402
from lora_farm.ledger import Ledger, NewJob  # noqa: E402
from lora_farm.redis_conn import connect  # noqa: E402
from lora_farm.scheduler.place import place  # noqa: E402
from lora_farm.scheduler.policy import Policy  # noqa: E402
from lora_farm.settings import reload_settings  # noqa: E402
from lora_farm.submit import submit_specs  # noqa: E402
from lora_farm.workers import dispatch  # noqa: E402


CLI = [sys.executable, "-m", "lora_farm", "status"]
TERMINAL = {**os.environ, "COLUMNS": "80", "LINES": "24"}  # what an 80x24 terminal sets


def specs(count: int, tag: str) -> list[LlmJobSpec]:
    sizes = (2, 4, 6, 10, 16)
    return [LlmJobSpec(name=f"{tag}-{i}", base_model=Path("/models/llm"),
                       train_data_dir=Path("/data/text.jsonl"), vram_gb=sizes[i % len(sizes)],
                       priority=i % 3, seed=i) for i in range(count)]


def publish_cards(ledger: Ledger, count: int) -> None:
    for index in range(count):
        info = {"uuid": f"gpu{index}", "host": f"node{index // 8}", "total_mb": 24576.0,
                "free_mb": 24576.0, "source": "declared", "name": "declared", "index": index % 8}
        dispatch.publish_gpu(ledger, info, worker=f"bench-{index}", slots=8)


def timed(label: str, action):
    start = time.perf_counter()
    result = action()
    print(f"{label:<62} {time.perf_counter() - start:8.3f} s")
    return result


def timed_cli(label: str, command: list[str], runs: int = 3) -> None:
    """Median wall time of a CLI run, and its CPU time (user + sys of the child): on a shared,
    busy machine the CPU time is what an idle one would take, minus the Redis server's share."""
    walls, cpus = [], []
    for _ in range(runs):
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True, env=TERMINAL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(time.perf_counter() - start)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    print(f"{label:<62} {statistics.median(walls):8.3f} s  (cpu {statistics.median(cpus):.3f} s, "
          f"median of {runs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--cards", type=int, default=64)
    parser.add_argument("--records", type=int, default=10_000)
    args = parser.parse_args()
    prefix = f"lorafarm-bench-{uuid.uuid4().hex[:8]}"
    os.environ.update(LORAFARM_KEY_PREFIX=prefix, LORAFARM_GPUS="gpu0:24GiB")
    TERMINAL.update(LORAFARM_KEY_PREFIX=prefix, LORAFARM_GPUS="gpu0:24GiB")
    settings = reload_settings()
    ledger = Ledger(connect(settings), prefix)
    policy = Policy(headroom=0.2, max_jobs_per_gpu=8)
    no_send = lambda job_id, token, queue: None  # noqa: E731  (placement, not the broker, is measured)
    try:
        timed(f"submit {args.jobs} jobs (no worker online: all stay queued)",
              lambda: submit_specs(specs(args.jobs, "sub"), ledger, batch="bench", settings=settings,
                                   policy=policy, send=no_send))
        publish_cards(ledger, args.cards)
        jobs = dispatch.queued_jobs(ledger)
        gpus = dispatch.live_gpus(ledger, settings, time.time())
        placed = timed(f"place(): {len(jobs)} queued jobs over {len(gpus)} cards (pure)",
                       lambda: place(jobs, gpus, [], policy, time.time()))
        routed = timed(f"placement pass: {len(jobs)} jobs / {len(gpus)} cards (Redis + reserve + route)",
                       lambda: dispatch.placement_pass(ledger, no_send, settings, policy))
        print(f"{'':<62} {len(placed)} placed by place(), {len(routed)} reserved+routed")
        more = args.records - len(ledger.list_jobs())
        for start in range(0, more, 2000):
            chunk = [NewJob(s, "bulk", 0, 1000.0) for s in specs(min(2000, more - start), f"bulk{start}")]
            ledger.create_jobs(chunk)
        count = len(ledger.list_jobs())
        timed(f"status, in-process: read {count} records + print what fits 80x24",
              lambda: print_status(Console(file=io.StringIO(), width=80, height=24),
                                   lambda rows: read_view(ledger, None, rows), show_all=False))
        timed(f"status --all, in-process: read {count} records + print them all",
              lambda: print_status(Console(file=io.StringIO(), width=200, height=50),
                                   lambda rows: read_view(ledger, None, rows), show_all=True))
        for extra in ([], ["--all"], ["--json"]):
            timed_cli(f"`{' '.join(['lorafarm status', *extra])}` (80x24), {count} records",
                      CLI + extra)
    finally:
        removed = ledger.delete_prefix()
        print(f"cleaned up {removed} keys under {prefix}")


if __name__ == "__main__":
    main()
