"""The ``uploading`` step: ship a trained job's files, then ``succeeded``; storage down -> the job
waits in ``uploading`` (weights on disk) and is tried again later.

Used by the runner right after training, by the reaper for waiting uploads (backing off from
``upload_retry_seconds`` to ``upload_retry_max_seconds``) and by ``lorafarm retry-upload``
through :func:`retry_upload`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lora_farm.backoff import backoff_seconds
from lora_farm.errors import ArtifactMissing, JobNotFound, LoraFarmError, StorageError
from lora_farm.jobs.state import JobState
from lora_farm.ledger import JobRecord, Ledger
from lora_farm.ledger import transitions as tr
from lora_farm.locks import RedisLock, kept_alive
from lora_farm.settings import Settings
from lora_farm.workers import lifecycle

log = logging.getLogger(__name__)


def ship_and_finish(ledger: Ledger, job_id: str, job_dir: Path,
                    settings: Settings | None = None) -> tr.Result:
    """One upload attempt of a job in ``uploading``; returns the record after it.

    Success -> ``succeeded`` with the artifact URIs. A storage failure keeps it ``uploading``
    with the error and the time of the next try; missing weights (a trainer bug) -> ``failed``.
    """
    from lora_farm.shipping import ship_job  # boto3 is loaded only where something is shipped

    settings = settings or ledger.settings
    record = ledger.get(job_id)
    try:
        result = ship_job(Path(job_dir), job_id, record.batch, record.name, settings=settings,
                          attempt=record.attempt)
    except ArtifactMissing as error:
        return lifecycle.upload_impossible(ledger, job_id, str(error))
    except StorageError as error:
        tries = record.upload_tries + 1
        wait = backoff_seconds(tries, settings.upload_retry_seconds, settings.upload_retry_max_seconds)
        log.warning("job %s: upload failed (try %d), next try in %.0fs: %s", job_id, tries, wait, error)
        ledger.update(job_id, {"upload_tries": tries, "next_upload_at": time.time() + wait})
        return tr.upload_waits(ledger, job_id, str(error))
    return lifecycle.uploaded(ledger, job_id, result.uris, result.manifest_uri)


def retry_upload(ledger: Ledger, job_id: str, settings: Settings | None = None) -> JobRecord:
    """Try the upload of a job waiting in ``uploading`` now (`lorafarm retry-upload JOB`).

    Holds the job lock while it ships, so the reaper or a second command never uploads the same
    job at the same time. Raises ``LoraFarmError`` when the job is not waiting for an upload.
    """
    settings = settings or ledger.settings
    record = ledger.find(job_id)
    if record.state != JobState.UPLOADING.value:
        raise LoraFarmError(f"job {record.id} is `{record.state}`, not `uploading`: there is no "
                            f"upload to retry. `lorafarm status {record.id}` shows it.")
    lock = RedisLock(ledger.client, ledger.keys.job_lock(record.id), settings.stale_after_seconds)
    if not lock.acquire():
        raise LoraFarmError(f"job {record.id} is being worked on by {lock.holder()}; try again "
                            "in a minute.")
    with lock, kept_alive(lock, settings.heartbeat_seconds):
        after = ship_and_finish(ledger, record.id, Path(record.job_dir), settings=settings)
    if isinstance(after, tr.Refused):
        raise JobNotFound(f"job {record.id} left `uploading` while the upload ran.")
    return after
