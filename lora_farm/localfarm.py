"""A whole farm on one machine (`lorafarm up` / `lorafarm down`), with embedded defaults.

``farm_up`` uses the Redis at ``LORAFARM_REDIS_URL`` when one answers; otherwise, for a loopback
URL, it starts ``redis-server`` with append-only persistence under ``<output_root>/_farm/redis-<port>``.
It then starts one Celery worker per card (``read_gpus``: NVML, a declared inventory, or the CPU
slot) and, on request, Flower and the dashboard (`lorafarm web`). Every process runs in its own session, so it outlives the command
that started it.

A farm is known by its identity (Redis server and db, key prefix): several farms may share one
machine and one output root. ``<output_root>/_farm/farms/<id>/farm.json`` records the processes
of one farm, and ``farm_down`` stops exactly those (checked by pid *and* start time, so a reused
pid is never signalled), never another farm's. A Redis that another farm still uses is handed
over to that farm instead of being stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from lora_farm.errors import BrokerUnavailable, ConfigError
from lora_farm.process_group import signal_group, spawn_in_own_group, terminate_then_kill, wait_while
from lora_farm.redis_conn import redact_url
from lora_farm.settings import Settings, get_settings
from lora_farm.storage import write_atomically

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STOP_ORDER = ("web", "flower", "worker", "redis")  # Redis last: workers write their last state into it


@dataclass
class FarmProcess:
    role: str
    pid: int
    log: str
    started: float  # psutil create_time: tells this process from a later one with the same pid
    name: str = ""


@dataclass
class FarmState:
    """What ``farm_up`` found and did for one farm."""

    where: str  # describe_farm(): which farm this is, for messages
    processes: list[FarmProcess] = field(default_factory=list)  # started by this call
    running: list[FarmProcess] = field(default_factory=list)  # found up: nothing to start
    dead: list[FarmProcess] = field(default_factory=list)  # recorded, found dead: started again

    @property
    def started_anything(self) -> bool:
        return bool(self.processes)


@dataclass
class FarmDown:
    where: str
    stopped: list[FarmProcess]
    handed_over: list[tuple[FarmProcess, str]]  # a Redis left running for the farm that uses it


def farm_dir(settings: Settings) -> Path:
    return settings.output_root_abs / "_farm"


def _server_of(url: str) -> str:
    """scheme://host:port of a Redis URL, without credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def farm_identity(settings: Settings) -> str:
    """What tells one farm from another: its Redis server and db (no credentials), its prefix."""
    parts = urlsplit(settings.redis_url)
    db = parts.path.strip("/") or "0"
    query = f"?{parts.query}" if parts.query else ""
    return f"{_server_of(settings.redis_url)}/{db}{query} prefix {settings.key_prefix}"


def describe_farm(settings: Settings) -> str:
    return f"Redis {redact_url(settings.redis_url)}, key prefix {settings.key_prefix}"


