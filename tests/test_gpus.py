"""GPU inventory: declared cards, the CPU slot, pinning, and NVML where a GPU is present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lora_farm.errors import GpuInventoryError
from lora_farm.scheduler import gpus as inventory
from lora_farm.scheduler.gpus import GpuInfo, parse_declared, pinned_env, read_gpus, to_snapshot
from lora_farm.settings import Settings

HAS_NVML = bool(inventory.read_nvml())
needs_no_nvml = pytest.mark.skipif(HAS_NVML, reason="NVML finds cards here; it wins over fallbacks")


def test_parse_declared_reads_names_and_sizes():
    cards = parse_declared("gpu0:24GiB, a100:80GB ,gpu2:24576MiB,small:0.5G", host="h1")
    assert [c.uuid for c in cards] == ["gpu0", "a100", "gpu2", "small"]
    assert [c.total_mb for c in cards] == [24576, 81920, 24576, 512]
    assert all(c.free_mb == c.total_mb and c.source == "declared" and c.host == "h1" for c in cards)
    assert [c.index for c in cards] == [0, 1, 2, 3]


@pytest.mark.parametrize("text, names", [
    ("gpu0", ["'gpu0'", "name:memory"]),
    ("gpu0:24", ["'24'", "unit"]),
    ("gpu0:24XB", ["'24XB'", "unit"]),
    ("gpu 0:24GiB", ["`gpu 0`", "rename"]),
    ("gpu0:24GiB,gpu0:8GiB", ["`gpu0`", "twice"]),
    ("gpu0:0GiB", ["'gpu0:0GiB'", "positive"]),
    (" , ", ["declares no card"]),
])
def test_parse_declared_names_the_bad_entry_and_the_fix(text, names):
    with pytest.raises(GpuInventoryError) as raised:
        parse_declared(text)
    message = str(raised.value)
    assert "LORAFARM_GPUS" in message and "Fix:" in message
    for name in names:
        assert name in message


@needs_no_nvml
def test_read_gpus_uses_the_declared_inventory_without_nvml():
    cards = read_gpus(Settings(gpus="gpu0:24GiB,gpu1:24GiB"))
    assert [(c.uuid, c.total_mb, c.source) for c in cards] == [("gpu0", 24576, "declared"),
                                                               ("gpu1", 24576, "declared")]


@needs_no_nvml
def test_read_gpus_falls_back_to_one_cpu_slot_and_says_so():
    (slot,) = read_gpus(Settings(gpus=""))
    assert slot.uuid == "cpu" and slot.source == "cpu"
    assert "LORAFARM_GPUS" in slot.note and "CPU slot" in slot.note
    snapshot = to_snapshot(slot)
    assert snapshot.cpu and snapshot.uuid == "cpu"


def test_read_gpus_reports_a_bad_declared_inventory():
    if HAS_NVML:
        pytest.skip("NVML finds cards here; the declared inventory is not read")
    with pytest.raises(GpuInventoryError, match="gpu0:lots"):
        read_gpus(Settings(gpus="gpu0:lots"))


def test_pinned_env_pins_by_uuid_in_pci_order():
    assert pinned_env(["GPU-aaa", "GPU-bbb"]) == {"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb",
                                                  "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert pinned_env(["cpu"])["CUDA_VISIBLE_DEVICES"] == ""


def test_a_child_process_sees_exactly_the_pinned_cards():
    """The declared path reaches the process as it would on a GPU host."""
    (card,) = parse_declared("gpu3:24GiB")
    env = {**os.environ, **pinned_env([card.uuid])}
    script = "import json, os; print(json.dumps({k: os.environ.get(k) for k in " \
             "('CUDA_VISIBLE_DEVICES', 'CUDA_DEVICE_ORDER')}))"
    seen = json.loads(subprocess.run([sys.executable, "-c", script], env=env, check=True,
                                     capture_output=True, text=True).stdout)
    assert seen == {"CUDA_VISIBLE_DEVICES": "gpu3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_gpu_info_is_plain_json():
    info = GpuInfo("GPU-1", "H100", 0, "h", 81559.0, 80000.0, 1559.0, 37.0,
                   [inventory.GpuProcess(123, 1024.0)], "nvml")
    data = json.loads(json.dumps(info.to_dict()))
    assert data["processes"] == [{"pid": 123, "used_mb": 1024.0}]
    assert GpuInfo.from_dict(data) == info


def test_an_unreadable_card_is_listed_not_raised():
    """NVML cannot run here, so a stand-in library whose second card is lost drives _read_card."""
    import pynvml

    def handle(index):
        if index == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return index

    mib = 1024 * 1024
    fake = SimpleNamespace(
        NVMLError=pynvml.NVMLError, nvmlMemory_v2=pynvml.nvmlMemory_v2,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetUUID=lambda h: b"GPU-%d" % h, nvmlDeviceGetName=lambda h: "Test GPU",
        nvmlDeviceGetMemoryInfo=lambda h, version=None: SimpleNamespace(
            total=24576 * mib, free=20000 * mib, used=4576 * mib),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=42),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=7, usedGpuMemory=None)],
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: [SimpleNamespace(pid=7, usedGpuMemory=mib)])
    good, lost = (inventory._read_card(fake, i, "h") for i in (0, 1))
    assert (good.uuid, good.free_mb, good.util_pct, good.error) == ("GPU-0", 20000, 42.0, None)
    assert good.processes == [inventory.GpuProcess(7, 1.0)]
    assert "lost" in lost.error and lost.uuid == "nvml-index-1" and lost.free_mb == 0
    assert to_snapshot(lost).free_mb == 0  # placement will never pick it


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_NVML, reason="NVML finds no GPU here")
def test_nvml_inventory_on_a_real_gpu():
    cards = read_gpus(Settings(gpus="ignored:1GiB"))
    assert cards and all(c.source == "nvml" for c in cards)
    for c in cards:
        assert c.error is None, c.error
        assert c.uuid.startswith(("GPU-", "MIG-"))
        assert 0 < c.free_mb <= c.total_mb and c.used_mb >= 0
        assert abs(c.free_mb + c.used_mb - c.total_mb) < 0.05 * c.total_mb
    assert len({c.uuid for c in cards}) == len(cards)
