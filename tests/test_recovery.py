"""Recovery that does not wait on luck: the dispatch and reaper leases, the re-placing of jobs sent
to a card whose worker is gone, and a real farm (`lorafarm worker` on a private, AOF-backed
redis-server) through a Redis restart and the death of one of its Celery workers.

The farm test prints its figures (run with ``-s``):
    .venv/bin/pytest tests/test_recovery.py -k farm -s
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from lora_farm.jobs.loader import load_spec_file
from lora_farm.jobs.spec import LlmJobSpec
from lora_farm.ledger import Ledger, NewJob
from lora_farm.ledger import transitions as tr
from lora_farm.locks import kept_alive, lease
from lora_farm.redis_conn import make_client
from lora_farm.settings import get_settings
from lora_farm.workers.dispatch import LOST_BEATS, publish_gpu
from lora_farm.workers.reaper import reap
from tests.fixtures_farm import all_done, kill_job_trainers, wait_until, write_spec


def in_thread(call):
    """``call()`` run in a thread of its own (another lease holder of this process)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    thread.join()
    return out[0]


def test_a_lease_lapses_within_its_period_and_its_living_holder_takes_it_again(ledger):
    key = ledger.keys.reaper_lock
    holder = lease(ledger.client, key, 0.5)
    assert holder.acquire()
    assert not in_thread(lambda: lease(ledger.client, key, 0.5).acquire())  # another holder
    # the holder could not release it (Redis was away): its next pass takes it again at once
    assert lease(ledger.client, key, 0.5).acquire()
    time.sleep(0.6)  # a holder that died: nobody waits longer than the period
    other = in_thread(lambda: lease(ledger.client, key, 0.5))
    assert other.acquire() and ledger.client.get(key) == other.token != holder.token


def test_a_lease_kept_alive_outlives_its_period(ledger):
    lock = lease(ledger.client, ledger.keys.dispatch_lock, 0.4)
    assert lock.acquire()
    with kept_alive(lock):
        time.sleep(1.0)
        assert ledger.client.get(ledger.keys.dispatch_lock) == lock.token
    assert not in_thread(lambda: lease(ledger.client, ledger.keys.dispatch_lock, 0.4).acquire())


def scheduled_job(ledger: Ledger, tmp_path: Path, gpu: str, at: float) -> str:
    spec = LlmJobSpec(name=f"on-{gpu}", base_model=tmp_path, train_data_dir=tmp_path)
    job_id = ledger.create_jobs([NewJob(spec, "recovery", 0, 100.0)])[0].record.id
    tr.schedule(ledger, job_id, [gpu], 100.0, token="t")
    ledger.update(job_id, {"scheduled_at": at})
    return job_id


def card(ledger: Ledger, gpu: str, heartbeat: float, since: float) -> None:
    info = {"uuid": gpu, "host": "h", "total_mb": 24576, "free_mb": 24576, "since": since}
    publish_gpu(ledger, info, f"gpu-{gpu}@h", 2, now=heartbeat)


def test_the_reaper_replaces_jobs_whose_card_worker_is_gone_or_restarted(ledger, farm_env,
                                                                          tmp_path):
    """A scheduled job goes back to the queue within LOST_BEATS heartbeat periods of its card's
    worker dying (or restarting after the message was sent), not after stale_after_seconds."""
    settings = get_settings()
    beat, now = settings.heartbeat_seconds, time.time()
    assert LOST_BEATS * beat < settings.stale_after_seconds
    card(ledger, "alive", heartbeat=now, since=now - 600)
    card(ledger, "dead", heartbeat=now - (LOST_BEATS + 1) * beat, since=now - 600)
    card(ledger, "restarted", heartbeat=now, since=now - (LOST_BEATS + 1) * beat)
    card(ledger, "restarting", heartbeat=now, since=now - beat)
    sent = now - (LOST_BEATS + 2) * beat
    jobs = {gpu: scheduled_job(ledger, tmp_path, gpu, sent)
            for gpu in ("alive", "dead", "restarted", "restarting", "unknown")}
    actions = reap(ledger, settings, now=now)
    states = {gpu: ledger.get(job_id).state for gpu, job_id in jobs.items()}
    assert states == {"alive": "scheduled", "dead": "queued", "restarted": "queued",
                      "restarting": "scheduled", "unknown": "queued"}, actions
    reasons = {gpu: ledger.timeline(jobs[gpu])[-1]["reason"] for gpu in ("dead", "restarted")}
    assert reasons == {"dead": "the worker of dead is gone (no heartbeat for 3 periods)",
                       "restarted": "the worker of restarted restarted after the job was sent to it"}
    assert ledger.get(jobs["dead"]).attempt == 1 and jobs["dead"] not in ledger.reservations()


