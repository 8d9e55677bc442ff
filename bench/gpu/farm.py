"""A farm of the suite's own: a private ``redis-server`` on a free port, one real ``celery
worker`` for the card, jobs submitted as users submit them, waited for in the ledger.

    with Farm(ctx, "packing", policy="max_jobs_per_gpu: 3\\n") as farm:
        farm.start_worker(concurrency=3)
        ids = farm.submit([spec, ...], batch="packed")
        records = farm.wait(ids, timeout=300)

Nothing is installed on the fly: ``redis-server`` comes from PATH (``bench/gpu_suite.sh`` puts the
carried one there on the device machine), celery from this Python's packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from bench.gpu.common import DRY_CARD, REPO, Context

TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Farm:
    def __init__(self, ctx: Context, name: str, policy: str, extra_env: dict[str, str] | None = None):
        self.ctx, self.name = ctx, name
        self.root = ctx.work / f"farm-{name}-{uuid.uuid4().hex[:6]}"
        self.root.mkdir(parents=True)
        self.port = free_port()
        (self.root / "policy.yaml").write_text("headroom: 0.2\nstarvation_seconds: 3600\n" + policy)
        self.env = {"LORAFARM_REDIS_URL": f"redis://127.0.0.1:{self.port}/0",
                    "LORAFARM_KEY_PREFIX": f"suite-{name}",
                    "LORAFARM_POLICY": str(self.root / "policy.yaml"),
                    "LORAFARM_OUTPUT_ROOT": str(self.root / "output"),
                    "LORAFARM_STORAGE_DIR": str(self.root / "storage"),
                    "LORAFARM_HEARTBEAT_SECONDS": "1", **(extra_env or {})}
        if ctx.dry_run:
            self.env["LORAFARM_GPUS"] = DRY_CARD
        self.processes: list[subprocess.Popen] = []

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> "Farm":
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not on PATH (bench/gpu/prepare.sh carries one)")
        self._spawn([server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.root)], "redis.log")
        os.environ.update(self.env)  # this process submits and reads the ledger
        from lora_farm.settings import reload_settings

        reload_settings()
        self._wait_for_redis()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._kill_trainers()  # a job left running by a part that failed midway
        for process in reversed(self.processes):  # workers, then redis-server
            _stop(process)

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / log_name, "ab")
        process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def _wait_for_redis(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.ledger.client.ping()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")

    @property
    def ledger(self) -> Any:
        from lora_farm.ledger import Ledger
        from lora_farm.redis_conn import make_client

        return Ledger(make_client(), self.env["LORAFARM_KEY_PREFIX"])

    # -- workers and jobs --------------------------------------------------------------------
    def start_worker(self, concurrency: int, timeout: float = 120) -> None:
        card = self.ctx.card["uuid"]
        name = f"suite-{card}-{uuid.uuid4().hex[:4]}@{socket.gethostname()}"
        argv = [sys.executable, "-m", "celery", "-A", "lora_farm.workers.app", "worker", "-Q",
                f"gpu.{card}", "-c", str(concurrency), "-n", name, "-P", "prefork",
                "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
        env = {**os.environ, **self.env, "LORAFARM_WORKER_GPU": card,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        process = self._spawn(argv, f"worker-{len(self.processes)}.log", env)
        deadline = time.monotonic() + timeout
        while not self.ledger.client.hexists(self.ledger.keys.workers, name):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not come online: {self.worker_log()[-3000:]}")
            time.sleep(0.3)

    def submit(self, specs: list[dict[str, Any]], batch: str) -> list[str]:
        from lora_farm.submit import submit_files

        paths = []
        for spec in specs:
            path = self.root / f"{spec['name']}.yaml"
            path.write_text(yaml.safe_dump(spec), encoding="utf-8")
            paths.append(path)
        return [job.record.id for job in submit_files(paths, self.ledger, batch=batch).jobs]

    def wait(self, ids: list[str], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.ledger.records(ids)
            if all(r.state in TERMINAL for r in records):
                return records
            time.sleep(0.5)
        raise TimeoutError(f"jobs not done in {timeout:.0f}s: "
                           f"{[(r.name, r.state) for r in self.ledger.records(ids)]}")

    def worker_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("worker-*.log")))

    def _kill_trainers(self) -> None:
        try:
            records = self.ledger.list_jobs(with_spec=False)
        except Exception:  # noqa: BLE001 - Redis already gone
            return
        for record in records:
            if record.pid:
                _signal_group(record.pid, signal.SIGKILL)


def _stop(process: subprocess.Popen) -> None:
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def job_log(record: Any) -> str:
    path = Path(record.job_dir or "/nonexistent") / "train.log"
    return path.read_text(errors="replace") if path.exists() else ""
