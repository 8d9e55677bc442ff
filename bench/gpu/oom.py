"""Part ``oom``: a real CUDA out-of-memory error that the farm recovers from. The job declares
``vram_gb`` far below what its micro-batch needs, so its trainer's allocator cap (the guard of a
shared card) makes it run out of memory; the farm requeues it with its degraded plan (half the
micro-batch, the same effective batch through accumulation, gradient checkpointing) and resumes
until it fits.

Dry run: the trainer's fault hook raises the CUDA OOM for micro-batches above 1
(``LORAFARM_FAULT_OOM_ABOVE_BATCH``), so the same farm path runs on the CPU: micro-batch 2 runs
out of memory once and the degraded plan (micro-batch 1, accumulation 2, checkpointing) trains
2 steps, the least that still shows the requeue, the degraded plan and its success.
"""

from __future__ import annotations

import sys
from typing import Any

from bench.gpu.common import Context, image_spec, part_main
from bench.gpu.farm import Farm, job_log

REAL_BATCH, REAL_VRAM_GB = 16, 6.0  # SD 1.5 at 512 px: batch 16 needs far more than 6 GB
DRY_BATCH, DRY_VRAM_GB, DRY_STEPS = 2, 2.0, 2


def run(ctx: Context) -> dict[str, Any]:
    batch, vram_gb = (DRY_BATCH, DRY_VRAM_GB) if ctx.dry_run else (REAL_BATCH, REAL_VRAM_GB)
    steps = DRY_STEPS if ctx.dry_run else max(4, ctx.sizes.steps // 3)
    extra = {"LORAFARM_FAULT_OOM_ABOVE_BATCH": "1"} if ctx.dry_run else {}
    with Farm(ctx, "oom", policy="max_jobs_per_gpu: 1\n", extra_env=extra) as farm:
        farm.start_worker(concurrency=1)
        spec = image_spec(ctx, "suite-oom", batch_size=batch, vram_gb=vram_gb, max_retries=5,
                          save_steps=2, max_steps=steps)
        job_id = farm.submit([spec], batch="oom")[0]
        record = farm.wait([job_id], timeout=480)[0]
        timeline = farm.ledger.timeline(job_id)
        log = job_log(record)
    ooms = [e.get("reason", "") for e in timeline  # one entry per attempt that ran out of memory
            if e.get("to") == "retrying" and "out of memory" in str(e.get("reason", ""))]
    return {"state": record.state, "attempts": record.attempt, "oom_ends": len(ooms),
            "first_oom": ooms[0][:300] if ooms else None, "final_plan": record.plan,
            "cap_lines": [line for line in log.splitlines() if "memory cap" in line][:5],
            "peak_vram_mb": record.peak_vram_mb, "vram_cap_mb": vram_gb * 1024,
            "ok": record.state == "succeeded" and len(ooms) >= 1}


if __name__ == "__main__":
    sys.exit(part_main(run))
