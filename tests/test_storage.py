"""Storage backends against real targets: a folder, and a moto S3 server on loopback."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lora_farm.errors import StorageError, StorageUnavailable
from lora_farm.settings import Settings
from lora_farm.storage import (MB, LocalStorage, S3Storage, check_key, sha256_of,
                               storage_from_settings, storage_holding)
from tests.fixtures_s3 import TEST_SECRET, free_port, s3_environment


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    server = request.getfixturevalue("s3_server")
    s3_environment(monkeypatch, server.endpoint, bucket)
    return S3Storage(bucket, endpoint_url=server.endpoint, region="us-east-1", max_attempts=2)


def test_put_head_get_round_trip_records_sha256(storage, tmp_path):
    source = tmp_path / "w.safetensors"
    source.write_bytes(os.urandom(4096))
    digest = sha256_of(source)
    key = "farm/b1/job1/w.safetensors"

    assert storage.head(key) is None
    storage.put_file(source, key, digest)
    stored = storage.head(key)
    assert (stored.size, stored.sha256) == (4096, digest)
    assert stored.uri.endswith("/farm/b1/job1/w.safetensors")

    storage.get_file(key, tmp_path / "back" / "w.safetensors")
    assert sha256_of(tmp_path / "back" / "w.safetensors") == digest

    storage.put_bytes("farm/b1/job1/_COMPLETE", b'{"ok": 1}')
    assert storage.get_bytes("farm/b1/job1/_COMPLETE") == b'{"ok": 1}'
    assert storage.head("farm/b1/job1/_COMPLETE").sha256 == hashlib.sha256(b'{"ok": 1}').hexdigest()
    storage.delete("farm/b1/job1/_COMPLETE")
    storage.delete("farm/b1/job1/_COMPLETE")  # deleting twice is fine
    assert storage.head("farm/b1/job1/_COMPLETE") is None


def test_missing_object_download_is_a_storage_error(storage, tmp_path):
    with pytest.raises(StorageError, match="nothing-here"):
        storage.get_file("farm/b/j/nothing-here", tmp_path / "x")


@pytest.mark.parametrize("key", ["../escape", "/abs/key", "a/../../b", "a//b", ""])
def test_keys_cannot_escape_their_prefix(key, tmp_path):
    with pytest.raises(StorageError):
        check_key(key)
    with pytest.raises(StorageError):
        LocalStorage(tmp_path).put_bytes(key, b"x")


def test_local_layout_matches_bucket_keys(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    storage.put_bytes("farm/nightly/j1/manifest.json", b"{}")
    assert (tmp_path / "store/farm/nightly/j1/manifest.json").read_bytes() == b"{}"
    assert storage.uri("farm/nightly/j1/manifest.json").startswith("file://")
    assert not list((tmp_path / "store/farm/nightly/j1").glob(".*part"))  # no temp left behind


def test_local_storage_on_a_broken_mount_is_unavailable(tmp_path):
    (tmp_path / "not-a-dir").write_text("a file where the storage folder should be")
    storage = LocalStorage(tmp_path / "not-a-dir")
    with pytest.raises(StorageUnavailable, match="LORAFARM_STORAGE_DIR"):
        storage.put_bytes("farm/b/j/x", b"data")


def test_large_files_go_multipart(s3_server, s3_bucket, monkeypatch, tmp_path):
    s3_environment(monkeypatch, s3_server.endpoint, s3_bucket)
    storage = S3Storage(s3_bucket, endpoint_url=s3_server.endpoint, multipart_threshold=5 * MB,
                        multipart_chunksize=5 * MB, max_attempts=2)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MB))
    storage.put_file(big, "farm/b/j/big.bin", sha256_of(big))

    answer = s3_server.client().head_object(Bucket=s3_bucket, Key="farm/b/j/big.bin")
    assert answer["ETag"].strip('"').endswith("-3")  # 3 parts of <= 5 MB
    assert answer["Metadata"]["sha256"] == sha256_of(big)


def test_missing_bucket_names_bucket_and_fix(s3_server, monkeypatch, tmp_path):
    s3_environment(monkeypatch, s3_server.endpoint, "no-such-bucket")
    storage = S3Storage("no-such-bucket", endpoint_url=s3_server.endpoint, max_attempts=1)
    with pytest.raises(StorageError) as caught:
        storage.put_bytes("farm/b/j/x", b"x")
    assert "no-such-bucket" in str(caught.value) and "LORAFARM_S3_BUCKET" in str(caught.value)
    assert TEST_SECRET not in str(caught.value)


def test_unreachable_endpoint_is_unavailable_without_secrets(monkeypatch, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s3_environment(monkeypatch, endpoint, "bucket")
    storage = S3Storage("bucket", endpoint_url=endpoint, max_attempts=1)
    source = tmp_path / "f"
    source.write_bytes(b"x" * 100)
    with pytest.raises(StorageUnavailable) as caught:
        storage.put_file(source, "farm/b/j/f", sha256_of(source))
    message = str(caught.value)
    assert endpoint in message and "LORAFARM_S3_ENDPOINT_URL" in message
    assert TEST_SECRET not in message and "lorafarm-test-key" not in message


def test_missing_credentials_say_which_variables(s3_server, monkeypatch, tmp_path):
    s3_environment(monkeypatch, s3_server.endpoint, "bucket")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = S3Storage("bucket", endpoint_url=s3_server.endpoint, max_attempts=1)
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        storage.head("farm/b/j/x")


def test_settings_pick_the_backend(tmp_path):
    local = storage_from_settings(Settings(output_root=tmp_path))
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "_storage").resolve()
    chosen = storage_from_settings(Settings(output_root=tmp_path, storage_dir=tmp_path / "nfs"))
    assert chosen.root == (tmp_path / "nfs").resolve()
    s3 = storage_from_settings(Settings(s3_bucket="b", s3_endpoint_url="http://127.0.0.1:9",
                                        s3_multipart_chunksize_mb=8))
    assert isinstance(s3, S3Storage) and s3.transfer.multipart_chunksize == 8 * MB
    assert s3.describe() == "bucket 'b' at http://127.0.0.1:9"


def test_output_root_and_storage_dir_are_absolute_from_load(tmp_path, monkeypatch):
    """Resolved once against the cwd of the load, not again wherever a later call runs."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    default, chosen = Settings(output_root=Path("out")), Settings(storage_dir=Path("store"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert default.output_root == tmp_path / "out" and chosen.storage_dir == tmp_path / "store"
    assert storage_from_settings(default).root == tmp_path / "out" / "_storage"


def test_a_recorded_local_uri_finds_the_storage_from_any_cwd(tmp_path, monkeypatch):
    written = LocalStorage(tmp_path / "worker" / "output" / "_storage")
    written.put_bytes("farm/b1/job1/manifest.json", b"{}")
    uri = written.uri("farm/b1/job1/manifest.json")
    monkeypatch.chdir(tmp_path)  # another cwd, whose settings point at another folder
    found = storage_holding(uri, "farm/b1/job1/manifest.json", Settings(output_root=Path("output")))
    assert isinstance(found, LocalStorage) and found.root == written.root
    elsewhere = storage_holding("", "farm/b1/job1/manifest.json", Settings(output_root=Path("output")))
    assert elsewhere.root == tmp_path / "output" / "_storage"  # nothing recorded: the settings
