"""The trainer as an operating-system process: spawn it isolated, stop its whole group.

The trainer runs in its own session (so its own process group): a Ctrl-C on the worker's terminal
never reaches it, and whatever it starts (DataLoader workers, ranks) can be killed with it. A stop
asks the trainer alone (SIGTERM: it checkpoints and shuts its helpers down), then SIGKILLs the
whole group after the grace. It runs at lower CPU and I/O priority so the worker and Redis stay
responsive.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

NICE = 10
# the trainer needs neither storage credentials nor the broker: it gets data paths, not secrets
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "LORAFARM_REDIS_URL")


def trainer_argv(resolved_spec: Path, job_dir: Path, events: Path) -> list[str]:
    """``python -m lora_farm.trainers JOB_FILE --job-dir DIR --events PATH`` (docs/internals.md)."""
    return [sys.executable, "-m", "lora_farm.trainers", str(resolved_spec),
            "--job-dir", str(job_dir), "--events", str(events)]


def trainer_env(pinned: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _SECRET_ENV}
    env.update(pinned)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"  # progress lines reach train.log as they happen
    return env


def spawn(argv: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start the trainer in a new session, stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True, close_fds=True)
    _lower_priority(process.pid)
    return process


def _lower_priority(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        proc.nice(NICE)
        if hasattr(psutil, "IOPRIO_CLASS_BE"):
            proc.ionice(psutil.IOPRIO_CLASS_BE, 7)
    except (psutil.Error, OSError) as error:  # not fatal: the job just runs at normal priority
        log.warning("could not lower the priority of trainer %d: %s", pid, error)


def stop_group(process: subprocess.Popen, grace_seconds: float, sigterm: bool = True) -> int:
    """SIGTERM the trainer (its group's leader) only, wait ``grace_seconds`` for the group to
    end, then SIGKILL what is left of the group.

    Not the whole group: DataLoader workers (``num_workers > 0``) would die of it and crash the
    trainer before it can checkpoint; the trainer shuts them down itself, and the ``gpus: N``
    launcher forwards the signal to its ranks. ``sigterm=False``: someone else has sent it
    already (a worker shutdown); only wait and SIGKILL. Returns the trainer's exit status; waits
    until no process of the group remains.
    """
    pgid = process.pid  # start_new_session made the trainer its group's leader
    if sigterm and process.poll() is None:  # a reaped leader's pid may be someone else's now
        signal_leader(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and _group_alive(pgid, process):
        time.sleep(0.1)
    if _group_alive(pgid, process):
        log.warning("trainer group %d still alive %.0fs after SIGTERM: SIGKILL", pgid, grace_seconds)
        signal_group(pgid, signal.SIGKILL)
    returncode = process.wait()
    _wait_group_gone(pgid, timeout=10)
    return returncode


def signal_leader(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the trainer process alone; one that is gone already is no error."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_stale_group(pgid: int) -> bool:
    """SIGKILL a group left behind by a runner that died (reaper, same host only)."""
    if not group_exists(pgid):
        return False
    signal_group(pgid, signal.SIGKILL)
    return True


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group; a group that is gone already is no error."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int, process: subprocess.Popen) -> bool:
    process.poll()  # reap the leader so it does not linger as a zombie member
    return group_exists(pgid) and _has_live_member(pgid)


def _has_live_member(pgid: int) -> bool:
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return False


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _has_live_member(pgid):
        time.sleep(0.1)
    if _has_live_member(pgid):
        signal_group(pgid, signal.SIGKILL)