def test_the_supervisor_restarts_a_worker_that_exits_and_gives_up_on_a_crash_loop(monkeypatch,
                                                                                  capsys):
    """Real child processes under ``launch._supervise``: one exits at once each time (exit 3), the
    other runs on; the first is restarted with backoff until the crash-loop limit, then the other
    is stopped and the supervisor exits 1."""
    from lora_farm.workers import launch

    monkeypatch.setattr(launch, "RESTART_FIRST", 0.05)
    monkeypatch.setattr(launch, "RESTART_MOST", 0.2)
    started: list[str] = []

    def start(card: str) -> subprocess.Popen:
        started.append(card)
        code = "raise SystemExit(3)" if card == "bad" else "import time; time.sleep(60)"
        return subprocess.Popen([sys.executable, "-c", code])

    processes = {card: start(card) for card in ("bad", "good")}
    good = processes["good"]
    assert launch._supervise(processes, start, []) == 1
    assert started.count("bad") == launch.MAX_RESTARTS + 1 and started.count("good") == 1
    assert good.returncode == -signal.SIGTERM
    said = capsys.readouterr()
    assert said.err.count("exited with code 3; restarting it in") == launch.MAX_RESTARTS
    assert f"exited {launch.MAX_RESTARTS + 1} times in 300s (last code 3): a crash loop" in said.err
    assert said.out.count("lorafarm: restarted the worker of bad") == launch.MAX_RESTARTS


# ---- a real farm on a private Redis ----------------------------------------------------------

class PrivateRedis:
    """A redis-server of this test on a free port, append-only (fsync always), killable."""

    def __init__(self, folder: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                     "--appendonly", "yes", "--appendfsync", "always", "--dir", str(folder),
                     "--save", ""]
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it; returns the time it answered."""
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL)
        client = make_client(self.url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client.ping()
                return time.time()
            except Exception:  # noqa: BLE001 - loading the AOF
                time.sleep(0.02)
        raise RuntimeError("the private redis-server did not answer in 30 s")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def workers_by_gpu(ledger: Ledger) -> dict[str, dict]:
    return {w["gpu"]: w for w in map(json.loads, ledger.client.hgetall(ledger.keys.workers).values())}


def kill_worker(pid: int) -> None:
    """SIGKILL a Celery worker and its pool (its runners), as a crash would; trainers live on."""
    for process in [*psutil.Process(pid).children(), psutil.Process(pid)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def moved(ledger: Ledger, job_id: str, source: str, to: str, nth: int = 1) -> float | None:
    """When the job made its ``nth`` move ``source`` -> ``to`` (its timeline), else None."""
    times = [e["t"] for e in ledger.timeline(job_id) if e.get("from") == source and e["to"] == to]
    return times[nth - 1] if len(times) >= nth else None


@pytest.mark.slow
def test_a_farm_recovers_from_a_redis_restart_and_a_dead_worker(farm_env, farm_prefix, tmp_path,
                                                                tiny_llm, text_dataset):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server binary not installed")
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    env = {**farm_env, "LORAFARM_REDIS_URL": server.url,
           "LORAFARM_GPUS": "gpu0:24GiB,gpu1:24GiB,gpu2:24GiB"}  # gpu2: no worker serves it
    ledger = Ledger(make_client(server.url), farm_prefix)
    beat = float(env["LORAFARM_HEARTBEAT_SECONDS"])
    log = open(tmp_path / "lorafarm-worker.log", "wb")
    launcher = subprocess.Popen([sys.executable, "-m", "lora_farm", "worker", "--gpus", "gpu0,gpu1"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    logs = lambda: (tmp_path / "lorafarm-worker.log").read_text(errors="replace")[-6000:]  # noqa: E731
    figures = []
    try:
        wait_until(lambda: len(workers_by_gpu(ledger)) == 2, 120, "two workers online")

        # 1. a Celery worker that exits is started again by `lorafarm worker`
        old = workers_by_gpu(ledger)["gpu1"]
        killed = time.time()
        kill_worker(old["pid"])
        back = wait_until(lambda: (w := workers_by_gpu(ledger).get("gpu1")) and w["pid"] != old["pid"]
                          and w["heartbeat"] > killed and w, 90, "the worker of gpu1 back\n" + logs())
        figures.append(f"a SIGKILLed Celery worker is back (new pid publishes) after "
                       f"{back['heartbeat'] - killed:.1f} s")
        assert f"(pid {old['pid']}) exited with code -9; restarting it" in logs()
        assert launcher.poll() is None and workers_by_gpu(ledger)["gpu0"]["pid"] != old["pid"]

        # 2. Redis killed while a reaper holds its lease; the job sent to gpu2 (no worker) waits
        spec = load_spec_file(write_spec(tmp_path, "replaced", tiny_llm, text_dataset, "llm",
                                         max_steps=12, save_steps=2)).spec
        job_id = ledger.create_jobs([NewJob(spec, "recovery", 0, 100.0)])[0].record.id
        holder = lease(ledger.client, ledger.keys.reaper_lock, beat)
        wait_until(holder.acquire, 30, "the reaper lease", poll=0.01)
        with kept_alive(holder) as keeping:
            tr.schedule(ledger, job_id, ["gpu2"], 100.0, token="lost")
            server.kill()  # the holder dies with it: its lease is never released
            keeping.stop()
        time.sleep(2 * beat)
        returned = server.start()
        acted = wait_until(lambda: moved(ledger, job_id, "scheduled", "queued"), 60,
                           "the reaper\n" + logs(), poll=0.05)
        figures.append(f"the reaper acted {acted - returned:.2f} s after Redis returned "
                       f"(heartbeat {beat:.0f} s)")
        assert acted - returned <= beat + 1.0, figures  # one period (+1 s: a loaded machine)

        # 3. a worker dies with a job running: requeued and running again elsewhere
        running = wait_until(lambda: (r := ledger.get(job_id)).state == "running" and r.pid and r,
                             120, "the job running\n" + logs(), poll=0.1)
        os.killpg(running.pid, signal.SIGSTOP)  # it must not finish before its worker dies
        died = time.time()
        kill_worker(workers_by_gpu(ledger)[running.gpus[0]]["pid"])
        requeued = wait_until(lambda: moved(ledger, job_id, "retrying", "queued"), 120,
                              "the job requeued\n" + logs())
        again = wait_until(lambda: moved(ledger, job_id, "scheduled", "running", nth=2), 120,
                           "attempt 2 running\n" + logs())
        figures.append(f"a dead worker's running job: requeued after {requeued - died:.1f} s, "
                       f"running again after {again - died:.1f} s (stale_after "
                       f"{env['LORAFARM_STALE_AFTER_SECONDS']} s)")
        (done,) = wait_until(lambda: all_done(ledger, [job_id]), 300, "the job\n" + logs())
        assert done.state == "succeeded", done.exit_reason
    finally:
        print("\n" + "\n".join(figures))
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
        kill_job_trainers(ledger)
        server.stop()
