"""Placement: which queued jobs go to which cards now. Pure: no I/O, no clock (``now`` is given).

Interface::

    place(jobs: list[QueuedJob], gpus: list[GpuSnapshot], reservations: list[Reservation],
          policy: Policy, now: float) -> list[Placement]
    check_fits_farm(estimate_mb, gpus_needed, gpus, policy) -> None   # raises NoCapacity at submit

All memory is MiB. ``estimate_mb`` is per card (a ``gpus: N`` DDP job needs it on each card).

**Capacity of a card.** Two views, and a job must fit both (the stricter wins)::

    planned  = total * (1 - headroom) - sum(reservations on the card)
    measured = free  - total * headroom

``planned`` is our own books: it holds a card for a job from the moment it is placed, before the
process has allocated anything. ``measured`` is NVML's free memory, which already excludes what
our running jobs use *and* what anything else on the card uses (a notebook, another farm). So
``free`` must not have our reservations subtracted again: a running job at its peak would be
counted twice. Taking the minimum covers both failure modes: placement overruns neither its own
promises nor memory that is really gone. The one gap: a foreign process *and* a job of ours still
ramping up at the same time can overcommit by up to the smaller of the two; the headroom absorbs
that, and the pass after the job reaches its peak sees it in ``free``. Declared cards report
``free == total`` so only ``planned`` binds. The ``cpu`` slot is never limited by VRAM, only by
``policy.cpu_slot_jobs``.

**Order, spreading and packing.** Jobs go by (priority desc, submitted_at asc, job_id). A
single-card job goes to an idle card when one fits it (the smallest idle card that fits): two jobs
sharing a card each run slower while another card sits idle. Only when no idle card fits does it
pack onto a busy card, the fullest one that still fits (best fit). While a multi-card job is
queued, whole cards are kept for it instead: single-card jobs then pack onto busy cards first and
take an idle card only when no busy one fits. A job that does not fit is skipped and later jobs may
fill the gaps (backfill). A ``gpus: N`` job takes N idle whole cards on one host (the host with the
fewest such cards that still suffices), and keeps them whole: while it holds them (a job reserved
on several cards), nothing else is placed there.

**No starvation.** A job that has waited longer than ``policy.starvation_seconds`` (since it last
entered the queue: a job requeued after an OOM or a crash starts its wait afresh) goes before
every job that has not. The first such job that does not fit holds back the card(s) that would
fit it soonest (smallest shortfall now): nothing new is placed there, so they drain and it runs.
One hold at a time keeps the rest of the farm busy (EASY backfilling).

A queued job that already has a reservation (the ledger lagging behind dispatch) is skipped.

**Host RAM.** A job also needs host RAM (``scheduler.host_ram``: the base model is read on the
host before it is cast and moved). A host's RAM comes with its cards' snapshots
(``GpuSnapshot.host_ram_mb``, from the inventory; None: unknown, not limited); the jobs reserved
on its cards and those placed in this pass use it up, once per job whatever its card count. A
job whose need exceeds what its host has left waits (another host may take it), and
``check_fits_farm`` refuses at submit, with the figures, a job no host could hold even empty.

**Suspect cards.** A card the throughput watchdog requeued a job away from is ``suspect`` for
``policy.suspect_card_seconds``: every job takes it last (only when no other card fits), and the
job that left it (``QueuedJob.avoid``) never goes back to it while it is suspect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, TypeVar

from lora_farm.errors import NoCapacity
from lora_farm.scheduler.policy import Policy


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    priority: int
    submitted_at: float
    estimate_mb: float
    gpus: int = 1
    queued_at: float | None = None  # when it (re-)entered the queue; None: at submitted_at
    host_ram_mb: float = 0.0  # peak host RAM (scheduler.host_ram)
    avoid: tuple[str, ...] = ()  # cards it never goes to while they are suspect (a watchdog's)

    def waited(self, now: float) -> float:
        """How long it has waited since it last entered the queue (a retry starts afresh)."""
        return now - (self.submitted_at if self.queued_at is None else self.queued_at)


@dataclass(frozen=True)
class GpuSnapshot:
    uuid: str
    host: str
    total_mb: float
    free_mb: float
    cpu: bool = False  # the `cpu` slot of a host without cards: no VRAM limit
    host_ram_mb: float | None = None  # the RAM of the card's host; None: unknown (not limited)
    suspect: bool = False  # a throughput watchdog left it lately: placed last, avoided by its job


@dataclass(frozen=True)
class Reservation:
    job_id: str
    gpu_uuid: str
    mb: float
    host_ram_mb: float = 0.0  # the job's host RAM (counted once per job on its host)


@dataclass(frozen=True)
class Placement:
    job_id: str
    gpu_uuids: list[str]


class _Card:
    """A card's state during one pass (capacity shrinks as jobs are placed on it)."""

    __slots__ = ("uuid", "host", "cpu", "usable", "planned", "measured", "jobs", "slots", "held",
                 "whole", "ram", "suspect")

    def __init__(self, snapshot: GpuSnapshot, policy: Policy, ram: "_HostRam"):
        self.uuid, self.host, self.cpu = snapshot.uuid, snapshot.host, snapshot.cpu
        self.ram = ram  # shared by the cards of one host
        self.suspect = snapshot.suspect
        self.usable = math.inf if self.cpu else snapshot.total_mb * (1 - policy.headroom)
        self.planned = self.usable
        self.measured = math.inf if self.cpu else snapshot.free_mb - snapshot.total_mb * policy.headroom
        self.jobs = 0
        self.slots = policy.cpu_slot_jobs if self.cpu else policy.max_jobs_per_gpu
        self.held = False
        self.whole = False  # a multi-card job holds it: no other job joins

    @property
    def capacity(self) -> float:
        return min(self.planned, self.measured)

    @property
    def idle(self) -> bool:
        return self.jobs == 0

    def takes(self, mb: float, host_ram_mb: float = 0.0) -> bool:
        return (not self.held and not self.whole and self.jobs < self.slots and self.capacity >= mb
                and self.ram.left >= host_ram_mb)

    def add(self, mb: float, whole: bool = False) -> None:
        self.planned -= mb
        self.measured -= mb
        self.jobs += 1
        self.whole = self.whole or whole