def farm_home(settings: Settings) -> Path:
    """This farm's folder: its state file and the logs of the processes it started."""
    key = hashlib.sha256(farm_identity(settings).encode()).hexdigest()[:12]
    return farm_dir(settings) / "farms" / key


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
        process = spawn_in_own_group(argv, stdout=stream, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
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
    data = farm_dir(settings) / f"redis-{url.port or 6379}"  # one Redis per port, one folder each
    data.mkdir(parents=True, exist_ok=True)
    # Config through stdin (`redis-server -`), so a password never shows in `ps`.
    config = [f"port {url.port or 6379}", "bind 127.0.0.1", f'dir "{data}"', "appendonly yes",
              "appendfsync everysec", "daemonize no"]
    if url.password:
        config.append(f'requirepass "{url.password}"')
    process = _spawn("redis", [server, "-"], data / "redis.log",
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
        log = farm_home(settings) / "logs" / f"worker-{card.uuid}.log"
        name = argv[argv.index("-n") + 1]
        env = {**os.environ, GPU_ENV: card.uuid}
        started.append(_spawn("worker", argv, log, name, env=env))
    return started


def _extras(settings: Settings, have: list[FarmProcess], ports: dict[str, int]) -> list[FarmProcess]:
    """Flower and the dashboard (role -> port) not running yet, as `lorafarm flower|web --port N`
    on 127.0.0.1 (LORAFARM_WEB_TOKEN, when set, reaches the dashboard through the env)."""
    roles = {p.role for p in have}
    return [_spawn(role, [sys.executable, "-m", "lora_farm", role, "--port", str(port)],
                   farm_home(settings) / "logs" / f"{role}.log", f"127.0.0.1:{port}")
            for role, port in ports.items() if role not in roles]


def wait_workers_online(settings: Settings, workers: list[FarmProcess], timeout: float) -> None:
    """Until every worker has published its heartbeat into the ledger (it takes jobs from then)."""
    from lora_farm.ledger import Ledger

    ledger = Ledger.from_settings(settings)

    def online(worker: FarmProcess) -> bool:
        # by pid: a worker of the same name that died leaves its last heartbeat behind
        raw = ledger.client.hget(ledger.keys.workers, worker.name)
        return raw is not None and json.loads(raw).get("pid") == worker.pid

    for worker in workers:
        _wait(lambda: online(worker) or not _alive(worker), timeout,
              f"worker {worker.name} to come online ({worker.log})")
        if not _alive(worker):
            raise ConfigError(f"worker {worker.name} exited at start; read {worker.log}")


def farm_up(settings: Settings | None = None, *, with_flower: bool = False, flower_port: int = 5555,
            with_web: bool = False, web_port: int = 8750, timeout: float = 120) -> FarmState:
    """Start this farm unless it is up. A farm whose recorded processes died is cleaned up (the
    survivors stopped, a Redis that still answers kept) and started again."""
    settings = settings or get_settings()
    state = FarmState(describe_farm(settings))
    extras = {"flower": flower_port} if with_flower else {}
    if with_web:
        extras["web"] = web_port
    recorded = load_processes(settings)
    if recorded and all(_alive(p) for p in recorded):
        state.running = recorded
        state.processes = _extras(settings, recorded, extras)
        if state.processes:
            save_processes(settings, recorded + state.processes)
        return state
    state.dead = [p for p in recorded if not _alive(p)]
    kept = [p for p in recorded if p.role == "redis" and _alive(p)]  # it holds the data
    stop_processes([p for p in recorded if p.role != "redis"], settings.cancel_grace_seconds + 30)
    try:
        if not redis_answers(settings.redis_url):
            state.processes.append(start_redis(settings))
        workers = start_workers(settings)
        state.processes += workers
        state.processes += _extras(settings, [], extras)
        save_processes(settings, kept + state.processes)
        wait_workers_online(settings, workers, timeout)
    except BaseException:
        stop_processes(state.processes, grace=10)  # never leave half a farm behind
        save_processes(settings, kept)
        raise
    return state


def farm_down(settings: Settings | None = None, grace: float | None = None) -> FarmDown:
    """Stop the processes `farm_up` started for this farm (workers get time to checkpoint a
    running job); a Redis another live farm uses goes into that farm's record instead."""
    settings = settings or get_settings()
    alive = [p for p in load_processes(settings) if _alive(p)]
    handed_over = _hand_over_redis(settings, [p for p in alive if p.role == "redis"])
    stopped = [p for p in alive if p not in [process for process, _ in handed_over]]
    stop_processes(stopped, grace if grace is not None else settings.cancel_grace_seconds + 30)
    if state_file(settings).exists():  # a farm never started leaves no trace
        save_processes(settings, [])
    return FarmDown(describe_farm(settings), stopped, handed_over)


def _hand_over_redis(settings: Settings, servers: list[FarmProcess]) -> list[tuple[FarmProcess, str]]:
    heir = _other_live_farm_on(settings, _server_of(settings.redis_url)) if servers else None
    if heir is None:
        return []
    path, data = heir
    data["processes"] += [asdict(process) for process in servers]
    _write_json(path, data)
    return [(process, data["identity"]) for process in servers]


def _other_live_farm_on(settings: Settings, server: str) -> tuple[Path, dict] | None:
    for path in sorted((farm_dir(settings) / "farms").glob("*/farm.json")):
        data = json.loads(path.read_text())
        if (path != state_file(settings) and data.get("server") == server
                and any(_alive(FarmProcess(**item)) for item in data["processes"])):
            return path, data
    return None


def process_count(processes: list[FarmProcess]) -> int:
    """These processes and all their children (a worker's pool, its trainers)."""
    count = 0
    for process in [p for p in processes if _alive(p)]:
        try:
            count += 1 + len(psutil.Process(process.pid).children(recursive=True))
        except psutil.Error:
            pass
    return count


def stop_processes(processes: list[FarmProcess], grace: float) -> None:
    """Role by role, each process with its whole group: a worker's pool children and its
    trainers go with it."""
    for role in STOP_ORDER:
        terminate_then_kill([p for p in processes if p.role == role], grace, alive=_alive,
                            send=lambda process, sig: signal_group(process.pid, sig))


def _alive(process: FarmProcess) -> bool:
    try:
        found = psutil.Process(process.pid)
        return (abs(found.create_time() - process.started) < 0.01
                and found.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _wait(condition, timeout: float, what: str) -> None:
    wait_while(lambda: not condition(), timeout)
    if not condition():
        raise ConfigError(f"timed out after {timeout:.0f}s waiting for {what}")


def state_file(settings: Settings) -> Path:
    return farm_home(settings) / "farm.json"


def load_processes(settings: Settings) -> list[FarmProcess]:
    path = state_file(settings)
    if not path.is_file():
        return []
    return [FarmProcess(**item) for item in json.loads(path.read_text())["processes"]]


def save_processes(settings: Settings, processes: list[FarmProcess]) -> None:
    _write_json(state_file(settings), {"identity": farm_identity(settings),
                                       "server": _server_of(settings.redis_url),
                                       "processes": [asdict(p) for p in processes]})


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))
