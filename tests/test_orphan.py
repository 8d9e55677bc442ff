"""The orphan fault (issue 10): two worker hosts share one Redis prefix and one filesystem; the
host running a job loses its whole worker process group to SIGKILL. Its trainer, in a session of
its own, must not train on beside the next attempt: it stops by itself (the lifeline), the other
host's reaper requeues the job once the lease has expired, and the job succeeds once, with the
artifacts of its last attempt.

The hosts are two ``LORAFARM_HOSTNAME`` identities on this machine, each with its own declared
card and real ``celery worker``. A sampler looks at the process table every 50 ms.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from lora_farm.protocol import read_events
from lora_farm.settings import reload_settings
from lora_farm.submit import submit_files
from tests.fixtures_farm import WorkerPool, all_done, checkpoint_events, wait_until, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
HOSTS = {"host-a": "a0", "host-b": "b0"}
FAST = {"LORAFARM_HEARTBEAT_SECONDS": "0.5", "LORAFARM_STALE_AFTER_SECONDS": "5"}


class TrainerSampler(threading.Thread):
    """Every 50 ms: the process groups of the job's live trainers (its id is in their argv)."""

    def __init__(self, job_id: str):
        super().__init__(daemon=True)
        self.job_id = job_id
        self.samples: list[tuple[float, frozenset[int]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.samples.append((time.time(), frozenset(self.trainer_groups())))

    def trainer_groups(self) -> set[int]:
        groups = set()
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            argv = proc.info["cmdline"] or []
            if ("lora_farm.trainers" in argv and any(self.job_id in arg for arg in argv)
                    and proc.info["status"] != psutil.STATUS_ZOMBIE):
                try:
                    groups.add(os.getpgid(proc.info["pid"]))
                except OSError:  # it ended meanwhile
                    continue
        return groups

    def seen(self, group: int) -> tuple[float, float]:
        times = [t for t, groups in self.samples if group in groups]
        return min(times), max(times)


@pytest.fixture
def hosts(farm_env, ledger, tmp_path, monkeypatch):
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    reload_settings()
    pools = {}
    for host, card in HOSTS.items():
        env = {**farm_env, **FAST, "LORAFARM_HOSTNAME": host, "LORAFARM_GPUS": f"{card}:24GiB"}
        (tmp_path / host).mkdir()
        pools[host] = WorkerPool(env, ledger, tmp_path / host)
    try:
        for host, card in HOSTS.items():
            pools[host].start(card, concurrency=1, timeout=300)
        yield pools
    finally:
        for pool in pools.values():
            pool.stop_all()


def test_a_dead_hosts_trainer_never_runs_beside_the_next_attempt(ledger, hosts, tiny_llm,
                                                                  text_dataset, tmp_path):
    spec = write_spec(tmp_path, "orphan", tiny_llm, text_dataset, "llm", vram_gb=8,
                      max_steps=150, save_steps=3)
    job_id = submit_files([spec], ledger, batch="o").jobs[0].record.id
    sampler = TrainerSampler(job_id)
    sampler.start()
    try:
        wait_until(lambda: checkpoint_events(ledger.get(job_id)), 300, "a first checkpoint",
                   poll=0.02)
        first = ledger.get(job_id)
        assert first.state == "running" and first.attempt == 1 and (first.step or 0) < 150
        dead, = [pool for host, pool in hosts.items() if host == first.host]
        survivor = next(host for host in hosts if host != first.host)
        killed_at = time.time()
        dead.kill(next(iter(dead.processes.values())))  # the worker's whole process group
        (record,) = wait_until(lambda: all_done(ledger, [job_id]), 600, "the job",
                               hosts[survivor])
    finally:
        sampler.done.set()
        sampler.join()
    assert record.state == "succeeded", record.exit_reason
    assert (record.attempt, record.host) == (2, survivor)

    # never two trainers of the job at one sampled instant; the orphan went before the retry
    assert max(len(groups) for _, groups in sampler.samples) == 1
    orphan, retry = sorted({g for _, gs in sampler.samples for g in gs},
                           key=lambda group: sampler.seen(group)[0])
    assert orphan == first.pid
    orphan_gone = sampler.seen(orphan)[1]
    retry_seen = sampler.seen(retry)[0]
    timeline = ledger.timeline(job_id)
    requeued = next(e["t"] for e in timeline if e["to"] == "queued" and e.get("attempt") == 2)
    running_again = next(e["t"] for e in timeline if e["to"] == "running" and e.get("attempt") == 2)
    print(f"\nhost {first.host} SIGKILLed; its orphaned trainer gone after "
          f"{orphan_gone - killed_at:.2f}s; requeued after {requeued - killed_at:.2f}s; the job "
          f"running again on {survivor} after {running_again - killed_at:.2f}s (its trainer seen "
          f"after {retry_seen - killed_at:.2f}s)")
    assert orphan_gone - killed_at < 15  # a step, a checkpoint: no lease, no Redis needed

    # the orphan stopped at a checkpoint of its own (unless the next attempt's fence came first:
    # then it wrote nothing more); the retry resumed from the last checkpoint it wrote
    events = list(read_events(Path(record.job_dir) / "events.jsonl"))
    mine = [e for e in events if e.get("attempt") == 1]
    last_saved = max(e["step"] for e in mine if e["event"] == "checkpoint")
    (resumed,) = [e for e in events if e["event"] == "start" and e.get("attempt") == 2]
    assert resumed["attempt_resume_step"] == last_saved
    if mine[-1]["event"] == "error":
        assert (mine[-1]["kind"], mine[-1]["step"]) == ("interrupted", last_saved)
    print("the orphan " + ("checkpointed on its way out" if mine[-1]["event"] == "error" else
                           "was fenced out before its last checkpoint"))

    # succeeded once; its artifacts are the last attempt's
    assert [e["to"] for e in ledger.timeline(job_id)].count("succeeded") == 1
    assert {e.get("attempt") for e in events if e["event"] in ("artifact", "summary")} == {2}
    manifest = json.loads((Path(record.job_dir) / "manifest.json").read_text())
    assert manifest["attempt"] == 2
    weights = Path(record.job_dir) / "adapter" / "adapter_model.safetensors"
    assert weights.stat().st_mtime > running_again
