"""Fixtures: an isolated farm on the real Redis, and real `celery worker` processes.

- ``farm_prefix``: a unique ``LORAFARM_KEY_PREFIX`` (``lorafarm-test-<uuid>``) set in this
  process's settings; every key under it (ledger and Celery queues) is deleted afterwards.
- ``ledger``: a :class:`Ledger` on that prefix.
- ``farm_env``: the environment for worker / CLI subprocesses (prefix, declared 2-card
  inventory, a small policy, fast heartbeats, the output root).
- ``celery_workers``: ``start(gpu_uuid)`` launches ``celery -A lora_farm.workers.app worker -Q
  gpu.<uuid>`` and waits until it has published its heartbeat (``start_all([...])``: several
  cards' workers launched together); every worker (and any trainer group a job left) is
  stopped at teardown.

Helpers for the farm tests: ``write_spec``, ``wait_until``, ``all_done``, ``start_events``,
``checkpoint_events``, ``job_events``, ``pause_trainer`` / ``resume_trainer`` (SIGSTOP /
SIGCONT of a trainer's process group: the test decides when a training goes on, so what it
checks happens mid-run on a fast machine and a slow one alike).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lora_farm.jobs.state import TERMINAL, JobState
from lora_farm.ledger import Ledger
from lora_farm.protocol import read_events
from lora_farm.redis_conn import make_client
from lora_farm.settings import reload_settings

REPO = Path(__file__).resolve().parents[1]
CELERY = str(Path(sys.executable).with_name("celery"))
TWO_CARDS = "gpu0:24GiB,gpu1:24GiB"


@pytest.fixture
def farm_prefix(monkeypatch) -> Iterator[str]:
    prefix = f"lorafarm-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("LORAFARM_KEY_PREFIX", prefix)
    reload_settings()
    yield prefix
    client = make_client()
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    monkeypatch.delenv("LORAFARM_KEY_PREFIX")
    reload_settings()


@pytest.fixture
def ledger(farm_prefix) -> Ledger:
    return Ledger(make_client(), farm_prefix)


@pytest.fixture
def farm_env(farm_prefix, tmp_path, monkeypatch) -> dict[str, str]:
    """Settings shared by this test and its subprocesses (also applied to this process)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("headroom: 0.2\nmax_jobs_per_gpu: 2\nstarvation_seconds: 3600\n")
    values = {
        "LORAFARM_KEY_PREFIX": farm_prefix,
        "LORAFARM_GPUS": TWO_CARDS,
        "LORAFARM_POLICY": str(policy),
        "LORAFARM_OUTPUT_ROOT": str(tmp_path / "output"),
        "LORAFARM_HEARTBEAT_SECONDS": "1",
        "LORAFARM_STALE_AFTER_SECONDS": "8",
        "LORAFARM_CANCEL_GRACE_SECONDS": "5",
        "LORAFARM_STORAGE_DIR": str(tmp_path / "storage"),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    reload_settings()
    yield {**os.environ, **values, "PYTHONPATH": str(REPO)}
    reload_settings()


class WorkerPool:
    """Real Celery workers for one test; always stopped."""

    def __init__(self, env: dict[str, str], ledger: Ledger, log_dir: Path):
        self.env, self.ledger, self.log_dir = env, ledger, log_dir
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, gpu: str, concurrency: int = 2, timeout: float = 90) -> subprocess.Popen:
        return self.start_all([gpu], concurrency, timeout)[0]

    def start_all(self, gpus: list[str], concurrency: int = 2,
                  timeout: float = 90) -> list[subprocess.Popen]:
        """One worker per card, launched together (their seconds of imports overlap), each
        waited for until it has published its heartbeat."""
        launched = [self._launch(gpu, concurrency) for gpu in gpus]
        for name, process in launched:
            self._wait_online(name, process, timeout)
        return [process for _, process in launched]

    def _launch(self, gpu: str, concurrency: int) -> tuple[str, subprocess.Popen]:
        name = f"gpu-{gpu}-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
        argv = [CELERY, "-A", "lora_farm.workers.app", "worker", "-Q", f"gpu.{gpu}",
                "-c", str(concurrency), "-n", name, "-P", "prefork", "-E", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
        log = open(self.log_dir / f"worker-{gpu}.log", "ab")
        process = subprocess.Popen(argv, env={**self.env, "LORAFARM_WORKER_GPU": gpu}, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return name, process

    def _wait_online(self, name: str, process: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker {name} exited {process.returncode}: {self.logs()}")
            if self.ledger.client.hexists(self.ledger.keys.workers, name):
                return
            time.sleep(0.3)
        raise TimeoutError(f"worker {name} did not come online in {timeout}s: {self.logs()}")

    def worker_record(self, name: str) -> dict:
        return json.loads(self.ledger.client.hget(self.ledger.keys.workers, name))

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-4000:]
                         for path in sorted(self.log_dir.glob("worker-*.log")))

    def kill(self, process: subprocess.Popen) -> None:
        """SIGKILL a worker and its pool children (not the trainers: they have their own session)."""
        _signal_group(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        self.processes = {n: p for n, p in self.processes.items() if p is not process}

    def shut_down(self, process: subprocess.Popen, whole_group: bool, timeout: float) -> int:
        """SIGTERM a worker as `docker compose stop` / systemd (the main process) or `lorafarm
        down` (its process group) does; returns its exit code (``TimeoutExpired`` if it hangs)."""
        if whole_group:
            _signal_group(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=timeout)
        self.processes = {n: p for n, p in self.processes.items() if p is not process}
        return code

    def stop_all(self) -> None:
        for process in self.processes.values():
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.processes.clear()
        kill_job_trainers(self.ledger)


def kill_job_trainers(ledger: Ledger) -> None:
    """Kill the trainer group of every job of this prefix (a test that failed midway)."""
    for record in ledger.list_jobs():
        if record.pid:
            _signal_group(record.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def celery_workers(farm_env, ledger, tmp_path) -> Iterator[WorkerPool]:
    log_dir = tmp_path / "worker-logs"
    log_dir.mkdir()
    pool = WorkerPool(farm_env, ledger, log_dir)
    try:
        yield pool
    finally:
        pool.stop_all()


# ---- helpers of the farm tests (test_farm_e2e.py, test_cli_farm.py) -------------------------

def write_spec(folder: Path, name: str, model: Path, data: Path, task: str, **extra) -> Path:
    spec = {"name": name, "task": task, "base_model": str(model), "train_data_dir": str(data),
            "max_steps": 2, "save_steps": 1, "num_workers": 0, "batch_size": 1, **extra}
    if task == "image":
        spec["resolution"] = 64
    elif task == "video":
        spec |= {"num_frames": 9, "buckets": ["64x48"]}
    else:
        spec["max_seq_len"] = 32
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_until(condition, timeout: float, what: str, pool=None, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{pool.logs()}" if pool else ""))


def all_done(ledger, ids):
    records = ledger.records(ids)
    return records if all(JobState(r.state) in TERMINAL for r in records) else None


def start_events(record):
    return [e for e in read_events(Path(record.job_dir) / "events.jsonl") if e["event"] == "start"]


def job_events(record, kind: str | None = None) -> list[dict]:
    """The events the job's trainers wrote so far (``kind``: only those)."""
    if not record.job_dir or not (Path(record.job_dir) / "events.jsonl").exists():
        return []
    events = read_events(Path(record.job_dir) / "events.jsonl")
    return [e for e in events if kind is None or e["event"] == kind]


def checkpoint_events(record):
    return job_events(record, "checkpoint")


def pause_trainer(pgid: int) -> None:
    """SIGSTOP the trainer's group: it trains no further until resumed (or killed)."""
    os.killpg(pgid, signal.SIGSTOP)


def resume_trainer(pgid: int) -> None:
    _signal_group(pgid, signal.SIGCONT)
