"""Submit: validate every file -> estimate VRAM -> refuse what no card could hold -> ledger ->
dispatch. Nothing is queued unless every file is valid and every job fits some card.

Resubmitting an identical spec into the same batch is a no-op (the ledger's config-hash index),
so a nightly cron line can run the same `lorafarm submit` again safely. The CLI's ``--priority``
and ``--batch`` do not change a job's identity: the config hash is the spec's own.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_farm.errors import ModelLoadError, NoCapacity, SpecError, SpecProblem
from lora_farm.jobs.loader import load_spec_files
from lora_farm.jobs.spec import DEFAULT_BATCH, NAME_PATTERN, JobSpec
from lora_farm.ledger import JobRecord, Ledger, NewJob
from lora_farm.redis_conn import bytes_client
from lora_farm.scheduler.calibration import planned_estimate
from lora_farm.scheduler.gpus import read_gpus, to_snapshot
from lora_farm.scheduler.host_ram import estimate_host_ram
from lora_farm.scheduler.place import GpuSnapshot, Placement, check_fits_farm, largest_card_mb
from lora_farm.scheduler.policy import Policy, placement_of
from lora_farm.settings import Settings
from lora_farm.workers.dispatch import Sender, card_snapshot, celery_sender, dispatch_once, read_gpu_snapshots


@dataclass(frozen=True)
class Submitted:
    record: JobRecord
    created: bool  # False: the same spec was already in this batch; nothing was queued
    source: Path | None = None

    @property
    def line(self) -> str:
        """What ``lorafarm submit`` and the dashboard say of the job."""
        r = self.record
        if not self.created:
            return f"unchanged {r.name}: identical spec already in batch {r.batch} as {r.id} ({r.state}); nothing queued"
        chosen = f", base {r.plan['quantize_base']} (auto)" if "quantize_base" in r.plan else ""
        return (f"queued {r.id} {r.name} (batch {r.batch}, priority {r.priority}, estimate "
                f"{r.estimate_mb / 1024:.1f} GB{chosen}, host RAM {r.host_ram_mb / 1024:.1f} GB)")


@dataclass(frozen=True)
class SubmitReport:
    jobs: list[Submitted]
    placed: list[Placement]  # the jobs placed on cards at once


def submit_files(paths: Sequence[Path], ledger: Ledger, *, batch: str | None = None,
                 priority: int | None = None, settings: Settings | None = None,
                 send: Sender = celery_sender) -> SubmitReport:
    """Load + validate all files (``SpecError`` with every problem), then :func:`submit_specs`."""
    check_batch_name(batch)
    loaded = load_spec_files([Path(p) for p in paths])
    report = submit_specs([item.spec for item in loaded], ledger, batch=batch, priority=priority,
                          settings=settings, send=send)
    jobs = [Submitted(job.record, job.created, item.source) for job, item in zip(report.jobs, loaded)]
    return SubmitReport(jobs, report.placed)


def submit_specs(specs: Sequence[JobSpec], ledger: Ledger, *, batch: str | None = None,
                 priority: int | None = None, settings: Settings | None = None,
                 policy: Policy | None = None, send: Sender = celery_sender) -> SubmitReport:
    check_batch_name(batch)
    settings = settings or ledger.settings
    policy = policy or placement_of(settings)
    raw = bytes_client(ledger.client)
    cards = farm_cards(ledger, settings)
    planned = [planned_estimate(raw, ledger.keys.prefix, spec, largest_card_mb(cards, policy)) for spec in specs]
    estimates = [estimate.total_mb for estimate, _ in planned]
    host_rams = [host_ram_of(spec) for spec in specs]
    refuse_what_never_fits(specs, estimates, cards, policy, host_rams)
    new = [NewJob(spec, batch or spec.batch or DEFAULT_BATCH,
                  spec.priority if priority is None else priority, mb, ram, plan)
           for spec, mb, ram, (_, plan) in zip(specs, estimates, host_rams, planned)]
    created = ledger.create_jobs(new)
    placed = dispatch_once(ledger, send, settings=settings, policy=policy) if any(
        c.created for c in created) else []
    return SubmitReport([Submitted(c.record, c.created) for c in created], placed)


def check_batch_name(batch: str | None) -> None:
    """``--batch`` names a folder under the output root: a plain name, never a path."""
    if batch is None or re.fullmatch(NAME_PATTERN, batch):
        return
    raise SpecError([SpecProblem(
        "command line", "--batch",
        f"{batch!r} is not a valid batch name: it names the folder <output root>/<batch>/ and "
        f"must match {NAME_PATTERN} (a letter or digit, then letters, digits, '.', '_', '-'; "
        "no '/', at most 100 characters).",
        fix="pass a plain name such as `--batch nightly-2024-06-01`.")])


def host_ram_of(spec: JobSpec) -> float:
    """The job's host-RAM figure; 0 (not limited) when a `vram_gb` job's model cannot be read."""
    try:
        return estimate_host_ram(spec).total_mb
    except ModelLoadError:
        if spec.vram_gb is None:
            raise
        return 0.0


def refuse_what_never_fits(specs: Sequence[JobSpec], estimates: Sequence[float],
                           cards: list[GpuSnapshot], policy: Policy,
                           host_rams: Sequence[float] | None = None) -> None:
    """``NoCapacity`` listing every job that no card (or host) of the farm could hold, with the figures."""
    problems = []
    for spec, mb, ram in zip(specs, estimates, host_rams or [0.0] * len(specs)):
        try:
            check_fits_farm(mb, spec.gpus, cards, policy, overridden=spec.vram_gb is not None,
                            host_ram_mb=ram)
        except NoCapacity as error:
            problems.append(f"{spec.name}: {error}")
    if problems:
        raise NoCapacity("nothing was submitted; these jobs fit no card of the farm:\n"
                         + "\n".join(problems))


def farm_cards(ledger: Ledger, settings: Settings) -> list[GpuSnapshot]:
    """Every card a worker has published (online or not); else this host's own inventory."""
    now = time.time()
    published = [card_snapshot(card, now) for card in read_gpu_snapshots(ledger)]
    return published or [to_snapshot(info) for info in read_gpus(settings)]
