"""A whole farm on one machine (`lorafarm up` / `lorafarm down`), with embedded defaults.

``farm_up`` uses the Redis at ``LORAFARM_REDIS_URL`` when one answers; otherwise, for a loopback
URL, it starts ``redis-server`` with append-only persistence under ``<output_root>/_farm/redis``.
It then starts one Celery worker per card (``read_gpus``: NVML, a declared inventory, or the CPU
slot) and, on request, Flower. Every process runs in its own session, so it outlives the command
that started it; ``<output_root>/_farm/farm.json`` records them, and ``farm_down`` stops exactly
those (checked by pid *and* start time, so a reused pid is never signalled).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from lora_farm.errors import BrokerUnavailable, ConfigError
from lora_farm.redis_conn import redact_url
from lora_farm.settings import Settings, get_settings

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STOP_ORDER = ("flower", "worker", "redis")  # Redis last: workers write their last state into it


@dataclass
class FarmProcess:
    role: str
    pid: int
    log: str
    started: float  # psutil create_time: tells this process from a later one with the same pid
    name: str = ""


@dataclass
class FarmState:
    redis_display: str
    processes: list[FarmProcess] = field(default_factory=list)

    @property
    def started_anything(self) -> bool:
        return bool(self.processes)


def farm_dir(settings: Settings) -> Path:
    return settings.output_root_abs / "_farm"


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except (redis.RedisError, OSError):
        return False


def find_redis_server() -> str | None:
    """The system redis-server, else one installed into this environment (pip ``redis-server``)."""
    here = Path(sys.executable).parent / "redis-server"
    return shutil.which("redis-server") or (str(here) if here.exists() else None)


def _spawn(role: str, argv: list[str], log: Path, name: str = "", stdin: str | None = None,
           env: dict[str, str] | None = None) -> FarmProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as stream:
        process = subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT,
                                   stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                   start_new_session=True, env=env)
    if stdin is not None:
        process.stdin.write(stdin.encode())
        process.stdin.close()
    return FarmProcess(role, process.pid, str(log), psutil.Process(process.pid).create_time(), name)


def start_redis(settings: Settings) -> FarmProcess:
    url = urlsplit(settings.redis_url)
    if url.hostname not in LOOPBACK:
        raise BrokerUnavailable(f"Redis does not answer at {redact_url(settings.redis_url)}, and "
                                "that is not this machine, so `lorafarm up` cannot start it. Fix: "
                                "start that Redis, or unset LORAFARM_REDIS_URL for a local one.")
    server = find_redis_server()
    if server is None:
        raise BrokerUnavailable("no Redis answers and no redis-server is installed. Fix: "
                                "`apt-get install redis-server` (or `pip install redis-server`), "
                                "or point LORAFARM_REDIS_URL at a running Redis.")
    data = farm_dir(settings) / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # Config through stdin (`redis-server -`), so a password never shows in `ps`.
    config = [f"port {url.port or 6379}", "bind 127.0.0.1", f'dir "{data}"', "appendonly yes",
              "appendfsync everysec", "daemonize no"]
    if url.password:
        config.append(f'requirepass "{url.password}"')
    process = _spawn("redis", [server, "-"], farm_dir(settings) / "logs" / "redis.log",
                     stdin="\n".join(config) + "\n")
    _wait(lambda: redis_answers(settings.redis_url), 30, f"Redis to answer ({process.log})")
    return process


def start_workers(settings: Settings) -> list[FarmProcess]:
    """One Celery worker per card, started as `lorafarm worker` starts them (same names, queues)."""
    from lora_farm.scheduler.gpus import read_gpus
    from lora_farm.workers.launch import worker_argv
    from lora_farm.workers.presence import GPU_ENV

    started = []
    for card in read_gpus(settings):
        argv = worker_argv(card, "prefork", "INFO")
        log = farm_dir(settings) / "logs" / f"worker-{card.uuid}.log"
        name = argv[argv.index("-n") + 1]
        env = {**os.environ, GPU_ENV: card.uuid}
        started.append(_spawn("worker", argv, log, name, env=env))
    return started


def start_flower(settings: Settings, port: int) -> FarmProcess:
    argv = [sys.executable, "-m", "lora_farm", "flower", "--port", str(port)]
    return _spawn("flower", argv, farm_dir(settings) / "logs" / "flower.log", f"127.0.0.1:{port}")


def wait_workers_online(settings: Settings, workers: list[FarmProcess], timeout: float) -> None:
    """Until every worker has published its heartbeat into the ledger (it takes jobs from then)."""
    from lora_farm.ledger import Ledger

    ledger = Ledger.from_settings(settings)
    for worker in workers:
        _wait(lambda: ledger.client.hexists(ledger.keys.workers, worker.name) or not _alive(worker),
              timeout, f"worker {worker.name} to come online ({worker.log})")
        if not _alive(worker):
            raise ConfigError(f"worker {worker.name} exited at start; read {worker.log}")


def farm_up(settings: Settings | None = None, *, with_flower: bool = False, flower_port: int = 5555,
            timeout: float = 120) -> FarmState:
    """Start what is missing; returns what this call started (nothing when the farm was up)."""
    settings = settings or get_settings()
    state = FarmState(redact_url(settings.redis_url))
    if [p for p in load_processes(settings) if _alive(p)]:
        return state
    try:
        if not redis_answers(settings.redis_url):
            state.processes.append(start_redis(settings))
        workers = start_workers(settings)
        state.processes += workers
        if with_flower:
            state.processes.append(start_flower(settings, flower_port))
        save_processes(settings, state.processes)
        wait_workers_online(settings, workers, timeout)
    except BaseException:
        stop_processes(state.processes, grace=10)  # never leave half a farm behind
        save_processes(settings, [])
        raise
    return state


def farm_down(settings: Settings | None = None, grace: float | None = None) -> list[FarmProcess]:
    """Stop the processes `farm_up` started (workers get time to checkpoint a running job)."""
    settings = settings or get_settings()
    processes = [p for p in load_processes(settings) if _alive(p)]
    stop_processes(processes, grace if grace is not None else settings.cancel_grace_seconds + 30)
    save_processes(settings, [])
    return processes


def stop_processes(processes: list[FarmProcess], grace: float) -> None:
    for role in STOP_ORDER:
        group = [p for p in processes if p.role == role and _alive(p)]
        for process in group:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_alive(p) for p in group) and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in group:
            if _alive(process):
                _signal(process, signal.SIGKILL)


def _alive(process: FarmProcess) -> bool:
    try:
        found = psutil.Process(process.pid)
        return (abs(found.create_time() - process.started) < 0.01
                and found.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _signal(process: FarmProcess, sig: signal.Signals) -> None:
    # the whole group: a worker's pool children and its trainers go with it
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ConfigError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def state_file(settings: Settings) -> Path:
    return farm_dir(settings) / "farm.json"


def load_processes(settings: Settings) -> list[FarmProcess]:
    path = state_file(settings)
    if not path.is_file():
        return []
    return [FarmProcess(**item) for item in json.loads(path.read_text())["processes"]]


def save_processes(settings: Settings, processes: list[FarmProcess]) -> None:
    path = state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"processes": [asdict(p) for p in processes]}, indent=2))
