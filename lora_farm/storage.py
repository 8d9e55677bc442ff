"""Artifact storage: a narrow interface, one class per backend (local folder, S3-compatible).

Both backends use the same keys (``<prefix>/<batch>/<job_id>/<path>``), record a sha256 with
every object and report it back from ``head``, so shipping and verification code does not care
which one it talks to. Every failure surfaces as ``StorageError`` (``StorageUnavailable`` when
retrying later may help); messages name the endpoint, bucket and key, never a credential.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from lora_farm.errors import StorageError, StorageUnavailable
from lora_farm.settings import Settings, get_settings

MB = 1024 * 1024
SHA256_META = "sha256"


@dataclass(frozen=True)
class StoredObject:
    """What storage says about one object."""

    key: str
    size: int
    sha256: str | None
    uri: str


def sha256_of(path: Path, chunk: int = 4 * MB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(dest: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` beside ``dest``, then rename it over ``dest``: a reader never sees half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def check_key(key: str) -> str:
    """A key is a relative POSIX path without ``..``: it can never leave its job prefix."""
    if not key or any(part in ("..", ".", "") for part in key.split("/")):
        raise StorageError(f"storage key {key!r} is not a clean relative path; this is a bug")
    return key


class Storage(ABC):
    """Where finished artifacts go. Keys are full keys (prefix included)."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def describe(self) -> str:
        """Where this storage is, for error messages (no secrets)."""

    @abstractmethod
    def put_file(self, path: Path, key: str, sha256: str) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def head(self, key: str) -> StoredObject | None:
        """Size and recorded sha256 of an object, or None when it does not exist."""

    @abstractmethod
    def content_sha256(self, key: str) -> str:
        """The sha256 of the stored bytes, read back (verification trusts no metadata)."""

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; a missing one is not an error."""


class LocalStorage(Storage):
    """A folder (local disk or a shared mount) laid out exactly like the bucket would be."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()

    def path_of(self, key: str) -> Path:
        return self.root / check_key(key)

    def uri(self, key: str) -> str:
        return self.path_of(key).as_uri()

    def describe(self) -> str:
        return f"local storage {self.root}"

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as error:
            raise StorageError(f"{action} {key!r} in {self.describe()}: {error.filename} does not "
                               "exist; run `lorafarm artifacts JOB` to see what was stored") from None
        except OSError as error:
            # A full or unmounted disk is an outage, not the job's fault: worth a retry later.
            raise StorageUnavailable(
                f"{action} {key!r} in {self.describe()} failed: {error.strerror or error}; check "
                "that the folder is mounted, writable and has free space "
                "(LORAFARM_STORAGE_DIR)") from None

    def put_file(self, path: Path, key: str, sha256: str) -> None:
        with self._errors("storing", key):
            write_atomically(self.path_of(key), lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors("storing", key):
            write_atomically(self.path_of(key), lambda tmp: tmp.write_bytes(data))

    def head(self, key: str) -> StoredObject | None:
        path = self.path_of(key)
        with self._errors("reading", key):
            if not path.is_file():
                return None
            # The real content hash, not a recorded one: local verification is end to end.
            return StoredObject(key, path.stat().st_size, sha256_of(path), self.uri(key))

    def content_sha256(self, key: str) -> str:
        with self._errors("reading", key):
            return sha256_of(self.path_of(key))

    def get_file(self, key: str, dest: Path) -> None:
        with self._errors("fetching", key):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path_of(key), dest)

    def get_bytes(self, key: str) -> bytes:
        with self._errors("reading", key):
            return self.path_of(key).read_bytes()

    def delete(self, key: str) -> None:
        with self._errors("deleting", key):
            self.path_of(key).unlink(missing_ok=True)


