"""GPU inventory: what cards this host has, how full they are, and how to pin a job to them.

The only module of the project that imports ``pynvml`` (package ``nvidia-ml-py``).

Interface::

    read_gpus(settings=None) -> list[GpuInfo]    # NVML, else LORAFARM_GPUS, else one CPU slot
    GpuInfo.to_dict() / GpuInfo.from_dict(data)  # JSON for the ledger / a published inventory
    parse_declared("gpu0:24GiB,gpu1:24GiB")      # -> list[GpuInfo] (source="declared")
    pinned_env(["GPU-3f..."])                    # -> {"CUDA_VISIBLE_DEVICES": ..., "CUDA_DEVICE_ORDER": ...}
    to_snapshot(info) -> place.GpuSnapshot       # what the pure placement reads
    host_ram_mb(settings)                        # LORAFARM_HOST_RAM, else the OS's total RAM
    sample_utilisation(uuid, pids) -> UtilSample | None   # SM-busy of a job's processes, else
                                                 # of its card; None off NVML (declared cards)

Every card carries its host's RAM (``host_ram_mb``): placement keeps a host's jobs within it.

Sources, in order:

- ``nvml``: NVML initialises and finds at least one card. Cards are named by UUID (``GPU-...``,
  ``MIG-...``), which never changes with enumeration order; a card whose query fails is still
  listed, with ``error`` set and no free memory, so placement skips it and status shows why.
- ``declared``: ``LORAFARM_GPUS="gpu0:24GiB,gpu1:24GiB"`` on machines without NVML (CPU boxes,
  CI). A declared card's uuid is its name, its free memory is its total, and the trainer sees
  ``CUDA_VISIBLE_DEVICES=gpu0``: the whole path from placement to the pinned process is the same
  as on a GPU host, only the trainer then runs on the CPU.
- ``cpu``: neither. One slot named ``cpu`` whose capacity is not limited by VRAM; it runs
  ``policy.cpu_slot_jobs`` jobs at a time, and ``note`` says why the farm fell back to it.

Memory figures (``*_mb``) are MiB (2**20 bytes), as ``nvidia-smi`` prints them.
"""

from __future__ import annotations

import logging
import re
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lora_farm.errors import GpuInventoryError
from lora_farm.settings import Settings, get_settings, host_name

if TYPE_CHECKING:
    from lora_farm.scheduler.place import GpuSnapshot

log = logging.getLogger(__name__)

Source = Literal["nvml", "declared", "cpu"]
CPU_SLOT = "cpu"
# A name becomes part of a Celery queue (gpu.<uuid>) and of CUDA_VISIBLE_DEVICES: keep it plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
# GPU makers sell "24 GB" cards that hold 24 GiB (nvidia-smi: 24564MiB), so GB means GiB here.
_UNIT_MIB = {"tib": 1024 * 1024, "tb": 1024 * 1024, "t": 1024 * 1024,
             "gib": 1024, "gb": 1024, "g": 1024, "mib": 1, "mb": 1, "m": 1}
_CPU_NOTE = ("no NVML (no NVIDIA driver) and no LORAFARM_GPUS: using one CPU slot named `cpu`. "
             "Declare cards with e.g. LORAFARM_GPUS=gpu0:24GiB,gpu1:24GiB to schedule as on a GPU farm.")


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mb: float