class _HostRam:
    """A host's RAM during one pass: what is left after the jobs reserved or placed there."""

    __slots__ = ("total", "left")

    def __init__(self, total_mb: float | None):
        self.total = math.inf if total_mb is None else total_mb
        self.left = self.total


def place(jobs: Iterable[QueuedJob], gpus: Iterable[GpuSnapshot],
          reservations: Iterable[Reservation], policy: Policy, now: float) -> list[Placement]:
    """The jobs that start now and their cards, in the order they were decided."""
    cards = _cards(gpus, reservations, policy)
    reserved_jobs = {r.job_id for r in reservations}
    waiting = sorted((j for j in jobs if j.job_id not in reserved_jobs),
                     key=lambda j: (-j.priority, j.submitted_at, j.job_id))
    starving = {j.job_id for j in waiting if j.waited(now) > policy.starvation_seconds}
    placements: list[Placement] = []
    holding = False
    multi_card_waiting = {j.job_id for j in waiting if j.gpus > 1}
    for job in sorted(waiting, key=lambda j: j.job_id not in starving):  # the starving first
        chosen = _choose(job, cards, keep_whole=bool(multi_card_waiting - {job.job_id}))
        if chosen:
            multi_card_waiting.discard(job.job_id)
            for card in chosen:
                card.add(job.estimate_mb, whole=job.gpus > 1)
            chosen[0].ram.left -= job.host_ram_mb  # the cards of one job share its host
            placements.append(Placement(job.job_id, [card.uuid for card in chosen]))
        elif job.job_id in starving and not holding:
            holding = _hold_for(job, cards)
    return placements


