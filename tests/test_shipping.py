"""Shipping a finished job folder to local and S3 storage (moto server on loopback)."""

from __future__ import annotations

import json
import os
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_farm.errors import ArtifactMissing, StorageError, StorageUnavailable
from lora_farm.settings import reload_settings
from lora_farm.shipping import fetch_job, read_manifest, ship_job
from lora_farm.storage import LocalStorage, sha256_of, storage_from_settings
from tests.fixtures_s3 import MotoServer, s3_environment

MB = 1024 * 1024


def make_finished_job(job_dir: Path, name: str = "cat", weight_bytes: int = 0) -> Path:
    """A job folder as the trainer leaves it after an image run (real safetensors files)."""
    (job_dir / "diffusers").mkdir(parents=True)
    tensors = {"lora_unet_down.lora_down.weight": np.ones((4, 8), dtype=np.float32)}
    save_file(tensors, str(job_dir / f"{name}.safetensors"), metadata={"ss_network_dim": "4"})
    save_file(tensors, str(job_dir / "diffusers" / "pytorch_lora_weights.safetensors"))
    if weight_bytes:  # a big extra weight file, to make uploads multipart
        (job_dir / f"{name}-full.safetensors").write_bytes(os.urandom(weight_bytes))
    (job_dir / "config.resolved.yaml").write_text(f"name: {name}\nlora_rank: 4\n")
    (job_dir / "train.log").write_text("Epoch 1/1 | Step 2/2 | Loss 0.1\n")
    (job_dir / "events.jsonl").write_text('{"event": "summary", "steps": 2}\n')
    (job_dir / "tensorboard").mkdir()
    (job_dir / "tensorboard" / "events.out.tfevents.1").write_bytes(b"tb")
    for step in ("step-000001", "step-000002"):
        (job_dir / "checkpoints" / step).mkdir(parents=True)
        (job_dir / "checkpoints" / step / "state.json").write_bytes(b"state")
    return job_dir


def local_hashes(job_dir: Path) -> dict[str, str]:
    return {p.relative_to(job_dir).as_posix(): sha256_of(p)
            for p in job_dir.rglob("*.safetensors")}


@pytest.fixture
def local_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAFARM_S3_BUCKET", raising=False)
    monkeypatch.setenv("LORAFARM_OUTPUT_ROOT", str(tmp_path / "output"))
    monkeypatch.setenv("LORAFARM_S3_PREFIX", "farm")
    yield reload_settings()
    monkeypatch.undo()
    reload_settings()


def test_the_manifest_names_the_attempt_the_ledger_gives_not_a_fence_raised_since(local_env, tmp_path):
    from lora_farm.protocol import Fence, JobDir

    job_dir = make_finished_job(tmp_path / "output" / "b1" / "job-7")
    assert Fence(JobDir(job_dir).fence, 3).raise_to()  # the reaper fenced attempt 2 out meanwhile
    ship_job(job_dir, "job-7", "b1", "cat", attempt=2)
    assert json.loads((job_dir / "manifest.json").read_text())["attempt"] == 2
    ship_job(job_dir, "job-7", "b1", "cat")  # no ledger at hand: the fence says
    assert json.loads((job_dir / "manifest.json").read_text())["attempt"] == 3


