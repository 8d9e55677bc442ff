"""A ledger that looks like a busy farm, for the status benches, captures and tests: finished and
running jobs written through the real transitions (no worker, no trainer).

    from bench.fill_ledger import fill_ledger
    fill_ledger(ledger, finished=20, running=3)
"""

from __future__ import annotations

from pathlib import Path

from lora_farm.jobs.spec import LlmJobSpec
from lora_farm.ledger import Ledger, NewJob
from lora_farm.ledger import transitions as tr

MB = 1024.0


def specs(count: int, tag: str) -> list[LlmJobSpec]:
    sizes = (2, 4, 6, 10, 16)
    return [LlmJobSpec(name=f"{tag}-{i:02d}", base_model=Path("/models/llm"),
                       train_data_dir=Path("/data/text.jsonl"), vram_gb=sizes[i % len(sizes)],
                       priority=i % 3, seed=i) for i in range(count)]


def fill_ledger(ledger: Ledger, finished: int, running: int, failed_reason: str = "",
                tag: str = "lora") -> list[str]:
    """``finished`` succeeded jobs (plus one failed with ``failed_reason`` when given), then
    ``running`` ones at step 85/250; returns the job ids, oldest first."""
    count = finished + running + (1 if failed_reason else 0)
    created = ledger.create_jobs([NewJob(s, "nightly", 0, 6 * MB) for s in specs(count, tag)])
    ids = [c.record.id for c in created]
    for index, job_id in enumerate(ids):
        card = f"gpu{index % 4}"
        _run(ledger, job_id, card, step=250 if index < finished else 85)
        if index < finished:
            tr.begin_upload(ledger, job_id, f"tok-{job_id}", job_dir=f"/tmp/{job_id}")
            tr.upload_succeeded(ledger, job_id, {"weights": f"s3://loras/{job_id}.safetensors"},
                                f"s3://loras/{job_id}/manifest.json")
        elif failed_reason and index == count - 1:
            tr.fail(ledger, job_id, failed_reason, expect={tr.S.RUNNING}, exit_code=1)
    return ids


def _run(ledger: Ledger, job_id: str, card: str, step: int) -> None:
    tr.schedule(ledger, job_id, [card], 6 * MB, f"tok-{job_id}")
    tr.start(ledger, job_id, f"tok-{job_id}", host="node0", worker=f"worker-{card}")
    ledger.update(job_id, {"phase": "train", "step": step, "total_steps": 250,
                           "loss": 0.4312 - step / 1000, "eta_s": (250 - step) * 1.2,
                           "peak_vram_mb": 5.2 * MB})