def _cards(gpus: Iterable[GpuSnapshot], reservations: Iterable[Reservation],
           policy: Policy) -> list[_Card]:
    gpus, reservations = list(gpus), list(reservations)
    hosts = {host: _HostRam(_host_ram(gpus, host)) for host in {s.host for s in gpus}}
    cards = {snapshot.uuid: _Card(snapshot, policy, hosts[snapshot.host]) for snapshot in gpus}
    cards_of: dict[str, set[str]] = {}
    for reservation in reservations:
        cards_of.setdefault(reservation.job_id, set()).add(reservation.gpu_uuid)
    seen: set[tuple[str, str]] = set()
    charged: set[str] = set()  # jobs whose host RAM is counted: once a job, whatever its cards
    for reservation in reservations:
        card = cards.get(reservation.gpu_uuid)
        if card is None:
            continue  # a card that left the inventory; its reservation is the reaper's business
        card.planned -= reservation.mb
        card.whole = card.whole or len(cards_of[reservation.job_id]) > 1  # a multi-card job's
        if (reservation.job_id, reservation.gpu_uuid) not in seen:
            seen.add((reservation.job_id, reservation.gpu_uuid))
            card.jobs += 1
        if reservation.job_id not in charged:
            charged.add(reservation.job_id)
            card.ram.left -= reservation.host_ram_mb
    return list(cards.values())


Hosted = TypeVar("Hosted", "_Card", GpuSnapshot)


def _by_host(items: Iterable[Hosted]) -> dict[str, list[Hosted]]:
    """Cards (or snapshots) grouped by their host, each group in the order given."""
    grouped: dict[str, list[Hosted]] = {}
    for item in items:
        grouped.setdefault(item.host, []).append(item)
    return grouped


def _host_ram(gpus: list[GpuSnapshot], host: str) -> float | None:
    """The host's RAM as its cards report it (the smallest figure, should two disagree)."""
    figures = [s.host_ram_mb for s in gpus if s.host == host and s.host_ram_mb is not None]
    return min(figures) if figures else None


def _choose(job: QueuedJob, cards: list[_Card], keep_whole: bool) -> list[_Card]:
    cards = [card for card in cards if not (card.suspect and card.uuid in job.avoid)]
    if job.gpus == 1:
        card = _best_single(job.estimate_mb, cards, keep_whole, job.host_ram_mb)
        return [card] if card else []
    return _whole_cards(job.estimate_mb, job.gpus, cards, job.host_ram_mb)


def _best_single(mb: float, cards: list[_Card], keep_whole: bool, host_ram_mb: float = 0.0) -> _Card | None:
    """An idle card first (busy first while whole cards are kept), then the tightest fit."""
    best, best_key = None, None
    for card in cards:
        if card.takes(mb, host_ram_mb):
            key = (card.suspect, card.idle == keep_whole, card.capacity - mb, card.uuid)
            if best_key is None or key < best_key:
                best, best_key = card, key
    return best


def _whole_cards(mb: float, count: int, cards: list[_Card], host_ram_mb: float = 0.0) -> list[_Card]:
    by_host = _by_host(card for card in cards if not card.cpu and card.idle and card.takes(mb, host_ram_mb))
    hosts = sorted((len(found), host) for host, found in by_host.items() if len(found) >= count)
    if not hosts:
        return []
    found = sorted(by_host[hosts[0][1]], key=lambda card: (card.suspect, card.capacity, card.uuid))
    return found[:count]


def _hold_for(job: QueuedJob, cards: list[_Card]) -> bool:
    """Hold the card(s) that would fit ``job`` soonest; False when none ever could."""
    def shortfall(card: _Card) -> float:
        return max(0.0, job.estimate_mb - card.capacity)

    def soonest(card: _Card) -> tuple:
        # a multi-card job needs idle cards: fewest jobs to drain first, then least shortfall
        if job.gpus > 1:
            return (card.jobs, shortfall(card), card.uuid)
        return (shortfall(card), card.jobs, card.uuid)

    ever = [c for c in cards if not c.held and c.usable >= job.estimate_mb
            and c.ram.total >= job.host_ram_mb and (job.gpus == 1 or not c.cpu)]
    options = []
    for host, found in _by_host(ever).items():
        if len(found) >= job.gpus:
            chosen = sorted(found, key=soonest)[:job.gpus]
            options.append((sum(soonest(c)[0] for c in chosen), host, chosen))
    if not options:
        return False
    for card in min(options, key=lambda option: option[:2])[2]:
        card.held = True
    return True