def test_local_ship_lays_out_keys_manifest_marker_and_prunes(local_env, tmp_path):
    job_dir = make_finished_job(tmp_path / "output" / "b1" / "job-1")
    weights = local_hashes(job_dir)
    result = ship_job(job_dir, "job-1", "b1", "cat")

    stored = tmp_path / "output" / "_storage" / "farm" / "b1" / "job-1"
    assert sorted(result.uris) == ["cat.safetensors", "config.resolved.yaml",
                                   "diffusers/pytorch_lora_weights.safetensors", "logs.tar.gz"]
    assert result.uris["cat.safetensors"] == (stored / "cat.safetensors").as_uri()
    assert result.manifest_uri == (stored / "manifest.json").as_uri()
    manifest = json.loads((stored / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert sha256_of(stored / entry["path"]) == entry["sha256"]
    assert json.loads((stored / "_COMPLETE").read_text())["manifest_sha256"] == \
        sha256_of(stored / "manifest.json")
    # weights stay local, checkpoints are pruned only after the verified upload
    assert local_hashes(job_dir) == weights
    assert not (job_dir / "checkpoints").exists()
    with tarfile.open(job_dir / "logs.tar.gz") as tar:
        assert {"train.log", "config.resolved.yaml", "events.jsonl",
                "tensorboard/events.out.tfevents.1"} <= set(tar.getnames())
        assert not any(n.startswith("checkpoints") for n in tar.getnames())


def test_s3_ship_then_fetch_verifies_every_file(s3_env, s3_server, tmp_path):
    job_dir = make_finished_job(tmp_path / "b1" / "job-2")
    result = ship_job(job_dir, "job-2", "b1", "cat")
    bucket = s3_env
    assert result.manifest_uri == f"s3://{bucket}/farm/b1/job-2/manifest.json"

    client = s3_server.client()
    head = client.head_object(Bucket=bucket, Key="farm/b1/job-2/cat.safetensors")
    assert head["Metadata"]["sha256"] == sha256_of(job_dir / "cat.safetensors")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert "farm/b1/job-2/_COMPLETE" in keys and not any("checkpoints" in k for k in keys)

    fetched = fetch_job(storage_from_settings(), "b1", "job-2", tmp_path / "fetched")
    assert {p.relative_to(tmp_path / "fetched").as_posix() for p in fetched} == set(result.uris)
    assert sha256_of(tmp_path / "fetched" / "cat.safetensors") == sha256_of(job_dir / "cat.safetensors")


def test_retry_overwrites_its_own_attempt_and_nothing_else(s3_env, s3_server, tmp_path):
    bucket, client = s3_env, s3_server.client()
    job_a = make_finished_job(tmp_path / "a", name="a")
    job_b = make_finished_job(tmp_path / "b", name="b")
    ship_job(job_a, "job-a", "night", "a")
    ship_job(job_b, "job-b", "night", "b")
    b_before = {o["Key"]: o["ETag"] for o in
                client.list_objects_v2(Bucket=bucket, Prefix="farm/night/job-b/")["Contents"]}

    save_file({"x": np.zeros((2, 2), dtype=np.float32)}, str(job_a / "a.safetensors"))
    ship_job(job_a, "job-a", "night", "a")

    b_after = {o["Key"]: o["ETag"] for o in
               client.list_objects_v2(Bucket=bucket, Prefix="farm/night/job-b/")["Contents"]}
    assert b_after == b_before
    manifest = read_manifest(storage_from_settings(), "night", "job-a")
    entry = next(e for e in manifest["files"] if e["path"] == "a.safetensors")
    assert entry["sha256"] == sha256_of(job_a / "a.safetensors")


def test_fetch_rejects_a_corrupted_object(s3_env, s3_server, tmp_path):
    job_dir = make_finished_job(tmp_path / "job")
    ship_job(job_dir, "job-3", "b1", "cat")
    s3_server.client().put_object(Bucket=s3_env, Key="farm/b1/job-3/cat.safetensors", Body=b"rot")
    with pytest.raises(StorageError, match="corrupted"):
        fetch_job(storage_from_settings(), "b1", "job-3", tmp_path / "fetched")
    assert not (tmp_path / "fetched" / "cat.safetensors").exists()


def test_a_stored_copy_counts_only_when_its_bytes_read_back(s3_env, s3_server, tmp_path):
    job_dir = make_finished_job(tmp_path / "job")
    ship_job(job_dir, "job-4", "b1", "cat")
    key = "farm/b1/job-4/cat.safetensors"
    good = (job_dir / "cat.safetensors").read_bytes()
    client = s3_server.client()
    # same size, the right sha256 in the metadata, wrong bytes: a head-only check would pass
    client.put_object(Bucket=s3_env, Key=key, Body=bytes(len(good)),
                      Metadata={"sha256": sha256_of(job_dir / "cat.safetensors")})
    ship_job(job_dir, "job-4", "b1", "cat")
    assert client.get_object(Bucket=s3_env, Key=key)["Body"].read() == good


def test_an_incomplete_upload_is_not_listed(local_env, tmp_path):
    job_dir = make_finished_job(tmp_path / "job")
    ship_job(job_dir, "job-4", None, "cat")
    storage = storage_from_settings()
    storage.delete("farm/default/job-4/_COMPLETE")  # as if the upload stopped before the end
    with pytest.raises(StorageError, match="retry-upload job-4"):
        read_manifest(storage, None, "job-4")


def test_a_job_without_weights_is_not_shipped(local_env, tmp_path):
    job_dir = tmp_path / "empty"
    job_dir.mkdir()
    (job_dir / "train.log").write_text("Traceback ...")
    with pytest.raises(ArtifactMissing, match="train.log"):
        ship_job(job_dir, "job-5", "b1", "cat")
    assert (job_dir / "logs.tar.gz").is_file()  # the logs are archived even so


def test_storage_outage_mid_upload_waits_keeps_weights_and_recovers(monkeypatch, tmp_path):
    """Kill the S3 server during a multipart upload; the job waits; the server returns; done."""
    server = MotoServer(log_dir=tmp_path).start()
    bucket = "lorafarm-test-outage"
    try:
        server.client().create_bucket(Bucket=bucket)
        s3_environment(monkeypatch, server.endpoint, bucket)
        for name, value in {"S3_MULTIPART_THRESHOLD_MB": "5", "S3_MULTIPART_CHUNKSIZE_MB": "5",
                            "S3_MAX_ATTEMPTS": "2", "UPLOAD_RETRY_SECONDS": "0.2",
                            "UPLOAD_RETRY_MAX_SECONDS": "1"}.items():
            monkeypatch.setenv(f"LORAFARM_{name}", value)
        reload_settings()
        job_dir = make_finished_job(tmp_path / "job", weight_bytes=40 * MB)
        weights = local_hashes(job_dir)
        waits: list[StorageError] = []
        outcome: dict = {}

        def upload() -> None:
            try:
                while "result" not in outcome:  # the farm retries the same way (reaper)
                    try:
                        outcome["result"] = ship_job(job_dir, "job-6", "b1", "cat")
                    except StorageError as error:
                        waits.append(error)
                        time.sleep(0.5)
            except BaseException as error:  # surfaced by the assertions below
                outcome["error"] = error

        worker = threading.Thread(target=upload, daemon=True)
        worker.start()
        wait_for(lambda: server.client().list_multipart_uploads(Bucket=bucket).get("Uploads"))
        server.kill()  # mid-upload: parts are in flight
        wait_for(lambda: len(waits) >= 2)

        assert isinstance(waits[0], StorageUnavailable) and server.endpoint in str(waits[0])
        assert "result" not in outcome and "error" not in outcome  # still waiting, not failed
        assert local_hashes(job_dir) == weights
        assert (job_dir / "checkpoints" / "step-000002" / "state.json").is_file()

        server.start()  # same port; an ephemeral store comes back empty
        server.client().create_bucket(Bucket=bucket)
        worker.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert result.uris["cat-full.safetensors"] == f"s3://{bucket}/farm/b1/job-6/cat-full.safetensors"
        fetched = fetch_job(storage_from_settings(), "b1", "job-6", tmp_path / "fetched")
        assert local_hashes(tmp_path / "fetched") == weights
        assert len(fetched) == 5 and not (job_dir / "checkpoints").exists()
    finally:
        server.kill()
        reload_settings()


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


def test_local_storage_root_is_separate_from_job_folders(local_env, tmp_path):
    storage = storage_from_settings()
    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "output" / "_storage").resolve()


@pytest.mark.slow
def test_outage_through_the_ledger_then_retry_upload_artifacts_fetch(farm_env, ledger, monkeypatch,
                                                                     tmp_path):
    """A trained job meets dead storage: it stays `uploading`; the CLI ships it once storage is back."""
    import subprocess
    import sys

    from lora_farm.jobs.spec import spec_from_dict
    from lora_farm.ledger import NewJob
    from lora_farm.ledger import transitions as tr
    from lora_farm.workers.upload import ship_and_finish
    from tests.fixtures_s3 import TEST_SECRET

    server = MotoServer(log_dir=tmp_path).start()
    bucket = "lorafarm-test-ledger-outage"
    try:
        s3_environment(monkeypatch, server.endpoint, bucket)
        monkeypatch.setenv("LORAFARM_S3_MAX_ATTEMPTS", "1")
        settings = reload_settings()
        spec = spec_from_dict({"name": "cat", "task": "image", "base_model": str(tmp_path),
                               "train_data_dir": str(tmp_path)})
        (created,) = ledger.create_jobs([NewJob(spec, "b1", 0, 100.0)])
        job_id = created.record.id
        tr.schedule(ledger, job_id, ["gpu0"], 100.0, token="t")
        tr.start(ledger, job_id, "t", "host")
        job_dir = make_finished_job(tmp_path / "output" / "b1" / job_id)
        weights = local_hashes(job_dir)
        tr.begin_upload(ledger, job_id, "t", str(job_dir))

        server.kill()  # storage is down when the runner ships
        record = ship_and_finish(ledger, job_id, job_dir, settings=settings)
        assert record.state == "uploading" and server.endpoint in record.exit_reason
        assert record.next_upload_at is not None and record.upload_tries == 1
        assert local_hashes(job_dir) == weights and (job_dir / "checkpoints").is_dir()
        stored = json.dumps(ledger.client.hgetall(ledger.keys.job(job_id)), default=str)
        assert TEST_SECRET not in stored

        server.start()
        server.client().create_bucket(Bucket=bucket)
        env = {**os.environ, "PYTHONPATH": farm_env["PYTHONPATH"], "COLUMNS": "250"}

        def cli(*args: str) -> str:
            done = subprocess.run([sys.executable, "-m", "lora_farm", *args], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            assert TEST_SECRET not in done.stdout + done.stderr
            return done.stdout

        assert "uploaded and verified" in cli("retry-upload", job_id)
        record = ledger.get(job_id)
        assert record.state == "succeeded"
        assert record.artifacts["cat.safetensors"] == f"s3://{bucket}/farm/b1/{job_id}/cat.safetensors"
        listing = cli("artifacts", job_id)
        assert "cat.safetensors" in listing and f"s3://{bucket}/farm/b1/{job_id}/" in listing
        cli("fetch", job_id, str(tmp_path / "fetched"))
        assert local_hashes(tmp_path / "fetched") == weights
    finally:
        server.kill()
        reload_settings()


def test_artifacts_of_a_local_upload_are_found_from_another_cwd(farm_env, ledger, monkeypatch,
                                                                tmp_path):
    """The worker shipped from one folder and the user asks from another, both with the relative
    default output root: the URI the ledger recorded says where the upload went."""
    import subprocess
    import sys

    from lora_farm.jobs.spec import spec_from_dict
    from lora_farm.ledger import NewJob
    from lora_farm.ledger import transitions as tr
    from lora_farm.workers.upload import ship_and_finish

    worker_cwd, user_cwd = tmp_path / "worker", tmp_path / "project"
    worker_cwd.mkdir(), user_cwd.mkdir()
    monkeypatch.delenv("LORAFARM_STORAGE_DIR")
    monkeypatch.delenv("LORAFARM_S3_BUCKET", raising=False)
    monkeypatch.setenv("LORAFARM_OUTPUT_ROOT", "output")
    monkeypatch.chdir(worker_cwd)
    settings = reload_settings()
    spec = spec_from_dict({"name": "cat", "task": "image", "base_model": str(tmp_path),
                           "train_data_dir": str(tmp_path)})
    job_id = ledger.create_jobs([NewJob(spec, "b1", 0, 100.0)])[0].record.id
    tr.schedule(ledger, job_id, ["gpu0"], 100.0, token="t")
    tr.start(ledger, job_id, "t", "host")
    job_dir = make_finished_job(worker_cwd / "output" / "b1" / job_id)
    tr.begin_upload(ledger, job_id, "t", str(job_dir))
    assert ship_and_finish(ledger, job_id, job_dir, settings=settings).state == "succeeded"

    env = {**os.environ, "PYTHONPATH": farm_env["PYTHONPATH"], "COLUMNS": "250"}
    for args in (["artifacts", job_id], ["fetch", job_id, "fetched"]):
        done = subprocess.run([sys.executable, "-m", "lora_farm", *args], cwd=user_cwd, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    assert local_hashes(user_cwd / "fetched") == local_hashes(job_dir)
