"""The guards of a shared card, as pure decisions (no I/O, no clock: ``now`` is given).

Interface::

    memory_cap(reservation_mb, card_total_mb, policy) -> MemoryCap | None   # the trainer's cap
    Watchdog(policy).observe(it_s, now) -> WatchdogState                  # throughput watchdog
    data_bound(wait_fraction, util_pct, policy) -> str | None               # the warning, or None
    util_summary(samples) -> mean SM-busy (%) or None                       # per job, for the ledger

The workers act on them (workers/monitor.py); the policy knobs live in ``scheduler/policy.yaml``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from lora_farm.scheduler.policy import Policy


@dataclass(frozen=True)
class MemoryCap:
    """What a trainer may allocate on its card: ``fraction`` of the card, i.e. ``cap_mb``."""

    fraction: float
    cap_mb: float


def memory_cap(reservation_mb: float, card_total_mb: float, policy: Policy) -> MemoryCap | None:
    """The allocator cap of a job reserved ``reservation_mb`` on a card of ``card_total_mb``.

    None when there is nothing to cap (the ``cpu`` slot, an unknown card size, a zero
    reservation, the policy's ``memory_cap_factor: 0``). Never above the whole card.
    """
    if policy.memory_cap_factor <= 0 or card_total_mb <= 0 or reservation_mb <= 0:
        return None
    cap_mb = min(reservation_mb * policy.memory_cap_factor, card_total_mb)
    return MemoryCap(fraction=round(cap_mb / card_total_mb, 4), cap_mb=round(cap_mb, 1))


def data_bound(wait_fraction: float | None, util_pct: float | None, policy: Policy) -> str | None:
    """The data-bound warning (with its fix) when the steps mostly wait on the loader while the
    card idles; ``util_pct`` None (a declared card, no NVML) lets the wait alone decide."""
    if wait_fraction is None or wait_fraction < policy.data_bound_wait_fraction:
        return None
    if util_pct is not None and util_pct >= policy.data_bound_util_pct:
        return None
    busy = "card utilisation unknown" if util_pct is None else f"card {util_pct:.0f}% busy"
    return (f"data-bound: {wait_fraction:.0%} of step time waiting on the data loader ({busy}). "
            "Fix: raise `num_workers`, set `cache_latents: true`, or move the dataset to "
            "faster storage.")


@dataclass
class WatchdogState:
    slow_for_s: float = 0.0  # how long it/s has stayed below the threshold (0: not slow)
    flagged: bool = False  # slow past watchdog_flag_seconds
    requeue: bool = False  # slow past watchdog_requeue_seconds (when that is not 0)
    reason: str = ""


@dataclass
class Watchdog:
    """A job's throughput against its own running median of healthy reports.

    Slow reports do not enter the median, so a lasting slowdown never lowers its own bar.
    """

    policy: Policy
    healthy: list[float] = field(default_factory=list)
    slow_since: float | None = None

    def observe(self, it_s: float, now: float) -> WatchdogState:
        median = statistics.median(self.healthy) if self.healthy else None
        counting = median is not None and len(self.healthy) >= self.policy.watchdog_warmup_reports
        if counting and it_s < self.policy.watchdog_fraction * median:
            self.slow_since = now if self.slow_since is None else self.slow_since
        else:
            self.healthy.append(it_s)
            self.slow_since = None
            return WatchdogState()
        return self._state(it_s, median, now - self.slow_since)

    def _state(self, it_s: float, median: float, slow_for: float) -> WatchdogState:
        policy = self.policy
        flagged = slow_for >= policy.watchdog_flag_seconds
        requeue = policy.watchdog_requeue_seconds > 0 and slow_for >= policy.watchdog_requeue_seconds
        reason = (f"throughput watchdog: {it_s:.3g} it/s for {slow_for:.0f}s, under "
                  f"{policy.watchdog_fraction:.0%} of this job's median {median:.3g} it/s "
                  "(a throttled or failing card, or memory thrash)")
        return WatchdogState(slow_for, flagged, requeue, reason)


def util_summary(samples: list[float]) -> float | None:
    """Mean SM-busy (%) of a job's samples; None when none was taken."""
    return round(statistics.fmean(samples), 1) if samples else None
