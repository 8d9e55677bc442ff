"""The log archive of a job (``logs.tar.gz``) and the removal of its checkpoints after upload.

``write_log_archive`` runs at every end of a job (succeeded, failed, cancelled, timed out): the
log, the resolved config, the progress events and the TensorBoard events are what one needs to
understand a run afterwards, and they fit in one small file next to the weights. Shipping writes
it on success; :func:`archive_at_end` on every other end (runner, reaper, `lorafarm cancel`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from pathlib import Path

from lora_farm.protocol import JobDir
from lora_farm.storage import write_atomically

log = logging.getLogger(__name__)


def archive_members(job_dir: Path) -> list[Path]:
    """Every top-level ``*.log`` (train.log, the runner's log) plus the fixed list, sorted."""
    folder = JobDir(job_dir)
    return (sorted(p for p in job_dir.glob("*.log") if p.is_file())
            + [p for p in (folder.resolved_config, folder.events, folder.tensorboard) if p.exists()])


def write_log_archive(job_dir: Path) -> Path:
    """(Re)write ``job_dir/logs.tar.gz``; atomic, so a reader never sees half an archive."""
    job_dir = Path(job_dir)
    target = JobDir(job_dir).log_archive

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for member in archive_members(job_dir):
                tar.add(member, arcname=member.relative_to(job_dir).as_posix(),
                        filter=_regular_files_only)

    write_atomically(target, write)
    return target


def archive_at_end(job_dir: str | os.PathLike[str] | None) -> Path | None:
    """:func:`write_log_archive` for a job that ended without shipping (failed, cancelled, timed
    out). A job that never ran has no folder: nothing to do. A disk error is logged, not raised:
    the job must reach its final state all the same."""
    if not job_dir or not Path(job_dir).is_dir():
        return None
    try:
        return write_log_archive(Path(job_dir))
    except OSError as error:
        log.warning("log archive not written in %s: %s", job_dir, error)
        return None


def _regular_files_only(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # Links could point outside the job folder; the archive holds plain files and folders.
    return info if info.isfile() or info.isdir() else None


def remove_checkpoints(job_dir: Path) -> None:
    """Delete every checkpoint of a finished job (none is no error).

    Called after a verified upload only: until then a checkpoint is the way back. (The trainer's
    ``checkpoint.prune_checkpoints`` keeps the newest N while it trains.)
    """
    shutil.rmtree(JobDir(Path(job_dir)).checkpoints, ignore_errors=True)
