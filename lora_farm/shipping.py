"""Shipping a finished job: archive its logs, upload, verify, mark complete, prune checkpoints.

Order matters and is the contract other parts rely on:

1. ``logs.tar.gz`` is (re)written and every file to ship (weights, the resolved config, the log
   archive, ``samples/``) is hashed into ``manifest.json``, with
   the attempt that owns the job folder (its fence): the only one whose trainer could write it;
2. the old ``_COMPLETE`` marker of this job (a previous attempt) is withdrawn;
3. each file is uploaded with its sha256 in the object metadata, then verified (size + sha256);
   a file already stored with the same size and hash is not sent again (a retry resumes);
4. ``manifest.json`` is uploaded and verified, and ``_COMPLETE`` is written last;
5. only then are the checkpoints pruned. Weights are never deleted locally.

Keys are ``<prefix>/<batch>/<job_id>/<path>``: a retried upload overwrites its own attempt and
nothing else. Any storage failure raises ``StorageError``; the job then waits in ``uploading``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lora_farm.archive import remove_checkpoints, write_log_archive
from lora_farm.errors import ArtifactMissing, StorageError
from lora_farm.jobs.spec import DEFAULT_BATCH
from lora_farm.protocol import Fence, JobDir
from lora_farm.settings import Settings, get_settings
from lora_farm.storage import Storage, sha256_of, storage_from_settings

MANIFEST_NAME = JobDir(Path()).manifest.name  # the same name locally and in storage
COMPLETE_NAME = "_COMPLETE"


@dataclass(frozen=True)
class ShipResult:
    """Where the job's files now live: ``uris`` maps each relative path to its URI."""

    uris: dict[str, str]
    manifest_uri: str


def job_prefix(batch: str | None, job_id: str, settings: Settings | None = None) -> str:
    prefix = (settings or get_settings()).s3_prefix.strip("/")
    parts = [prefix, batch or DEFAULT_BATCH, job_id]
    return "/".join(p for p in parts if p)


def weight_files(job_dir: Path) -> list[Path]:
    """Top-level ``*.safetensors`` and everything under diffusers/ and adapter/."""
    found = sorted(p for p in job_dir.glob("*.safetensors") if p.is_file())
    for folder in JobDir.WEIGHT_FOLDERS:
        found += sorted(p for p in (job_dir / folder).rglob("*") if p.is_file())
    return found


def sample_files(job_dir: Path) -> list[Path]:
    """``samples/``: prompts.json and every step's PNGs (llm: .txt completions)."""
    return sorted(p for p in JobDir(job_dir).samples.rglob("*") if p.is_file())


def files_to_ship(job_dir: Path) -> list[Path]:
    weights = weight_files(job_dir)
    if not weights:
        raise ArtifactMissing(
            f"{job_dir} holds no weights (*.safetensors, diffusers/ or adapter/); the trainer did "
            "not export, so there is nothing to ship: read train.log in that folder")
    extras = [p for p in (JobDir(job_dir).resolved_config, JobDir(job_dir).log_archive) if p.is_file()]
    return weights + extras + sample_files(job_dir)


def build_manifest(job_dir: Path, files: list[Path], job_id: str, batch: str | None, name: str,
                   storage: Storage, base_key: str, attempt: int | None = None) -> dict:
    """``attempt``: the one that made the files (the ledger's), else the job folder's fence."""
    entries = []
    for path in files:
        rel = path.relative_to(job_dir).as_posix()
        key = f"{base_key}/{rel}"
        entries.append({"path": rel, "key": key, "size": path.stat().st_size,
                        "sha256": sha256_of(path), "uri": storage.uri(key)})
    return {"format": 1, "job_id": job_id, "batch": batch or DEFAULT_BATCH, "name": name,
            "attempt": attempt or Fence(JobDir(job_dir).fence).current() or None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_uri": storage.uri(f"{base_key}/{MANIFEST_NAME}").rsplit("/", 1)[0],
            "files": entries}


def upload_verified(storage: Storage, path: Path, key: str, size: int, sha256: str) -> None:
    """Upload one file unless an intact copy is stored; then prove it arrived whole."""
    if _stored_intact(storage, key, size, sha256):
        return
    storage.put_file(path, key, sha256)
    if not _stored_intact(storage, key, size, sha256):
        stored = storage.head(key)
        got = "nothing" if stored is None else f"size {stored.size}, sha256 {stored.sha256}"
        raise StorageError(f"verification of {storage.uri(key)} failed: expected size {size}, "
                           f"sha256 {sha256}, storage reports {got}; the local file is kept, "
                           "run `lorafarm retry-upload JOB`")


