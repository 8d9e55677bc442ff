"""`lorafarm flower` against the test broker and a real Celery worker, read over Flower's HTTP API."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from lora_farm.cli.ship import flower_argv
from tests.fixtures_farm import wait_until
from tests.fixtures_s3 import free_port

pytestmark = pytest.mark.slow
AUTH = "farmer:flower-test-password"


def get(url: str, auth: str | None = AUTH, timeout: float = 30) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError:
        return 0, ""


@contextlib.contextmanager
def running_flower(env: dict[str, str], log_path):
    """`lorafarm flower` on a free port; yields its base URL."""
    port = free_port()
    log = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", "lora_farm", "flower", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get(f"{base}/healthcheck", auth=None)[0] == 200 or process.poll(), 120,
                   what="flower /healthcheck")
        assert process.poll() is None, log_path.read_text()
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture
def flower_server(farm_env, tmp_path):
    with running_flower({**farm_env, "FLOWER_BASIC_AUTH": AUTH}, tmp_path / "flower.log") as base:
        yield base


def test_flower_shows_the_gpu_worker_online(celery_workers, flower_server):
    celery_workers.start("gpu0", concurrency=1)
    (name,) = celery_workers.processes

    def worker_listed():
        status, body = get(f"{flower_server}/api/workers?refresh=1")
        workers = json.loads(body) if status == 200 else {}
        return workers.get(name)

    info = wait_until(worker_listed, 120, what=f"worker {name} in Flower's /api/workers")
    queues = {queue["name"] for queue in info["active_queues"]}
    assert "gpu.gpu0" in queues  # the queue says which card this worker drives
    assert name.startswith("gpu-gpu0-")
    assert info["stats"]["pid"] > 0  # it answered the inspect: it is online

    status, _ = get(f"{flower_server}/api/workers", auth=None)
    assert status == 401  # the API is closed without the basic-auth credentials


def test_flower_argv_keeps_the_broker_password_off_the_command_line():
    argv = flower_argv(5555, "0.0.0.0", "flower")
    assert argv[1:6] == ["-m", "celery", "-A", "lora_farm.workers.app", "flower"]
    assert "--url_prefix=flower" in argv and not any("redis://" in part for part in argv)


def test_flower_without_credentials_says_its_api_is_closed_and_how_to_open_it(farm_env, tmp_path):
    """What the README's Flower section promises: the pages open, the API 401 until
    FLOWER_BASIC_AUTH (or FLOWER_UNAUTHENTICATED_API) is set, and `lorafarm flower` says so."""
    env = {k: v for k, v in farm_env.items() if not k.startswith("FLOWER_")}
    log = tmp_path / "open.log"
    with running_flower(env, log) as base:
        assert get(f"{base}/workers", auth=None)[0] == 200
        status, body = get(f"{base}/api/workers", auth=None)
        assert status == 401 and "FLOWER_UNAUTHENTICATED_API" in body
    said = " ".join(log.read_text().split())
    assert "Flower's HTTP API (/api/...) answers 401 without credentials" in said
    assert "FLOWER_BASIC_AUTH=user:password" in said

    opened = tmp_path / "unauthenticated.log"
    with running_flower({**env, "FLOWER_UNAUTHENTICATED_API": "true"}, opened) as base:
        assert get(f"{base}/api/workers", auth=None)[0] == 200
    assert "answers 401" not in opened.read_text()
