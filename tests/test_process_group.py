"""Process groups (lora_farm/process_group.py), with real processes: a stop SIGTERMs the leader
alone and SIGKILLs what is left of its group after the grace; gone groups are no error."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from lora_farm.process_group import (
    group_alive,
    kill_group,
    signal_group,
    spawn_in_own_group,
    stop_group,
    terminate_then_kill,
)

# a leader that exits on SIGTERM, leaving a child in its group that ignores SIGTERM
LEADER = """
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                  "signal.SIG_IGN); print('child', flush=True); time.sleep(600)"])
time.sleep(600)
"""


def start_leader() -> subprocess.Popen:
    leader = spawn_in_own_group([sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True)
    assert leader.stdout.readline().strip() == "child"
    return leader


def test_stop_group_sigterms_the_leader_then_kills_the_rest_after_the_grace():
    leader = start_leader()
    started = time.monotonic()
    assert stop_group(leader, grace_seconds=2) == -signal.SIGTERM  # the leader got SIGTERM
    assert time.monotonic() - started >= 2  # its child ignored it: killed after the grace
    assert not group_alive(leader.pid)


def test_stop_group_without_sigterm_only_waits_and_kills():
    leader = start_leader()
    assert stop_group(leader, grace_seconds=1, sigterm=False) == -signal.SIGKILL
    assert not group_alive(leader.pid)


def test_a_gone_group_is_no_error():
    process = spawn_in_own_group([sys.executable, "-c", "pass"])
    process.wait()
    signal_group(process.pid, signal.SIGTERM)
    assert not kill_group(process.pid)
    assert not group_alive(process.pid)


def test_terminate_then_kill_stops_several_with_one_grace():
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                                 "signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
                                 "time.sleep(600)"], stdout=subprocess.PIPE)
    stubborn.stdout.readline()
    started = time.monotonic()
    terminate_then_kill([polite, stubborn], 2, alive=lambda p: p.poll() is None,
                        send=lambda p, sig: p.send_signal(sig))
    assert 2 <= time.monotonic() - started < 10
    assert (polite.wait(), stubborn.wait()) == (-signal.SIGTERM, -signal.SIGKILL)
