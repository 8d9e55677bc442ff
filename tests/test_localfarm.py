"""`lorafarm up` / `down` / `demo`: real redis-server, real Celery workers, real Flower, then all
stopped. A farm is (Redis URL, key prefix): several on one machine never touch each other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import psutil
import pytest
import redis

from lora_farm.cli.ship import _leave_farm
from lora_farm.localfarm import farm_down, farm_up, load_processes, state_file
from lora_farm.redis_conn import redact_url
from lora_farm.settings import reload_settings
from tests.fixtures_s3 import free_port

pytestmark = pytest.mark.slow
PASSWORD = "local-farm-test-pw"


@pytest.fixture
def farm_settings(monkeypatch, tmp_path):
    """``apply(url, prefix=None)`` points this process (and the farm it starts) at one farm;
    every farm a test touched is brought down at teardown."""
    touched = []

    def apply(redis_url: str, prefix: str | None = None):
        for name, value in {"LORAFARM_REDIS_URL": redis_url, "LORAFARM_GPUS": "gpu0:8GiB",
                            "LORAFARM_OUTPUT_ROOT": str(tmp_path / "output"),
                            "LORAFARM_KEY_PREFIX": prefix or f"lorafarm-test-{uuid.uuid4().hex[:12]}",
                            "LORAFARM_HEARTBEAT_SECONDS": "1",
                            "LORAFARM_STALE_AFTER_SECONDS": "4",
                            "LORAFARM_CANCEL_GRACE_SECONDS": "5"}.items():
            monkeypatch.setenv(name, value)
        touched.append(reload_settings())
        return touched[-1]

    yield apply
    for settings in reversed(touched):  # whatever a failed test left running
        _resume_all(load_processes(settings))
        farm_down(settings, grace=5)
    monkeypatch.undo()
    reload_settings()
    _delete_keys(touched)


def _delete_keys(touched) -> None:
    for settings in touched:
        if settings.redis_url.startswith("redis://127.0.0.1:6379"):
            client = redis.Redis.from_url(settings.redis_url)
            for key in client.scan_iter(match=f"{settings.key_prefix}:*"):
                client.delete(key)


def _resume_all(processes) -> None:
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _alive(process) -> bool:
    return psutil.pid_exists(process.pid) and \
        psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE


def test_up_starts_redis_worker_flower_web_and_down_stops_them(farm_settings):
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing answers there yet
    settings = farm_settings(url)
    flower_port, web_port = free_port(), free_port()

    state = farm_up(settings, with_flower=True, flower_port=flower_port, with_web=True,
                    web_port=web_port)

    roles = sorted(p.role for p in state.processes)
    assert roles == ["flower", "redis", "web", "worker"]
    client = redis.Redis.from_url(url, decode_responses=True)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    redis_dir = settings.output_root_abs / "_farm" / f"redis-{url.rsplit(':', 1)[1].split('/')[0]}"
    assert client.config_get("dir")["dir"] == str(redis_dir)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url.replace(PASSWORD, "wrong")).ping()
    worker = next(p for p in state.processes if p.role == "worker")
    assert worker.name.startswith("gpu-gpu0@")
    assert client.hexists(f"{settings.key_prefix}:workers", worker.name)  # its heartbeat
    redis_proc = next(p for p in state.processes if p.role == "redis")
    assert PASSWORD not in " ".join(psutil.Process(redis_proc.pid).cmdline())
    assert PASSWORD not in state_file(settings).read_text()
    assert "***" in redact_url(url) and PASSWORD not in redact_url(url)
    _wait_http(f"http://127.0.0.1:{flower_port}/healthcheck")
    _wait_http(f"http://127.0.0.1:{web_port}/healthz")
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/cards", timeout=10) as page:
        assert "gpu0" in page.read().decode()  # the dashboard reads this farm's ledger

    again = farm_up(settings)
    assert again.processes == [] and len(again.running) == 4  # already up: starts nothing twice

    stopped = farm_down(settings, grace=15).stopped
    assert sorted(p.role for p in stopped) == roles
    for process in stopped:
        assert not psutil.pid_exists(process.pid) or \
            psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE
    assert load_processes(settings) == []
    assert any(redis_dir.rglob("*.aof")), "append-only data stays for the next `up`"


def test_up_uses_a_redis_that_answers(farm_settings):
    settings = farm_settings("redis://127.0.0.1:6379/0")
    state = farm_up(settings)
    assert [p.role for p in state.processes] == ["worker"]  # no second Redis
    assert [p.role for p in farm_down(settings, grace=15).stopped] == ["worker"]


def _wait_http(url: str, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                assert answer.status == 200
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_farms_are_known_by_redis_url_and_prefix_and_never_stop_each_other(farm_settings):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    first = farm_settings(url)
    first_state = farm_up(first)
    assert sorted(p.role for p in first_state.processes) == ["redis", "worker"]

    # the same Redis, another prefix: another farm, with its own worker serving it
    other = farm_settings(url, prefix=f"lorafarm-test-{uuid.uuid4().hex[:12]}")
    other_state = farm_up(other)
    assert other_state.running == [] and [p.role for p in other_state.processes] == ["worker"]
    other_worker = other_state.processes[0]
    assert redis.Redis.from_url(url).hexists(f"{other.key_prefix}:workers", other_worker.name)

    # a URL where nothing answers yet: not "already up", a farm of its own (its own Redis)
    elsewhere = farm_settings(f"redis://127.0.0.1:{free_port()}/0", prefix=first.key_prefix)
    elsewhere_state = farm_up(elsewhere)
    assert sorted(p.role for p in elsewhere_state.processes) == ["redis", "worker"]
    assert sorted(p.role for p in farm_down(elsewhere, grace=15).stopped) == ["redis", "worker"]
    assert all(_alive(p) for p in first_state.processes + other_state.processes)

    # down of the first farm: its worker stops; the Redis the other farm uses is handed over
    farm_settings(url, prefix=first.key_prefix)
    down = farm_down(first, grace=15)
    assert [p.role for p in down.stopped] == ["worker"]
    (redis_process, heir), = down.handed_over
    assert redis_process.role == "redis" and other.key_prefix in heir
    assert _alive(redis_process) and _alive(other_worker)
    assert redis.Redis.from_url(url).ping()
    assert sorted(p.role for p in load_processes(other)) == ["redis", "worker"]

    farm_settings(url, prefix=other.key_prefix)
    assert sorted(p.role for p in farm_down(other, grace=15).stopped) == ["redis", "worker"]
    assert not _alive(redis_process)


def test_up_cleans_up_a_farm_whose_processes_died_and_keep_up_says_what_stays(farm_settings,
                                                                               capsys):
    settings = farm_settings("redis://127.0.0.1:6379/0")
    (dead,) = farm_up(settings).processes
    os.killpg(dead.pid, signal.SIGKILL)
    psutil.Process(dead.pid).wait(timeout=10)

    state = farm_up(settings)  # was: "already up" from the state file alone
    assert state.dead == [dead] and [p.role for p in state.processes] == ["worker"]
    (worker,) = state.processes
    heartbeat = redis.Redis.from_url(settings.redis_url).hget(f"{settings.key_prefix}:workers",
                                                              worker.name)
    assert json.loads(heartbeat)["pid"] == worker.pid  # the new worker's, not the dead one's
    children = len(psutil.Process(worker.pid).children(recursive=True))
    assert children >= 1  # the prefork pool

    capsys.readouterr()
    _leave_farm(state, keep_up=True, settings=settings)
    said = " ".join(capsys.readouterr().out.split())
    assert f"the farm stays up: 1 worker ({children + 1} processes)" in said
    assert "`lorafarm down` stops it" in said and _alive(worker)
    _leave_farm(state, keep_up=False, settings=settings)
    assert not _alive(worker) and load_processes(settings) == []


def test_demo_with_no_worker_serving_its_farm_says_so_and_exits(farm_settings, tmp_path):
    settings = farm_settings("redis://127.0.0.1:6379/0")
    (worker,) = farm_up(settings).processes
    os.killpg(worker.pid, signal.SIGSTOP)  # a hung worker: alive, but it serves nothing
    time.sleep(settings.stale_after_seconds + 1)
    demo = subprocess.run([sys.executable, "-m", "lora_farm", "demo", "--root",
                           str(tmp_path / "demo")], env={**os.environ, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 1, demo.stdout + demo.stderr
    said = " ".join(demo.stderr.split())
    assert "no worker serves this farm" in said and settings.key_prefix in said
    assert "`lorafarm down`" in said
    assert not (tmp_path / "demo" / "jobs").exists()  # it stopped before building the batch
    assert "the farm stays up: 1 worker" in " ".join(demo.stdout.split())
