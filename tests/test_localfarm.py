"""`lorafarm up` / `down`: real redis-server, real Celery workers, real Flower, then all stopped."""

from __future__ import annotations

import urllib.request
import uuid

import psutil
import pytest
import redis

from lora_farm.localfarm import farm_down, farm_up, load_processes, state_file
from lora_farm.redis_conn import redact_url
from lora_farm.settings import reload_settings
from tests.fixtures_s3 import free_port

pytestmark = pytest.mark.slow
PASSWORD = "local-farm-test-pw"


@pytest.fixture
def farm_settings(monkeypatch, tmp_path):
    def apply(redis_url: str):
        for name, value in {"LORAFARM_REDIS_URL": redis_url, "LORAFARM_GPUS": "gpu0:8GiB",
                            "LORAFARM_OUTPUT_ROOT": str(tmp_path / "output"),
                            "LORAFARM_KEY_PREFIX": f"lorafarm-test-{uuid.uuid4().hex[:12]}",
                            "LORAFARM_HEARTBEAT_SECONDS": "1",
                            "LORAFARM_CANCEL_GRACE_SECONDS": "5"}.items():
            monkeypatch.setenv(name, value)
        return reload_settings()

    yield apply
    settings = reload_settings()
    farm_down(settings, grace=5)  # whatever a failed test left running
    monkeypatch.undo()
    reload_settings()


def test_up_starts_redis_worker_flower_and_down_stops_them(farm_settings):
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing answers there yet
    settings = farm_settings(url)
    flower_port = free_port()

    state = farm_up(settings, with_flower=True, flower_port=flower_port)

    roles = sorted(p.role for p in state.processes)
    assert roles == ["flower", "redis", "worker"]
    client = redis.Redis.from_url(url, decode_responses=True)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("dir")["dir"] == str(settings.output_root_abs / "_farm" / "redis")
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

    assert farm_up(settings).processes == []  # already up: starts nothing twice

    stopped = farm_down(settings, grace=15)
    assert sorted(p.role for p in stopped) == roles
    for process in stopped:
        assert not psutil.pid_exists(process.pid) or \
            psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE
    assert load_processes(settings) == []
    aof = settings.output_root_abs / "_farm" / "redis"
    assert any(aof.rglob("*.aof")), "append-only data stays for the next `up`"


def test_up_uses_a_redis_that_answers(farm_settings):
    settings = farm_settings("redis://127.0.0.1:6379/0")
    state = farm_up(settings)
    try:
        assert [p.role for p in state.processes] == ["worker"]  # no second Redis
    finally:
        assert [p.role for p in farm_down(settings, grace=15)] == ["worker"]
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    for key in client.scan_iter(match=f"{settings.key_prefix}:*"):
        client.delete(key)


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