def largest_card_mb(gpus: Iterable[GpuSnapshot], policy: Policy) -> float | None:
    """What the farm's largest card could hold when empty (its total less the headroom);
    None on a farm of CPU cards only, where no memory is reserved."""
    usable = [s.total_mb * (1 - policy.headroom) for s in gpus if not s.cpu]
    return max(usable, default=None)


def check_fits_farm(estimate_mb: float, gpus_needed: int, gpus: Iterable[GpuSnapshot],
                    policy: Policy, overridden: bool = False, host_ram_mb: float = 0.0) -> None:
    """Refuse, with the figures, a job no host of the farm could ever run (even when empty):
    too little VRAM on its cards, or too little RAM on every host whose cards would hold it.

    ``overridden``: the figure is the job's own ``vram_gb``, so the fix offered is to lower it.
    """
    snapshots = list(gpus)
    roomy = {host: found for host, found in _by_host(snapshots).items()
             if (_host_ram(snapshots, host) or math.inf) >= host_ram_mb}
    if not roomy:
        raise NoCapacity(_no_host_ram_message(host_ram_mb, snapshots))
    for found in roomy.values():
        if gpus_needed == 1 and any(s.cpu for s in found):
            return
        usable = [s for s in found if not s.cpu and s.total_mb * (1 - policy.headroom) >= estimate_mb]
        if len(usable) >= gpus_needed:
            return
    raise NoCapacity(_no_capacity_message(estimate_mb, gpus_needed, snapshots, policy, overridden))


def _no_capacity_message(estimate_mb: float, gpus_needed: int, snapshots: list[GpuSnapshot],
                         policy: Policy, overridden: bool) -> str:
    cards = [s for s in snapshots if not s.cpu]
    pct = f"{policy.headroom:.0%}"
    if overridden:
        fix = "Fix: lower `vram_gb` if the job needs less, or add larger cards."
    else:
        fix = ("Fix: lower batch_size, resolution or max_seq_len, turn on gradient_checkpointing, "
               "or add larger cards; if the estimate is wrong for this job, set `vram_gb`.")
    if not cards:
        return (f"the job needs {gpus_needed} GPUs on one host but this farm has only CPU slots. "
                "Fix: set `gpus: 1`, or run it on a farm with GPUs (or LORAFARM_GPUS).")
    largest = max(cards, key=lambda s: s.total_mb)  # the first of equals: gpu0 before gpu1
    per_card = "" if gpus_needed == 1 else f" on each of {gpus_needed} cards of one host"
    text = (f"the job needs {_gb(estimate_mb)}{per_card}; largest card {largest.uuid} "
            f"({largest.host}) has {_gb(largest.total_mb)} of which "
            f"{_gb(largest.total_mb * (1 - policy.headroom))} usable with {pct} headroom")
    if gpus_needed > 1:
        fitting = {host: sum(c.total_mb * (1 - policy.headroom) >= estimate_mb for c in found)
                   for host, found in _by_host(cards).items()}
        best = max(fitting.items(), key=lambda kv: kv[1], default=("-", 0))
        text += f"; the most cards that fit it on one host is {best[1]} ({best[0]})"
    return f"{text}. {fix}"


def _no_host_ram_message(host_ram_mb: float, snapshots: list[GpuSnapshot]) -> str:
    host, ram = max(((s.host, s.host_ram_mb or 0.0) for s in snapshots), key=lambda pair: pair[1],
                    default=("-", 0.0))
    return (f"the job needs {_gb(host_ram_mb)} of host RAM (the base model is read whole before it is "
            f"cast), but the largest host {host} has {_gb(ram)}. Fix: store the "
            "base in bf16 (not fp32) to halve what is read, run it on a host with more RAM (or add "
            "swap and set LORAFARM_HOST_RAM), or set `host_ram_gb` if the estimate is wrong for this job.")


def _gb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB"
