"""What the pages show, read from the ledger: a page of jobs, the batches, one job, the cards.

A page of jobs reads only its own records (``ZREVRANGE`` of the index, then one pipeline of
``HMGET``), and the counts per state from the state sets (``SCARD``): with 10,000 jobs in the
ledger, a page costs what 50 jobs cost (``bench/web_jobs_page.py``).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_farm.cli.status_view import TABLE_FIELDS
from lora_farm.jobs.state import JobState
from lora_farm.ledger import JobRecord, Ledger
from lora_farm.settings import Settings
from lora_farm.web import jobdir
from lora_farm.web.jobdir import Curves, SampleGrid
from lora_farm.workers.dispatch import card_alive, read_gpu_snapshots
from lora_farm.workers.presence import read_workers
from lora_farm.workers.runner import job_dir_for

PAGE_FIELDS = (*TABLE_FIELDS, "gpus", "phase", "estimate_mb", "submitted", "priority")
PER_PAGE = 50


@dataclass(frozen=True)
class JobsPage:
    records: list[JobRecord]  # newest first
    total: int  # jobs matching the filter
    page: int  # 1-based
    pages: int
    counts: dict[str, int]  # jobs per state (of the batch, when filtered by batch)


def jobs_page(ledger: Ledger, page: int = 1, per_page: int = PER_PAGE, batch: str | None = None,
              state: str | None = None) -> JobsPage:
    """One page of jobs, newest first, of a batch and/or a state."""
    index = ledger.keys.batch(batch) if batch else ledger.keys.jobs
    if state:
        ids = _ids_in_state(ledger, index, state)
        total = len(ids)
    else:
        total = ledger.client.zcard(index)
    pages = max(1, math.ceil(total / per_page))
    page = min(max(1, page), pages)
    start = (page - 1) * per_page
    if state:
        shown = ids[start:start + per_page]
    else:
        shown = ledger.client.zrevrange(index, start, start + per_page - 1)
    records = ledger.records(shown, fields=PAGE_FIELDS)
    counts = batch_counts(ledger, batch) if batch else state_counts(ledger)
    return JobsPage(records, total, page, pages, counts)


def _ids_in_state(ledger: Ledger, index: str, state: str) -> list[str]:
    """Ids in ``state`` that are in ``index``, newest first."""
    members = sorted(ledger.client.smembers(ledger.keys.state(state)))
    if not members:
        return []
    seqs = ledger.client.zmscore(index, members)
    return [job_id for seq, job_id in sorted(((s, j) for s, j in zip(seqs, members) if s is not None),
                                             reverse=True)]


def state_counts(ledger: Ledger) -> dict[str, int]:
    pipe = ledger.client.pipeline(transaction=False)
    for state in JobState:
        pipe.scard(ledger.keys.state(state.value))
    return {state.value: n for state, n in zip(JobState, pipe.execute()) if n}


def batch_counts(ledger: Ledger, batch: str) -> dict[str, int]:
    return _state_counts_of(ledger, ledger.job_ids(batch))


def _state_counts_of(ledger: Ledger, ids: list[str]) -> dict[str, int]:
    """Jobs per state of these ids (one deleted since they were listed is left out)."""
    return dict(Counter(state for state, in ledger.field_values(ids, ("state",)) if state))


@dataclass(frozen=True)
class BatchRow:
    name: str
    counts: dict[str, int]
    total: int
    last_submitted: float | None


def batches(ledger: Ledger) -> list[BatchRow]:
    """Every batch with its jobs per state, the most recently submitted first."""
    rows = []
    for name in ledger.client.smembers(ledger.keys.batches):
        ids = ledger.job_ids(name)
        counts = _state_counts_of(ledger, ids)
        newest = ledger.records(ids[-1:], fields=("id", "name", "batch", "task", "config_hash",
                                                  "submitted")) if ids else []
        rows.append(BatchRow(name, counts, sum(counts.values()),
                             newest[0].submitted if newest else None))
    return sorted(rows, key=lambda row: -(row.last_submitted or 0))


@dataclass(frozen=True)
class JobView:
    record: JobRecord
    timeline: list[dict[str, Any]]
    job_dir: Path
    curves: Curves
    samples: SampleGrid
    log: str
    manifest: dict[str, Any] | None


def job_view(ledger: Ledger, job_id: str, settings: Settings) -> JobView:
    """One job, whole: its record, timeline and what its folder holds."""
    record = ledger.find(job_id)
    folder = job_folder(record, settings)
    events = jobdir.job_events(folder)
    return JobView(record, ledger.timeline(record.id), folder, jobdir.read_curves(events),
                   jobdir.sample_grid(folder, events), jobdir.log_tail(folder),
                   jobdir.local_manifest(folder))


def job_folder(record: JobRecord, settings: Settings) -> Path:
    return Path(record.job_dir) if record.job_dir else job_dir_for(record, settings)


@dataclass(frozen=True)
class CardRow:
    uuid: str
    name: str
    host: str
    source: str
    total_mb: float
    free_mb: float
    reserved_mb: float
    util_pct: float | None
    jobs: list[tuple[str, str, float]]  # (job id, name, reserved MB)
    heartbeat_age: float
    online: bool
    error: str = ""  # the card could not be read (NVML)


def cards(ledger: Ledger, settings: Settings, now: float | None = None) -> list[CardRow]:
    """Every card a worker published: memory, the jobs holding a reservation on it, heartbeat."""
    now = now or time.time()
    held = ledger.reservations()
    names = {r.id: r.name for r in ledger.records(held, fields=("id", "name", "batch", "task",
                                                                 "config_hash"))}
    rows = []
    for card in read_gpu_snapshots(ledger):
        jobs = [(job_id, names.get(job_id, ""), float(r["mb"])) for job_id, r in held.items()
                if card["uuid"] in r["gpus"]]
        util = card.get("util_pct")
        rows.append(CardRow(card["uuid"], card.get("name", ""), card.get("host", ""),
                            card.get("source", ""), float(card["total_mb"]), float(card["free_mb"]),
                            sum(mb for _, _, mb in jobs), float(util) if util else None, jobs,
                            now - float(card.get("heartbeat") or 0), card_alive(card, settings, now),
                            card.get("error", "")))
    return rows


def worker_rows(ledger: Ledger, now: float | None = None) -> list[dict[str, Any]]:
    now = now or time.time()
    return [{**w, "age": now - float(w["heartbeat"])} for w in read_workers(ledger)]
