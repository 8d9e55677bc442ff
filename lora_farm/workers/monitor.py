"""The guards of a shared card, as the runner applies them to one running trainer.

- :func:`cap_env`: the allocator cap the trainer is spawned with (its reservation's share of the
  card, ``scheduler/guards.memory_cap``), so an under-estimate runs *that* job out of memory.
- :class:`JobMonitor`: fed the trainer's progress events and sampled every few seconds, it
  writes the job's telemetry to the ledger (``gpu_util``, ``sm_busy_mean``, ``util_source``,
  ``co_tenants``, ``it_s``, ``data_wait_pct``, ``warning``), writes each new warning once to the
  job log, and says when the throughput watchdog wants the job requeued away from its card.

Decisions are the pure ones of ``scheduler/guards.py``; this module only gathers and writes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from lora_farm.ledger import JobRecord, Ledger
from lora_farm.protocol import VRAM_CAP_FRACTION_ENV, VRAM_CAP_MB_ENV
from lora_farm.scheduler.gpus import UtilSample, sample_utilisation
from lora_farm.scheduler.guards import Watchdog, WatchdogState, data_bound, memory_cap, util_summary
from lora_farm.scheduler.policy import Policy

log = logging.getLogger(__name__)
Sampler = Callable[[str, set[int]], UtilSample | None]
MPS_LIMIT_ENV = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"


def cap_env(ledger: Ledger, record: JobRecord, policy: Policy,
            environ: dict[str, str] | None = None) -> dict[str, str]:
    """The cap of the trainer of ``record`` on its card(s); {} for none.

    ``LORAFARM_VRAM_CAP_*`` (the trainer caps PyTorch's allocator), and MPS's per-client hard
    limit at the same size for each card the trainer sees (ignored where no MPS daemon runs),
    unless the operator set ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` for the worker."""
    environ = os.environ if environ is None else environ
    if not record.gpus:
        return {}
    total, source = ledger.client.hmget(ledger.keys.gpu(record.gpus[0]), "total_mb", "source")
    if source == "cpu" or not total:
        return {}
    cap = memory_cap(record.estimate_mb, float(total), policy)
    if cap is None:
        return {}
    env = {VRAM_CAP_FRACTION_ENV: str(cap.fraction), VRAM_CAP_MB_ENV: str(cap.cap_mb)}
    if MPS_LIMIT_ENV not in environ:
        env[MPS_LIMIT_ENV] = ",".join(f"{i}={int(cap.cap_mb)}MB" for i in range(len(record.gpus)))
    return env


class JobMonitor:
    """Telemetry, the data-bound warning and the throughput watchdog of one attempt."""

    def __init__(self, ledger: Ledger, record: JobRecord, policy: Policy, log_path: Path,
                 sampler: Sampler = sample_utilisation, sample_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.ledger, self.record, self.policy, self.log_path = ledger, record, policy, log_path
        self.sampler, self.sample_seconds, self.clock = sampler, sample_seconds, clock
        self.watchdog = Watchdog(policy)
        self.watchdog_state = WatchdogState()  # the watchdog's last word: flagged, requeue, reason
        self.samples: list[float] = []
        self.waits: list[float] = []  # data_wait_frac of each report: judged over the attempt
        self.util_pct: float | None = None
        self.data_warning = ""
        self.last_sample = -float("inf")
        self.logged: set[str] = set()  # warning kinds already written to the job log

    def progress(self, event: dict[str, Any]) -> dict[str, Any]:
        """Ledger fields from one progress event (the watchdog and the data wait judged)."""
        fields: dict[str, Any] = {}
        it_s, wait = event.get("step_it_s"), event.get("data_wait_frac")
        if it_s is not None:
            fields["it_s"] = it_s
            self.watchdog_state = self.watchdog.observe(float(it_s), self.clock())
        if wait is not None:
            self.waits.append(float(wait))
            mean_wait = sum(self.waits) / len(self.waits)
            fields["data_wait_pct"] = round(mean_wait * 100, 1)
            self.data_warning = data_bound(mean_wait, self.util_pct, self.policy) or ""
        fields["warning"] = self._warning()
        return fields

    def sample(self, pid: int | None) -> None:
        """Every ``sample_seconds``: utilisation of the job (or its card) and its co-tenants."""
        now = self.clock()
        if now - self.last_sample < self.sample_seconds or not self.record.gpus:
            return
        self.last_sample = now
        card = self.record.gpus[0]
        found = self.sampler(card, _process_tree(pid)) or self._published_card_util(card)
        fields: dict[str, Any] = {"co_tenants": self._co_tenants(card), "util_source": "none"}
        if found is not None:
            self.util_pct = found.pct
            self.samples.append(found.pct)
            fields.update(gpu_util=found.pct, util_source=found.source,
                          sm_busy_mean=util_summary(self.samples))
        self.ledger.update(self.record.id, fields)

    def _published_card_util(self, card: str) -> UtilSample | None:
        """The card's utilisation as its worker last published it (another host's NVML view)."""
        value = self.ledger.client.hget(self.ledger.keys.gpu(card), "util_pct")
        return UtilSample(float(value), "card") if value else None

    def _co_tenants(self, card: str) -> list[str]:
        return sorted(job_id for job_id, held in self.ledger.reservations().items()
                      if card in held.get("gpus", []) and job_id != self.record.id)

    def _warning(self) -> str:
        found = {"data-bound": self.data_warning,
                 "watchdog": self.watchdog_state.reason if self.watchdog_state.flagged else ""}
        for kind, text in found.items():
            if text and kind not in self.logged:
                self.logged.add(kind)
                self._log(text)
        return " | ".join(text for text in found.values() if text)

    def _log(self, text: str) -> None:
        log.warning("job %s: %s", self.record.id, text)
        try:
            with open(self.log_path, "a", encoding="utf-8") as stream:
                stream.write(f"lorafarm: warning: {text}\n")
        except OSError as error:
            log.warning("job %s: could not write to %s: %s", self.record.id, self.log_path, error)


def _process_tree(pid: int | None) -> set[int]:
    """The trainer and its children (DataLoader workers, ranks): the pids NVML may name."""
    if not pid:
        return set()
    try:
        root = psutil.Process(pid)
        return {pid} | {child.pid for child in root.children(recursive=True)}
    except psutil.Error:
        return {pid}
