"""Part ``packing``: K SD 1.5-sized jobs through the real farm (redis-server, a celery worker,
the runner, the trainers) on the one card at once, against the same K one after another
(``max_jobs_per_gpu: 1``): the ratio of makespans, the sum of the jobs' peaks against the card,
and no out-of-memory end in either run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.gpu.common import Context, image_spec, part_main, shape_label, shape_row
from bench.gpu.farm import Farm

JOB_TIMEOUT = 420


def run_batch(ctx: Context, name: str, jobs_per_card: int) -> dict[str, Any]:
    k = ctx.sizes.jobs_packed
    with Farm(ctx, name, policy=f"max_jobs_per_gpu: {jobs_per_card}\n") as farm:
        farm.start_worker(concurrency=k)
        specs = [image_spec(ctx, f"{name}-{i}", seed=i) for i in range(k)]
        started = time.perf_counter()
        ids = farm.submit(specs, batch=name)
        records = farm.wait(ids, JOB_TIMEOUT)
        makespan = time.perf_counter() - started
        timelines = [farm.ledger.timeline(job_id) for job_id in ids]
    ooms = sum(entry.get("to") in ("retrying", "failed") and "out of memory" in str(entry.get("reason", ""))
               for tl in timelines for entry in tl)
    return {"makespan_s": round(makespan, 1), "states": [r.state for r in records],
            "attempts": [r.attempt for r in records], "oom_ends": ooms,
            "peaks_mb": [r.peak_vram_mb for r in records],
            "estimates_mb": [r.estimate_mb for r in records]}


def run(ctx: Context) -> dict[str, Any]:
    k = ctx.sizes.jobs_packed
    packed = run_batch(ctx, "packed", jobs_per_card=k)
    serial = run_batch(ctx, "serial", jobs_per_card=1)
    peaks = [p for p in packed["peaks_mb"] if p is not None]
    card_mb = ctx.card.get("total_mb")
    ok = (all(s == "succeeded" for s in packed["states"] + serial["states"])
          and packed["oom_ends"] == serial["oom_ends"] == 0)
    shape = shape_label(ctx, "bf16, via the farm")
    return {"jobs": k, "packed": packed, "serial": serial,
            "serial_over_packed_makespan": round(serial["makespan_s"] / packed["makespan_s"], 3),
            "sum_of_peaks_mb": round(sum(peaks), 1) if peaks else None, "card_mb": card_mb,
            "ok": ok,
            "shapes": [shape_row(shape, packed["estimates_mb"][0], max(peaks) if peaks else None)]}


if __name__ == "__main__":
    sys.exit(part_main(run))