@dataclass
class GpuInfo:
    uuid: str
    name: str
    index: int
    host: str
    total_mb: float
    free_mb: float
    used_mb: float = 0.0
    util_pct: float | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    source: Source = "declared"
    error: str | None = None  # this card could not be read (NVML): listed, never scheduled
    note: str = ""  # why this inventory source was chosen, where it is worth saying
    host_ram_mb: float | None = None  # the RAM of its host (placement keeps the host's jobs within it)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (ledger, status --json)."""
        return {**self.__dict__, "processes": [p.__dict__.copy() for p in self.processes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GpuInfo":
        """Back from ``to_dict()`` (e.g. an inventory a worker host published to Redis)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["processes"] = [GpuProcess(int(p["pid"]), float(p["used_mb"]))
                              for p in data.get("processes", [])]
        return cls(**known)


def read_gpus(settings: Settings | None = None) -> list[GpuInfo]:
    """This host's cards: NVML when it works and finds cards, else the declared ones, else CPU."""
    settings = settings or get_settings()
    cards = read_nvml()
    if not cards and settings.gpus.strip():
        cards = parse_declared(settings.gpus)
    if not cards:
        log.info(_CPU_NOTE)
        cards = [cpu_slot()]
    ram = host_ram_mb(settings)
    for card in cards:
        card.host_ram_mb = ram
    return cards


def host_ram_mb(settings: Settings) -> float:
    """This host's RAM in MiB: LORAFARM_HOST_RAM (e.g. '64GiB') when set, else the OS's total."""
    declared = settings.host_ram.strip()
    if not declared:
        import psutil

        return psutil.virtual_memory().total / (1024 * 1024)
    match = _MEMORY.match(declared)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNIT_MIB or float(match.group(1)) <= 0:
        raise GpuInventoryError(f"LORAFARM_HOST_RAM={declared!r} is not a positive size with a unit. "
                                "Fix: write it as e.g. 64GiB, 512GB or 65536MiB (or unset it).")
    return float(match.group(1)) * _UNIT_MIB[unit]


def cpu_slot(host: str | None = None) -> GpuInfo:
    """The single slot of a host with neither NVML nor a declared inventory."""
    return GpuInfo(uuid=CPU_SLOT, name="cpu", index=0, host=host or host_name(), total_mb=0.0,
                   free_mb=0.0, source="cpu", note=_CPU_NOTE)


def parse_declared(text: str, host: str | None = None) -> list[GpuInfo]:
    """``"gpu0:24GiB,a100:80GB,gpu2:24576MiB"`` -> cards; raise naming the bad entry and the fix."""
    host = host or host_name()
    cards: list[GpuInfo] = []
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        raise GpuInventoryError(
            f"LORAFARM_GPUS={text!r} declares no card. Fix: write name:memory pairs separated by "
            "commas, e.g. LORAFARM_GPUS=gpu0:24GiB,gpu1:24GiB (or unset it).")
    for index, entry in enumerate(entries):
        name, total_mb = _parse_entry(entry)
        if any(card.uuid == name for card in cards):
            raise GpuInventoryError(
                f"LORAFARM_GPUS: card name `{name}` is declared twice. Fix: give each card its "
                "own name, e.g. gpu0:24GiB,gpu1:24GiB.")
        cards.append(GpuInfo(uuid=name, name=name, index=index, host=host, total_mb=total_mb,
                             free_mb=total_mb, source="declared"))
    return cards


def _parse_entry(entry: str) -> tuple[str, float]:
    name, sep, memory = entry.partition(":")
    name = name.strip()
    example = "e.g. gpu0:24GiB, a100:80GB or gpu1:24576MiB"
    if not sep or not name:
        raise GpuInventoryError(
            f"LORAFARM_GPUS entry {entry!r} is not name:memory. Fix: write it as {example}.")
    if not _NAME.match(name):
        raise GpuInventoryError(
            f"LORAFARM_GPUS entry {entry!r}: card name `{name}` may hold only letters, digits, "
            f"'.', '_' and '-' (it names a queue). Fix: rename it, {example}.")
    match = _MEMORY.match(memory)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNIT_MIB:
        raise GpuInventoryError(
            f"LORAFARM_GPUS entry {entry!r}: memory {memory.strip()!r} is not a size with a unit "
            f"(TiB, GiB/GB, MiB/MB). Fix: write it as {example}.")
    total_mb = float(match.group(1)) * _UNIT_MIB[unit]
    if total_mb <= 0:
        raise GpuInventoryError(
            f"LORAFARM_GPUS entry {entry!r}: memory must be positive. Fix: write it as {example}.")
    return name, total_mb


def pinned_env(gpu_uuids: list[str]) -> dict[str, str]:
    """Environment that pins a process to exactly these cards (by UUID, so order never matters).

    CUDA numbers cards fastest-first and NVML by PCI bus; PCI_BUS_ID makes any index-based tool
    in the job agree with NVML. The CPU slot hides every card (``CUDA_VISIBLE_DEVICES=""``).
    """
    cards = [uuid for uuid in gpu_uuids if uuid != CPU_SLOT]
    return {"CUDA_VISIBLE_DEVICES": ",".join(cards), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def to_snapshot(info: GpuInfo) -> "GpuSnapshot":
    """What the pure placement needs to know about a card."""
    from lora_farm.scheduler.place import GpuSnapshot

    free_mb = 0.0 if info.error else info.free_mb
    return GpuSnapshot(uuid=info.uuid, host=info.host, total_mb=info.total_mb, free_mb=free_mb,
                       cpu=info.source == "cpu", host_ram_mb=info.host_ram_mb)


# ---- NVML -------------------------------------------------------------------------------------

def read_nvml() -> list[GpuInfo]:
    """Every card NVML sees, or ``[]`` when NVML is missing or finds none (never raises)."""
    try:
        import pynvml
    except ImportError:
        log.debug("pynvml is not installed (pip install nvidia-ml-py); no NVML inventory")
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        log.debug("NVML did not initialise (%s); no NVML inventory", error)
        return []
    try:
        host = host_name()
        return [_read_card(pynvml, index, host) for index in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError as error:
        log.warning("NVML could not count the cards: %s", error)
        return []
    finally:
        with suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _read_card(pynvml: Any, index: int, host: str) -> GpuInfo:
    """One card; a failing query gives a card with ``error`` set instead of an exception."""
    uuid = f"nvml-index-{index}"
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        name = _text(pynvml.nvmlDeviceGetName(handle))
        memory = _memory_info(pynvml, handle)
        mib = 1024 * 1024
        return GpuInfo(uuid=uuid, name=name, index=index, host=host, total_mb=memory.total / mib,
                       free_mb=memory.free / mib, used_mb=memory.used / mib,
                       util_pct=_utilisation(pynvml, handle),
                       processes=_processes(pynvml, handle), source="nvml")
    except pynvml.NVMLError as error:
        log.warning("GPU %d (%s) could not be read: %s", index, uuid, error)
        return GpuInfo(uuid=uuid, name="unreadable", index=index, host=host, total_mb=0.0,
                       free_mb=0.0, source="nvml", error=str(error))


def _memory_info(pynvml: Any, handle: Any) -> Any:
    # v2 counts memory the driver reserves as used; v1 reports it as free, which overcommits.
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    except (pynvml.NVMLError, AttributeError, TypeError):
        return pynvml.nvmlDeviceGetMemoryInfo(handle)


def _utilisation(pynvml: Any, handle: Any) -> float | None:
    try:
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except pynvml.NVMLError:
        return None  # e.g. MIG instances report no utilisation


def _processes(pynvml: Any, handle: Any) -> list[GpuProcess]:
    by_pid: dict[int, float] = {}
    for query in (pynvml.nvmlDeviceGetComputeRunningProcesses,
                  pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            for process in query(handle):
                used = process.usedGpuMemory  # None where the driver hides it (containers)
                by_pid[process.pid] = max(by_pid.get(process.pid, 0.0),
                                          (used or 0) / (1024 * 1024))
        except pynvml.NVMLError:
            continue
    return [GpuProcess(pid, used_mb) for pid, used_mb in sorted(by_pid.items())]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- utilisation of a running job ------------------------------------------------------------

@dataclass(frozen=True)
class UtilSample:
    pct: float  # SM-busy, %
    source: Literal["process", "card"]  # the job's own processes, or the whole card (shared)


def sample_utilisation(uuid: str, pids: set[int], window_s: float = 5.0) -> UtilSample | None:
    """SM-busy of ``pids`` on card ``uuid`` over the last ``window_s`` where the driver reports it
    per process (``nvmlDeviceGetProcessUtilization``), else of the whole card; None when NVML is
    missing or does not know the card (a declared card). Never raises."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        own = _process_utilisation(pynvml, handle, pids, window_s)
        if own is not None:
            return UtilSample(own, "process")
        return UtilSample(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), "card")
    except pynvml.NVMLError as error:
        log.debug("no utilisation for %s: %s", uuid, error)
        return None
    finally:
        with suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _process_utilisation(pynvml: Any, handle: Any, pids: set[int], window_s: float) -> float | None:
    """The SM-busy the driver attributes to ``pids`` (summed), None where it does not say (no
    per-process accounting, e.g. in containers without the host's pid namespace)."""
    import time

    since = int((time.time() - window_s) * 1_000_000)
    try:
        samples = pynvml.nvmlDeviceGetProcessUtilization(handle, since)
    except pynvml.NVMLError:
        return None
    latest: dict[int, Any] = {}
    for sample in samples:
        if sample.pid in pids and (sample.pid not in latest
                                   or sample.timeStamp > latest[sample.pid].timeStamp):
            latest[sample.pid] = sample
    return float(sum(s.smUtil for s in latest.values())) if latest else None