def _stored_intact(storage: Storage, key: str, size: int, sha256: str) -> bool:
    """Size and recorded sha256 match, and so does the sha256 of the bytes read back (the
    recorded one is only what some writer claimed)."""
    stored = storage.head(key)
    return (stored is not None and stored.size == size and stored.sha256 == sha256
            and storage.content_sha256(key) == sha256)


def ship_job(job_dir: Path, job_id: str, batch: str | None, name: str, *,
             storage: Storage | None = None, settings: Settings | None = None,
             prune: bool = True, attempt: int | None = None) -> ShipResult:
    """Archive, upload, verify and mark one finished job complete (see the module docstring)."""
    settings = settings or get_settings()
    storage = storage or storage_from_settings(settings)
    job_dir = Path(job_dir)
    write_log_archive(job_dir)
    base_key = job_prefix(batch, job_id, settings)
    manifest = build_manifest(job_dir, files_to_ship(job_dir), job_id, batch, name, storage, base_key,
                              attempt)
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    (job_dir / MANIFEST_NAME).write_bytes(manifest_bytes)

    storage.delete(f"{base_key}/{COMPLETE_NAME}")
    for entry in manifest["files"]:
        upload_verified(storage, job_dir / entry["path"], entry["key"], entry["size"], entry["sha256"])
    manifest_key = f"{base_key}/{MANIFEST_NAME}"
    upload_verified(storage, job_dir / MANIFEST_NAME, manifest_key, len(manifest_bytes),
                    sha256_of(job_dir / MANIFEST_NAME))
    marker = {"manifest_sha256": sha256_of(job_dir / MANIFEST_NAME), "completed": manifest["created"]}
    storage.put_bytes(f"{base_key}/{COMPLETE_NAME}", json.dumps(marker).encode())
    if prune:
        remove_checkpoints(job_dir)
    return ShipResult({e["path"]: e["uri"] for e in manifest["files"]}, storage.uri(manifest_key))


def read_manifest(storage: Storage, batch: str | None, job_id: str,
                  settings: Settings | None = None) -> dict:
    """The stored manifest of a job whose upload completed (its ``_COMPLETE`` marker checks it)."""
    base_key = job_prefix(batch, job_id, settings)
    marker = storage.head(f"{base_key}/{COMPLETE_NAME}")
    if marker is None:
        raise StorageError(f"job {job_id} has no complete upload in {storage.describe()} "
                           f"(no {storage.uri(base_key + '/' + COMPLETE_NAME)}); if it is waiting in "
                           f"`uploading`, run `lorafarm retry-upload {job_id}`")
    expected = json.loads(storage.get_bytes(f"{base_key}/{COMPLETE_NAME}"))["manifest_sha256"]
    raw = storage.get_bytes(f"{base_key}/{MANIFEST_NAME}")
    if hashlib.sha256(raw).hexdigest() != expected:
        raise StorageError(f"the manifest of job {job_id} in {storage.describe()} does not match "
                           f"its _COMPLETE marker; run `lorafarm retry-upload {job_id}`")
    return json.loads(raw)


def fetch_job(storage: Storage, batch: str | None, job_id: str, dest: Path,
              settings: Settings | None = None) -> list[Path]:
    """Download every file of a job's manifest into ``dest`` and check each sha256."""
    manifest = read_manifest(storage, batch, job_id, settings)
    dest = Path(dest).resolve()
    fetched = []
    for entry in manifest["files"]:
        target = (dest / entry["path"]).resolve()
        if not target.is_relative_to(dest):
            raise StorageError(f"manifest entry {entry['path']!r} of job {job_id} escapes {dest}")
        storage.get_file(entry["key"], target)
        if target.stat().st_size != entry["size"] or sha256_of(target) != entry["sha256"]:
            target.unlink()
            raise StorageError(f"{entry['uri']} arrived corrupted (size or sha256 differs from "
                               f"the manifest); deleted the copy, run `lorafarm fetch` again")
        fetched.append(target)
    return fetched
