"""Fixtures: a real S3-compatible server on loopback (moto server mode, as a subprocess).

``s3_server`` is shared by the session; ``s3_bucket`` gives each test its own bucket and
empties it afterwards; ``s3_env`` points the farm settings at it. Tests that kill the server
(outage) start their own ``MotoServer``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

TEST_KEY_ID = "lorafarm-test-key"
TEST_SECRET = "lorafarm-test-secret-DO-NOT-LOG"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` as a process that can be killed and restarted."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None):
        self.port = port or free_port()
        self.log_dir = log_dir
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "MotoServer":
        moto = Path(sys.executable).parent / "moto_server"
        log = open(self.log_dir / f"moto-{self.port}.log", "ab") if self.log_dir else subprocess.DEVNULL
        self.process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"moto_server did not listen on {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: an outage, not a shutdown (in-flight requests just break)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=TEST_SECRET)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = MotoServer(log_dir=tmp_path_factory.mktemp("moto")).start()
    yield server
    server.kill()


def _empty_and_delete(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the shared server, removed after the test."""
    bucket = f"lorafarm-test-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    yield bucket
    _empty_and_delete(client, bucket)


def s3_environment(monkeypatch, endpoint: str, bucket: str, prefix: str = "farm") -> None:
    """Point LORAFARM_S3_* and the boto3 credential chain at a test server."""
    from lora_farm.settings import reload_settings

    for name, value in {
        "AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "LORAFARM_S3_BUCKET": bucket, "LORAFARM_S3_ENDPOINT_URL": endpoint,
        "LORAFARM_S3_PREFIX": prefix, "LORAFARM_S3_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    reload_settings()


@pytest.fixture
def s3_env(monkeypatch, s3_server, s3_bucket):
    """Settings that select S3Storage on the test server; restored after the test."""
    from lora_farm.settings import reload_settings

    s3_environment(monkeypatch, s3_server.endpoint, s3_bucket)
    yield s3_bucket
    monkeypatch.undo()
    reload_settings()
