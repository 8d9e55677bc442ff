"""Process groups, one set of rules for the farm and the trainers (torch-free, farm-free).

The trainer, and the local farm's Redis, workers and Flower, each lead their own session: a Ctrl-C
on the starting terminal never reaches them, and what they start goes with them. A stop is always
SIGTERM, a grace, then SIGKILL of what is left. A process or group already gone is no error.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import psutil

log = logging.getLogger(__name__)
T = TypeVar("T")


def spawn_in_own_group(argv: Sequence[str], **popen: Any) -> subprocess.Popen:
    """Start ``argv`` in a new session: its pid is the group's id."""
    return subprocess.Popen(list(argv), start_new_session=True, **popen)


def signal_process(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to one process alone."""
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a whole group (one whose id was reused by another user's is left alone)."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except OSError as error:
        return not isinstance(error, ProcessLookupError)  # PermissionError: it exists
    return True


def group_alive(pgid: int) -> bool:
    """Whether a member of the group still runs (zombies waiting to be reaped do not count)."""
    if not group_exists(pgid):
        return False
    for proc in psutil.process_iter(["pid"]):
        with suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def kill_group(pgid: int) -> bool:
    """SIGKILL a group (e.g. one left behind by a runner that died); False: there was none."""
    exists = group_exists(pgid)
    signal_group(pgid, signal.SIGKILL)
    return exists


def stop_group(process: subprocess.Popen, grace_seconds: float, sigterm: bool = True) -> int:
    """SIGTERM the group's leader ``process`` only, wait ``grace_seconds`` for the group to end,
    SIGKILL what is left; returns the leader's exit status once no process of the group remains.

    Not the whole group: a trainer's DataLoader workers (``num_workers > 0``) would die of it and
    crash the trainer before it can checkpoint; the trainer shuts them down itself, and the
    ``gpus: N`` launcher forwards the signal to its ranks. ``sigterm=False``: someone else has
    sent it already (a worker shutdown); only wait and SIGKILL."""
    pgid = process.pid  # start_new_session made it its group's leader
    if sigterm and process.poll() is None:  # a reaped leader's pid may be someone else's now
        signal_process(pgid, signal.SIGTERM)
    # poll() reaps the leader, so it does not linger as a zombie member
    wait_while(lambda: process.poll() is None or group_alive(pgid), grace_seconds)
    if group_alive(pgid):
        log.warning("process group %d still alive %.0fs after SIGTERM: SIGKILL", pgid, grace_seconds)
        signal_group(pgid, signal.SIGKILL)
    returncode = process.wait()
    wait_while(lambda: group_alive(pgid), 10)
    if group_alive(pgid):
        signal_group(pgid, signal.SIGKILL)
    return returncode


def terminate_then_kill(targets: Sequence[T], grace_seconds: float, alive: Callable[[T], bool],
                        send: Callable[[T, signal.Signals], None]) -> None:
    """Stop several at once: SIGTERM each live one, wait until none lives or ``grace_seconds``
    passed, SIGKILL the ones still alive. ``send`` signals one target (its process or group)."""
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 0)):
        for target in [t for t in targets if alive(t)]:
            send(target, sig)
        wait_while(lambda: any(alive(t) for t in targets), wait)


def signal_running(children: Iterable[subprocess.Popen], sig: signal.Signals | int) -> None:
    """Send ``sig`` to each child that still runs."""
    for child in [c for c in children if c.poll() is None]:
        child.send_signal(sig)


@contextmanager
def forwarding_signals(children: Sequence[subprocess.Popen]) -> Iterator[None]:
    """While inside: a SIGTERM or SIGINT to this process goes on to each child still running."""
    forward = lambda number, _frame: signal_running(children, number)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_while(condition: Callable[[], bool], seconds: float) -> None:
    """Until ``condition`` is false or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and condition():
        time.sleep(0.1)
