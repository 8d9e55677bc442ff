"""The trainer as an operating-system process: its command line, environment and start.

The trainer runs in its own session (so its own process group): a Ctrl-C on the worker's terminal
never reaches it, and whatever it starts (DataLoader workers, ranks) can be killed with it
(``process_group.stop_group``: SIGTERM to the trainer alone, SIGKILL to the group after the
grace). It runs at lower CPU and I/O priority so the worker and Redis stay responsive.

Its stdin is its lifeline (``protocol.LIFELINE_ENV``): a pipe whose write end only the runner
holds, so when the runner dies by any means (SIGKILL of the worker's group, host loss) the
trainer reads EOF and stops (trainers/entry.py), though it is in another session.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import psutil

from lora_farm.process_group import spawn_in_own_group
from lora_farm.protocol import LIFELINE_ENV, JobDir

log = logging.getLogger(__name__)

NICE = 10
# the trainer needs neither storage credentials nor the broker: it gets data paths, not secrets
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "LORAFARM_REDIS_URL")


def trainer_argv(resolved_spec: Path, job_dir: Path, events: Path) -> list[str]:
    """``python -m lora_farm.trainers JOB_FILE --resolved --job-dir DIR --events PATH``."""
    return [sys.executable, "-m", "lora_farm.trainers", str(resolved_spec), "--resolved",
            "--job-dir", str(job_dir), "--events", str(events)]


def trainer_env(pinned: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _SECRET_ENV}
    # unbuffered: progress lines reach train.log as they happen
    return {**env, **pinned, **extra, "PYTHONUNBUFFERED": "1"}


def spawn(argv: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path,
          wait_seconds: float = 0.0) -> subprocess.Popen:
    """Start the trainer in a new session in the job folder ``cwd``, stdout+stderr appended to
    ``log_path``; close ``process.stdin`` once it has exited.

    A trainer of an earlier attempt that still lives (another host's, fenced out and on its way
    out) holds the job folder's ``trainer.lock``: wait up to ``wait_seconds`` for it to end. The
    new trainer inherits the lock, so it is held exactly while a process of it lives (DataLoader
    workers included; a SIGKILL releases it too)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(JobDir(cwd).trainer_lock, "a") as lock, open(log_path, "ab") as log_file:
        _wait_for_lock(lock, wait_seconds)
        process = spawn_in_own_group(argv, env={**env, LIFELINE_ENV: "stdin"}, cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=log_file,
                                     stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),))
    _lower_priority(process.pid)
    return process


def _wait_for_lock(lock: IO[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.warning("%s: the trainer of an earlier attempt still runs after %.0fs; "
                            "starting anyway (it is fenced out)", lock.name, seconds)
                return None
            time.sleep(0.1)


def _lower_priority(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        proc.nice(NICE)
        if hasattr(psutil, "IOPRIO_CLASS_BE"):
            proc.ionice(psutil.IOPRIO_CLASS_BE, 7)
    except (psutil.Error, OSError) as error:  # not fatal: the job just runs at normal priority
        log.warning("could not lower the priority of trainer %d: %s", pid, error)
