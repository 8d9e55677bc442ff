"""The guards of a shared card, on the CPU with declared cards (LORAFARM_GPUS=gpu0:24GiB,...).

- the per-job memory cap: computed from the reservation and the card, passed to the trainer
  (``vram_cap`` in its start event; ``torch.cuda.set_per_process_memory_fraction`` is CUDA-only,
  so on the CPU ``applied`` is False);
- telemetry in the ledger and the data-bound warning (a loader that sleeps, through the
  trainer's fault hooks, ``trainers/telemetry.py``) in the job log and in ``lorafarm status``;
- the throughput watchdog: a job slowed on gpu0 only is flagged, checkpointed, requeued to gpu1,
  and gpu0 is marked suspect.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_farm.scheduler.guards import Watchdog, data_bound, memory_cap
from lora_farm.scheduler.place import GpuSnapshot, QueuedJob, place
from lora_farm.scheduler.policy import Policy
from lora_farm.submit import submit_files
from lora_farm.trainers.telemetry import Faults, StepClock, loader_wait
from tests.fixtures_farm import all_done, job_events, start_events, wait_until, write_spec

CARD_MB = 24 * 1024


# ---- pure decisions -------------------------------------------------------------------------

def test_memory_cap_is_the_reservations_share_of_the_card():
    cap = memory_cap(6144, CARD_MB, Policy())
    assert (cap.fraction, cap.cap_mb) == (0.25, 6144.0)
    assert memory_cap(6144, CARD_MB, Policy(memory_cap_factor=1.5)).cap_mb == 9216.0
    assert memory_cap(30_000, CARD_MB, Policy()).fraction == 1.0  # never above the card
    assert memory_cap(6144, CARD_MB, Policy(memory_cap_factor=0)) is None  # switched off
    assert memory_cap(6144, 0, Policy()) is None  # the cpu slot: no card to cap


def test_data_bound_needs_a_waiting_step_and_an_idle_card():
    policy = Policy(data_bound_wait_fraction=0.5, data_bound_util_pct=50)
    assert data_bound(0.2, 10, policy) is None  # the loader keeps up
    assert data_bound(0.8, 90, policy) is None  # the card is busy anyway (a co-tenant)
    warning = data_bound(0.8, 20, policy)
    assert "80% of step time waiting" in warning and "num_workers" in warning
    assert "cache_latents" in warning
    assert "utilisation unknown" in data_bound(0.8, None, policy)  # a declared card


def test_watchdog_flags_then_requeues_a_lasting_slowdown_against_its_own_median():
    dog = Watchdog(Policy(watchdog_fraction=0.5, watchdog_warmup_reports=3,
                          watchdog_flag_seconds=10, watchdog_requeue_seconds=30))
    for t, it_s in enumerate([4.0, 4.2, 3.9, 4.1]):
        assert not dog.observe(it_s, now=float(t)).flagged
    assert dog.observe(2.5, now=4).slow_for_s == 0  # above half the median: not slow
    assert dog.observe(1.0, now=5).slow_for_s == 0  # slow from here on
    state = dog.observe(1.0, now=16)
    assert state.flagged and not state.requeue and "under 50%" in state.reason
    assert dog.observe(0.9, now=36).requeue  # the slow reports never lowered its median
    assert dog.observe(4.0, now=37).slow_for_s == 0  # recovered: the clock restarts


def test_watchdog_ignores_a_slow_start_before_its_warmup():
    dog = Watchdog(Policy(watchdog_warmup_reports=3, watchdog_flag_seconds=0))
    assert not any(dog.observe(it_s, now=t).flagged for t, it_s in enumerate([9.0, 0.1, 0.1]))


def test_a_suspect_card_is_placed_last_and_never_given_back_to_the_job_that_left_it():
    cards = [GpuSnapshot("gpu0", "h", CARD_MB, CARD_MB, suspect=True),
             GpuSnapshot("gpu1", "h", CARD_MB, CARD_MB)]
    other = QueuedJob("other", 0, 1.0, 1000)
    left = QueuedJob("left", 0, 2.0, 1000, avoid=("gpu0",))
    placed = {p.job_id: p.gpu_uuids for p in place([other], cards, [], Policy(), now=10)}
    assert placed == {"other": ["gpu1"]}  # the idle healthy card first
    only_suspect = cards[:1]
    assert place([left], only_suspect, [], Policy(), now=10) == []  # waits for the mark to lapse
    assert [p.gpu_uuids for p in place([other], only_suspect, [], Policy(), now=10)] == [["gpu0"]]
    healed = [GpuSnapshot("gpu0", "h", CARD_MB, CARD_MB)]
    assert [p.gpu_uuids for p in place([left], healed, [], Policy(), now=10)] == [["gpu0"]]


def test_step_clock_counts_the_loader_wait_and_the_window_rate():
    clock = StepClock(Faults(loader_sleep_s=0.05))
    clock.window_fields()
    for step in (1, 2):
        with clock.fetching() as micro:
            micro.append({"keys": [1]})
        with loader_wait():  # the image DataLoader's next(): sleeps (the fault), counted
            pass
        clock.step_done(step)
    fields = clock.window_fields()
    assert fields["data_wait_frac"] > 0.8 and fields["step_it_s"] > 0


def test_fault_hooks_slow_only_the_named_card():
    env = {"LORAFARM_FAULT_SLOW_STEP_S": "2", "LORAFARM_FAULT_SLOW_CARD": "gpu0"}
    assert Faults.from_env({**env, "CUDA_VISIBLE_DEVICES": "gpu0"}).slow_step_s == 2.0
    assert Faults.from_env({**env, "CUDA_VISIBLE_DEVICES": "gpu1"}).slow_step_s == 0.0


# ---- through the real farm ------------------------------------------------------------------

def _status_of(farm_env: dict, job_id: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lora_farm", "status", job_id], env=farm_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


STARVED_POLICY = "headroom: 0.2\nmax_jobs_per_gpu: 2\ndata_bound_wait_fraction: 0.4\n"


@pytest.mark.slow
def test_starved_loader_job_is_capped_and_warned_data_bound(farm_env, ledger, celery_workers,
                                                            tiny_sd, image_dataset, tmp_path):
    Path(farm_env["LORAFARM_POLICY"]).write_text(STARVED_POLICY)
    farm_env["LORAFARM_FAULT_LOADER_SLEEP_S"] = "4"  # the worker's trainers: a loader that sleeps
    celery_workers.start("gpu0")
    spec = write_spec(tmp_path, "starved", tiny_sd, image_dataset, "image", max_steps=3,
                      save_steps=100, vram_gb=6)
    job_id = submit_files([spec], ledger, batch="guards").jobs[0].record.id
    record = wait_until(lambda: all_done(ledger, [job_id]), 300, "the starved job", celery_workers)[0]
    assert record.state == "succeeded", record.exit_reason
    start = start_events(record)[-1]
    assert start["vram_cap"] == {"fraction": 0.25, "cap_mb": 6144.0, "applied": False}
    assert record.data_wait_pct >= 40 and record.it_s > 0
    assert record.util_source == "none" and record.co_tenants == []  # a declared card: no NVML
    progress = job_events(record, "progress")
    assert all("data_wait_frac" in event and "step_it_s" in event for event in progress)
    assert record.warning.startswith("data-bound:") and "num_workers" in record.warning
    log = (Path(record.job_dir) / "train.log").read_text()
    assert log.count("lorafarm: warning: data-bound") == 1  # once per attempt, not per report
    shown = _status_of(farm_env, job_id)
    assert "data-bound" in shown and "num_workers" in shown


WATCHDOG_POLICY = ("headroom: 0.2\nmax_jobs_per_gpu: 2\nstarvation_seconds: 3600\n"
                   "watchdog_fraction: 0.3\nwatchdog_warmup_reports: 2\n"
                   "watchdog_flag_seconds: 1\nwatchdog_requeue_seconds: 3\n"
                   "suspect_card_seconds: 600\n")


@pytest.mark.slow
def test_watchdog_requeues_a_slowed_job_away_from_its_card(farm_env, ledger, celery_workers,
                                                           tiny_sd, image_dataset, tmp_path):
    Path(farm_env["LORAFARM_POLICY"]).write_text(WATCHDOG_POLICY)
    # gpu0 "throttles" after step 5: 12 s more per step, far past the noise of a shared CPU
    # (tiny steps of 0.05-5 s seen here under load), so only the fault trips the watchdog
    farm_env.update({"LORAFARM_FAULT_SLOW_CARD": "gpu0", "LORAFARM_FAULT_SLOW_AFTER_STEP": "5",
                     "LORAFARM_FAULT_SLOW_STEP_S": "12",
                     "LORAFARM_CANCEL_GRACE_SECONDS": "30"})  # a slow step ends before the SIGKILL
    celery_workers.start_all(["gpu0", "gpu1"])
    spec = write_spec(tmp_path, "throttled", tiny_sd, image_dataset, "image", max_steps=10,
                      save_steps=1000, vram_gb=6)
    job_id = submit_files([spec], ledger, batch="guards").jobs[0].record.id
    record = wait_until(lambda: all_done(ledger, [job_id]), 300, "the throttled job", celery_workers)[0]
    assert record.state == "succeeded", record.exit_reason
    first, second = start_events(record)
    assert (first["cuda_visible_devices"], second["cuda_visible_devices"]) == ("gpu0", "gpu1")
    assert 5 < second["attempt_resume_step"] < 10  # checkpointed when stopped, resumed there
    assert record.attempt == 2 and record.avoid_gpus == ["gpu0"]
    reasons = [entry.get("reason", "") for entry in ledger.timeline(job_id)]
    assert any("throughput watchdog" in r and "requeued away" in r for r in reasons), reasons
    card = ledger.client.hgetall(ledger.keys.gpu("gpu0"))
    assert float(card["suspect_until"]) > time.time() and "throughput watchdog" in card["suspect_reason"]
    log = (Path(record.job_dir) / "train.log").read_text()
    assert "lorafarm: warning: throughput watchdog" in log


def test_cap_env_gives_the_trainer_its_share_and_the_mps_limit(ledger):
    from lora_farm.ledger.record import JobRecord
    from lora_farm.workers.monitor import cap_env

    ledger.client.hset(ledger.keys.gpu("gpu0"), mapping={"total_mb": str(CARD_MB), "source": "declared"})
    record = JobRecord(id="j", name="j", batch="b", task="image", config_hash="h",
                       gpus=["gpu0"], estimate_mb=6144)
    assert cap_env(ledger, record, Policy(), environ={}) == {
        "LORAFARM_VRAM_CAP_FRACTION": "0.25", "LORAFARM_VRAM_CAP_MB": "6144.0",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=6144MB"}
    operators = cap_env(ledger, record, Policy(), environ={"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=8G"})
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in operators  # theirs is passed through
    assert cap_env(ledger, record, Policy(memory_cap_factor=0), environ={}) == {}


def test_monitor_records_card_utilisation_with_its_co_tenants_named(ledger, tmp_path):
    """A card whose driver reports no per-process figures (NVML is absent here: the sampler
    stands in for it) -> the card's SM-busy, with the other jobs reserved on it named."""
    from lora_farm.ledger.record import JobRecord
    from lora_farm.scheduler.gpus import UtilSample
    from lora_farm.workers.monitor import JobMonitor

    ledger.client.hset(ledger.keys.reservations, mapping={
        "me": '{"gpus": ["gpu0"], "mb": 4096}', "neighbour": '{"gpus": ["gpu0"], "mb": 4096}',
        "elsewhere": '{"gpus": ["gpu1"], "mb": 4096}'})
    record = JobRecord(id="me", name="me", batch="b", task="image", config_hash="h", gpus=["gpu0"])
    ledger.client.hset(ledger.keys.job("me"), mapping={"id": "me"})
    readings = iter([UtilSample(80.0, "card"), UtilSample(40.0, "card")])
    now = iter([0.0, 5.0])
    monitor = JobMonitor(ledger, record, Policy(), tmp_path / "train.log",
                         sampler=lambda uuid, pids: next(readings), clock=lambda: next(now))
    monitor.sample(pid=None)
    monitor.sample(pid=None)
    saved = ledger.client.hgetall(ledger.keys.job("me"))
    assert saved["co_tenants"] == '["neighbour"]' and saved["util_source"] == "card"
    assert (float(saved["gpu_util"]), float(saved["sm_busy_mean"])) == (40.0, 60.0)


def test_per_process_utilisation_sums_the_jobs_own_processes():
    """``gpus._process_utilisation`` over NVML's samples (a stand-in: no driver here)."""
    from types import SimpleNamespace

    from lora_farm.scheduler.gpus import _process_utilisation

    def sample(pid, sm, ts):
        return SimpleNamespace(pid=pid, smUtil=sm, timeStamp=ts)

    samples = [sample(10, 30, 1), sample(10, 50, 2), sample(11, 20, 2), sample(99, 90, 2)]
    nvml = SimpleNamespace(NVMLError=RuntimeError,
                           nvmlDeviceGetProcessUtilization=lambda handle, since: samples)
    assert _process_utilisation(nvml, None, {10, 11}, 5.0) == 70.0  # latest of each, summed
    assert _process_utilisation(nvml, None, {12}, 5.0) is None  # not reported: the card's figure


def test_lorafarm_gpus_shows_a_suspect_card():
    from rich.console import Console

    from lora_farm.cli.status_view import gpus_table

    now = 1000.0
    cards = [{"uuid": "gpu0", "host": "h", "total_mb": CARD_MB, "free_mb": CARD_MB, "heartbeat": now,
              "suspect_until": now + 600}, {"uuid": "gpu1", "host": "h", "total_mb": CARD_MB,
                                            "free_mb": CARD_MB, "heartbeat": now}]
    console = Console(record=True, width=160)
    console.print(gpus_table(cards, {}, {}, stale_after=10, now=now))
    lines = console.export_text().splitlines()
    assert "suspect 10m" in next(line for line in lines if "gpu0" in line)
    assert "suspect" not in next(line for line in lines if "gpu1" in line)


_CAPPED_CHILD = """
import torch
from lora_farm.trainers.device import apply_memory_cap, is_out_of_memory
device = torch.device("cuda", 0)
cap = apply_memory_cap(device, {"LORAFARM_VRAM_CAP_FRACTION": "0.05", "LORAFARM_VRAM_CAP_MB": "0"})
assert cap["applied"], cap
total = torch.cuda.get_device_properties(device).total_memory
small = torch.empty(int(total * 0.02), dtype=torch.uint8, device=device)  # under the cap: fine
try:
    torch.empty(int(total * 0.10), dtype=torch.uint8, device=device)
except Exception as error:
    print("capped" if is_out_of_memory(error) else f"other: {error!r}")
else:
    print("not capped")
"""


@pytest.mark.gpu
def test_the_cap_runs_an_allocation_above_it_out_of_memory_on_a_real_card():
    """On a CUDA card: 10% of the card under a 5% cap is a CUDA OOM (its own process: the
    fraction is process-wide)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    done = subprocess.run([sys.executable, "-c", _CAPPED_CHILD], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip().splitlines()[-1] == "capped", done.stdout + done.stderr