class S3Storage(Storage):
    """Any S3-compatible endpoint (AWS, MinIO, Ceph, R2, moto). Keys: the boto3 chain."""

    def __init__(self, bucket: str, *, endpoint_url: str = "", region: str = "",
                 multipart_threshold: int = 64 * MB, multipart_chunksize: int = 64 * MB,
                 max_attempts: int = 5, max_concurrency: int = 4):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.endpoint_url = endpoint_url or None
        config = Config(
            # Third-party servers reject the CRC checksums boto3 >= 1.36 sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=10, read_timeout=120,
            # MinIO/Ceph behind a plain host name need path-style URLs.
            s3={"addressing_style": "path"} if self.endpoint_url else {},
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=region or None, config=config)
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=multipart_chunksize,
                                       max_concurrency=max_concurrency)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{check_key(key)}"

    def describe(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS S3'}"

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as error:  # botocore/s3transfer raise many types; map them all
            raise s3_error(error, f"{action} {self.uri(key)}", self.describe()) from None

    def put_file(self, path: Path, key: str, sha256: str) -> None:
        with self._errors("uploading", key):
            self.client.upload_file(str(path), self.bucket, check_key(key), Config=self.transfer,
                                    ExtraArgs={"Metadata": {SHA256_META: sha256}})

    def put_bytes(self, key: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        with self._errors("uploading", key):
            self.client.put_object(Bucket=self.bucket, Key=check_key(key), Body=data,
                                   Metadata={SHA256_META: digest})

    def head(self, key: str) -> StoredObject | None:
        with self._errors("checking", key):
            try:
                answer = self.client.head_object(Bucket=self.bucket, Key=check_key(key))
            except Exception as error:
                if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        sha = (answer.get("Metadata") or {}).get(SHA256_META)
        return StoredObject(key, int(answer["ContentLength"]), sha, self.uri(key))

    def content_sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self._errors("reading back", key):
            body = self.client.get_object(Bucket=self.bucket, Key=check_key(key))["Body"]
            for chunk in body.iter_chunks(4 * MB):
                digest.update(chunk)
        return digest.hexdigest()

    def get_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors("downloading", key):
            self.client.download_file(self.bucket, check_key(key), str(dest), Config=self.transfer)

    def get_bytes(self, key: str) -> bytes:
        with self._errors("reading", key):
            return self.client.get_object(Bucket=self.bucket, Key=check_key(key))["Body"].read()

    def delete(self, key: str) -> None:
        with self._errors("deleting", key):
            self.client.delete_object(Bucket=self.bucket, Key=check_key(key))


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps (s3transfer wraps ClientError in S3UploadFailedError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
        last = getattr(current, "last_exception", None)
        if current is None and isinstance(last, BaseException):
            current = last


def _error_code(error: BaseException) -> str:
    for cause in _causes(error):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
    return ""


def s3_error(error: BaseException, what: str, where: str) -> StorageError:
    """Turn a botocore/s3transfer error into ours; says what to check, never a secret."""
    from botocore import exceptions as bx

    code = _error_code(error)
    causes = list(_causes(error))
    if any(isinstance(c, (bx.NoCredentialsError, bx.PartialCredentialsError,
                          bx.CredentialRetrievalError)) for c in causes):
        return StorageError(f"{what}: no usable S3 credentials for {where}; set AWS_ACCESS_KEY_ID "
                            "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role")
    if code in ("NoSuchBucket",):
        return StorageError(f"{what}: {where} does not exist; create the bucket or fix "
                            "LORAFARM_S3_BUCKET / LORAFARM_S3_ENDPOINT_URL")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
                "ExpiredToken", "InvalidToken"):
        return StorageError(f"{what}: {where} refused the credentials ({code}); check "
                            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy")
    if code.startswith("5") or code in ("InternalError", "ServiceUnavailable", "SlowDown",
                                        "RequestTimeout"):
        return StorageUnavailable(f"{what}: {where} answered {code}; the server is overloaded "
                                  "or down, the upload will be retried")
    if any(isinstance(c, (bx.ConnectionError, bx.HTTPClientError, ConnectionError, TimeoutError))
           for c in causes) or "RetriesExceeded" in type(error).__name__:
        return StorageUnavailable(f"{what}: cannot reach {where}; check LORAFARM_S3_ENDPOINT_URL "
                                  "and that the server is up (the upload will be retried)")
    kind = code or type(error).__name__
    return StorageError(f"{what}: {where} failed ({kind}); check the endpoint, bucket and "
                        "credentials settings")


def storage_from_settings(settings: Settings | None = None) -> Storage:
    """S3 when LORAFARM_S3_BUCKET is set, else a local folder with the same layout."""
    settings = settings or get_settings()
    if settings.s3_bucket:
        return S3Storage(settings.s3_bucket, endpoint_url=settings.s3_endpoint_url,
                         region=settings.s3_region,
                         multipart_threshold=settings.s3_multipart_threshold_mb * MB,
                         multipart_chunksize=settings.s3_multipart_chunksize_mb * MB,
                         max_attempts=settings.s3_max_attempts)
    return LocalStorage(settings.storage_dir or settings.output_root / "_storage")


def storage_holding(uri: str, key: str, settings: Settings | None = None) -> Storage:
    """The storage that holds ``key``, found from its URI as the ledger recorded it: a local folder
    is read where the worker wrote it, whatever this command's cwd or LORAFARM_STORAGE_DIR say;
    otherwise (S3, nothing recorded yet) the configured storage."""
    path = Path(url2pathname(urlsplit(uri).path)) if uri.startswith("file:") else None
    if path is not None and path.as_posix().endswith(f"/{key}") and path.is_file():
        return LocalStorage(Path(path.as_posix()[: -len(key) - 1]))
    return storage_from_settings(settings)
