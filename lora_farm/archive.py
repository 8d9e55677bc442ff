"""The log archive of a job (``logs.tar.gz``) and the pruning of its checkpoints.

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
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
ARCHIVE_NAME = "logs.tar.gz"
CHECKPOINTS_DIR = "checkpoints"
# Files and folders (relative to job_dir) that go into the archive when present.
ARCHIVED = ("config.resolved.yaml", "events.jsonl", "tensorboard")


def archive_members(job_dir: Path) -> list[Path]:
    """Every top-level ``*.log`` (train.log, the runner's log) plus the fixed list, sorted."""
    members = sorted(p for p in job_dir.glob("*.log") if p.is_file())
    members += [job_dir / name for name in ARCHIVED if (job_dir / name).exists()]
    return members


def write_log_archive(job_dir: Path) -> Path:
    """(Re)write ``job_dir/logs.tar.gz``; atomic, so a reader never sees half an archive."""
    job_dir = Path(job_dir)
    target = job_dir / ARCHIVE_NAME
    tmp = job_dir / f".{ARCHIVE_NAME}.{uuid.uuid4().hex}.part"
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for member in archive_members(job_dir):
                tar.add(member, arcname=member.relative_to(job_dir).as_posix(),
                        filter=_regular_files_only)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
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


def prune_checkpoints(job_dir: Path, keep: int = 0) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns what was removed.

    Called after a verified upload only: until then a checkpoint is the way back.
    """
    folder = Path(job_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    checkpoints = sorted(p for p in folder.iterdir() if p.is_dir())
    doomed = checkpoints[:-keep] if keep > 0 else checkpoints
    for path in doomed:
        shutil.rmtree(path)
    if keep == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed
