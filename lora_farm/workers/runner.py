"""The runner: executes one scheduled job on this worker's card, from lock to release.

take the job lock -> scheduled->running -> fence older attempts out of the job folder
(protocol.Fence) -> write config.resolved.yaml -> spawn the trainer pinned to the card, holding
its lifeline -> copy its progress events into the ledger while watching for cancel, timeout and a
lost lock -> classify the exit from evidence -> next state (uploading/retrying/failed/cancelled),
which releases the card's reservation in the same pipeline -> ship -> trigger a dispatch.

Torch-free: the trainer is another process.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from lora_farm.backoff import backoff_seconds
from lora_farm.errors import LoraFarmError
from lora_farm.jobs.loader import write_resolved
from lora_farm.jobs.spec import spec_from_dict
from lora_farm.jobs.state import JobState
from lora_farm.ledger import JobRecord, Ledger
from lora_farm.ledger import transitions as tr
from lora_farm.locks import Heartbeat, RedisLock
from lora_farm.process_group import stop_group
from lora_farm.protocol import EventTail, ExitCode, Fence, JobDir
from lora_farm.scheduler.gpus import pinned_env
from lora_farm.scheduler.policy import placement_of
from lora_farm.settings import Settings, get_settings, host_name
from lora_farm.workers import lifecycle
from lora_farm.workers.monitor import JobMonitor, cap_env
from lora_farm.workers import trainer_process as tp
from lora_farm.workers.outcome import Outcome, RunEvidence, Verdict, classify
from lora_farm.workers.shutdown import claim_stop_signal, is_stopping, sigterm_sets_flag
from lora_farm.workers.upload import ship_and_finish

log = logging.getLogger(__name__)
S = JobState
ArgvFactory = Callable[[Path, Path, Path], list[str]]
_PROGRESS_KEYS = ("step", "total_steps", "epoch", "epochs", "loss", "eta_s", "peak_vram_mb")


@dataclass
class RunnerOptions:
    settings: Settings = field(default_factory=get_settings)
    trainer_argv: ArgvFactory = tp.trainer_argv  # tests of exit classification swap this only
    after_release: Callable[[], Any] | None = None  # a dispatch once the card is free
    poll_seconds: float = 0.5
    worker_name: str = ""  # the Celery worker running us: its shutdown stops the trainer


def job_dir_for(record: JobRecord, settings: Settings) -> Path:
    """``<output_dir or LORAFARM_OUTPUT_ROOT>/<batch>/<job_id>/`` (docs/internals.md)."""
    return JobDir.locate(record.spec.get("output_dir"), settings.output_root_abs, record.batch,
                         record.id).root


def run_job(ledger: Ledger, job_id: str, token: str, options: RunnerOptions | None = None) -> str:
    """Run one delivery of a job; returns what happened (``duplicate``/``stale`` or an outcome)."""
    options = options or RunnerOptions()
    lock = RedisLock(ledger.client, ledger.keys.job_lock(job_id), options.settings.stale_after_seconds)
    if not lock.acquire():
        log.info("job %s: lock held by %s; this delivery is a duplicate", job_id, lock.holder())
        return "duplicate"
    try:
        record = tr.start(ledger, job_id, token, host_name(), worker=options.worker_name)
        if isinstance(record, tr.Refused):
            log.info("job %s: %s (token %s); dropping the message", job_id, record.why, token)
            return "stale"
        # the lock is kept alive until the job has left our hands (after the upload too)
        heartbeat = Heartbeat(lambda: _beat(ledger, record, lock), options.settings.heartbeat_seconds,
                              name=f"heartbeat-{record.id}")
        heartbeat.start()
        try:
            with sigterm_sets_flag():  # a SIGTERM to this process now checkpoints the job
                verdict = _supervise(ledger, record, lock, heartbeat, options)
                _retrying_redis(lambda: _conclude(ledger, record, verdict, options),
                                options.settings)
        finally:
            heartbeat.stop()
        return verdict.outcome.value
    finally:
        lock.release()
        if options.after_release is not None:
            _safely(options.after_release, "dispatch after job end")


class _Watch:
    """State of one trainer run while it is watched."""

    def __init__(self, ledger: Ledger, record: JobRecord, events: Path, monitor: JobMonitor):
        self.ledger, self.record = ledger, record
        self.monitor = monitor  # telemetry, data-bound warning, throughput watchdog
        self.tail = EventTail(events)
        self.tail.read_new()  # skip the events of earlier attempts
        self.evidence = RunEvidence(returncode=None, timeout_s=record.timeout)

    def absorb_events(self) -> None:
        update: dict[str, Any] = {}
        for event in self.tail.read_new():
            if event.get("attempt", self.record.attempt) != self.record.attempt:
                continue  # a stale attempt's trainer, written before it found itself fenced out
            kind = event.get("event")
            if kind == "phase":
                update["phase"] = event.get("phase", "")
            elif kind == "progress":
                update.update({key: event[key] for key in _PROGRESS_KEYS if key in event})
                update.update(self.monitor.progress(event))
            elif kind == "summary":
                self.evidence.exported = True
                update["loss"] = event.get("final_loss", update.get("loss"))
                if event.get("peak_vram_mb") is not None:
                    update["peak_vram_mb"] = event["peak_vram_mb"]
            elif kind == "artifact":
                self.evidence.exported = True
            elif kind == "error":
                self.evidence.last_error = event
        if update:
            self.ledger.update(self.record.id, update)


def _supervise(ledger: Ledger, record: JobRecord, lock: RedisLock, heartbeat: Heartbeat,
               options: RunnerOptions) -> Verdict:
    settings = options.settings
    job_dir = job_dir_for(record, settings)
    job_dir.mkdir(parents=True, exist_ok=True)
    paths = JobDir(job_dir)
    if not Fence(paths.fence, record.attempt).raise_to():  # before the first write in it
        log.warning("job %s: a newer attempt than %d owns %s", record.id, record.attempt, job_dir)
        return classify(RunEvidence(returncode=None, lost=True))
    # the spec was validated at submit; the plan (if any) is the farm's own: written as it is
    resolved = write_resolved(record.effective_spec(), paths.resolved_config)
    policy = placement_of(settings)
    watch = _Watch(ledger, record, paths.events, JobMonitor(ledger, record, policy, paths.log))
    _log_header(paths.log, record)
    extra_env = {**_trainer_extra_env(record, settings), **cap_env(ledger, record, policy)}
    process = tp.spawn(options.trainer_argv(resolved, job_dir, paths.events),
                       tp.trainer_env(pinned_env(record.gpus), extra_env),
                       paths.log, cwd=job_dir, wait_seconds=settings.cancel_grace_seconds)
    try:
        ledger.update(record.id, {"pid": process.pid, "job_dir": str(job_dir)})
        _watch_until_exit(process, watch, heartbeat, lock, options)
    except BaseException:  # whatever went wrong here, no trainer is left running unwatched
        log.exception("job %s: the runner failed while its trainer ran; stopping it", record.id)
        stop_group(process, settings.cancel_grace_seconds)
        raise
    finally:
        process.stdin.close()  # the lifeline: only once the trainer has exited
    _safely(watch.absorb_events, "reading the last events")
    return classify(watch.evidence)


def _trainer_extra_env(record: JobRecord, settings: Settings) -> dict[str, str]:
    """The trainer runs with cwd=job_dir, where a relative output root would mean another folder."""
    return {"LORAFARM_JOB_ID": record.id, "LORAFARM_ATTEMPT": str(record.attempt),
            "LORAFARM_OUTPUT_ROOT": str(settings.output_root_abs)}


def _watch_until_exit(process: subprocess.Popen, watch: _Watch, heartbeat: Heartbeat,
                      lock: RedisLock, options: RunnerOptions) -> None:
    started = time.monotonic()
    timeout = watch.record.timeout
    evidence = watch.evidence
    while process.poll() is None:
        time.sleep(options.poll_seconds)
        _safely(watch.absorb_events, "reading progress events")
        _safely(lambda: watch.monitor.sample(process.pid), "sampling utilisation")
        if heartbeat.lost.is_set() and not _reacquire(lock, watch, heartbeat):
            evidence.lost = True
        elif _cancel_requested(watch):
            evidence.cancelled = True
        elif is_stopping(watch.ledger, options.worker_name):
            evidence.shutdown = True  # SIGTERM: the trainer finishes its step and checkpoints
        elif timeout and time.monotonic() - started > timeout:
            evidence.timed_out = True
        elif watch.monitor.watchdog_state.requeue:  # SIGTERM: checkpoint, then requeued away from the card
            evidence.throttled, evidence.throttle_reason = True, watch.monitor.watchdog_state.reason
        else:
            continue
        # at a shutdown the worker's main process may have sent the SIGTERM already: one only
        sigterm = not evidence.shutdown or claim_stop_signal(watch.ledger, watch.record.id,
                                                               watch.record.token)
        evidence.returncode = stop_group(process, options.settings.cancel_grace_seconds,
                                         sigterm=sigterm)
        return
    evidence.returncode = process.returncode
    evidence.lost = process.returncode == ExitCode.FENCED  # a newer attempt's job now
    # the worker's main process may have sent the SIGTERM itself (shutdown.stop_trainers)
    evidence.shutdown = process.returncode != 0 and is_stopping(watch.ledger, options.worker_name)
    stop_group(process, grace_seconds=2)  # children the trainer left behind


def _cancel_requested(watch: _Watch) -> bool:
    try:
        return watch.ledger.cancel_requested(watch.record.id)
    except redis.RedisError:
        return False  # Redis is away: keep training, ask again next tick


def _reacquire(lock: RedisLock, watch: _Watch, heartbeat: Heartbeat) -> bool:
    """After Redis came back without our lock: take it again, unless another runner has it or
    the ledger moved on meanwhile (the reaper requeued the job: it is no longer ours to run)."""
    try:
        if not (lock.acquire() or lock.refresh()):
            return False
        current = watch.ledger.get(watch.record.id)
    except redis.RedisError:
        return True  # still unreachable: nobody else can take it either
    except LoraFarmError as error:  # the record is gone
        log.warning("job %s: %s; stopping its trainer", watch.record.id, error)
        current = None
    if current and current.state == S.RUNNING.value and current.token == watch.record.token:
        heartbeat.lost.clear()
        return True
    log.warning("job %s: lock lost and the ledger moved on (%s); stopping its trainer",
                watch.record.id, current.state if current else "no record")
    _safely(lock.release, "releasing a lock that is not ours to keep")
    return False


def _beat(ledger: Ledger, record: JobRecord, lock: RedisLock) -> bool:
    if not lock.refresh():
        return False
    ledger.update(record.id, {"heartbeat": time.time()})  # gpu_util: the JobMonitor samples it
    return True


def _conclude(ledger: Ledger, record: JobRecord, verdict: Verdict, options: RunnerOptions) -> None:
    """Move the job on (lifecycle.py); every branch leaves ``running`` and so releases the card."""
    outcome, code = verdict.outcome, verdict.extra.get("returncode")
    if outcome == Outcome.LOST:
        log.warning("job %s: lost its lock; leaving the ledger to the new owner", record.id)
        return
    if outcome == Outcome.SUCCEEDED:
        _calibrate(ledger, record.id)
        job_dir = job_dir_for(record, options.settings)
        if not isinstance(lifecycle.trained(ledger, record, str(job_dir)), tr.Refused):
            if options.after_release is not None:  # the card is free while we upload
                _safely(options.after_release, "dispatch before upload")
            ship_and_finish(ledger, record.id, job_dir)
        return
    if outcome == Outcome.SHUTDOWN:
        reason = f"worker {options.worker_name or '(this one)'} shut down; {verdict.reason}"
        lifecycle.requeue_after_shutdown(ledger, record, reason, exit_code=code)
    elif outcome == Outcome.CANCELLED:
        lifecycle.stopped_on_request(ledger, record)
    elif outcome == Outcome.THROTTLED:
        lifecycle.requeue_away(ledger, record, verdict.reason, placement_of(options.settings),
                               exit_code=code)
    elif outcome in (Outcome.OOM, Outcome.CRASHED, Outcome.INTERRUPTED):
        lifecycle.end_attempt(ledger, record, verdict.reason, exit_code=code,
                              degrade=outcome == Outcome.OOM)
    else:
        lifecycle.fail_attempt(ledger, record, verdict.reason, exit_code=code)


def _calibrate(ledger: Ledger, job_id: str) -> None:
    """Teach the estimate what this job really peaked at (scheduler/calibration.py), against the
    uncorrected model figure of the plan that ran (``record.estimate_mb`` is already corrected)."""
    from lora_farm.redis_conn import bytes_client
    from lora_farm.scheduler.calibration import learn_from_run

    record = ledger.get(job_id)
    try:
        learn_from_run(bytes_client(ledger.client), ledger.keys.prefix,
                       spec_from_dict(record.effective_spec()), record.peak_vram_mb)
    except (redis.RedisError, ValueError, LoraFarmError) as error:
        log.warning("job %s: calibration not recorded: %s", job_id, error)


def _log_header(log_path: Path, record: JobRecord) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(log_path, "a", encoding="utf-8") as stream:
        stream.write(f"\n=== lorafarm: job {record.id} ({record.name}) attempt {record.attempt} "
                     f"on {record.gpu or '-'} at {stamp} plan={record.plan or 'as specified'} ===\n")


def _retrying_redis(action: Callable[[], Any], settings: Settings) -> Any:
    """Run ``action``, waiting out a Redis restart (up to ~``stale_after_seconds`` x 4). If Redis
    stays away the error propagates; the reaper then requeues the job from its checkpoint."""
    deadline = time.monotonic() + settings.stale_after_seconds * 4
    tries = 0
    while True:
        try:
            return action()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            if time.monotonic() > deadline:
                raise
            tries += 1
            wait = backoff_seconds(tries, first=0.5, most=5.0)
            log.warning("Redis unavailable (%s); retrying in %.1fs", error, wait)
            time.sleep(wait)


def _safely(action: Callable[[], Any], what: str) -> None:
    try:
        action()
    except redis.RedisError as error:
        log.warning("%s failed (Redis): %s", what, error)
