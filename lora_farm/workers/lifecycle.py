"""How a job's attempt ends, in one place: the runner, the reaper, `lorafarm cancel` and the
upload step all end jobs through these functions, so every path applies the same rules.

- a failed attempt (crash, out of memory, a lost runner) -> ``cancelled`` when the user asked for
  it meanwhile, else requeued (an OOM with a degraded plan) while retries last, else ``failed``;
- a worker shutdown -> requeued without using up the retry budget;
- the throughput watchdog -> the card marked suspect, the job requeued away from it (a retry);
- a user's cancel -> ``cancelled`` at once when the job is not running, else the runner is asked
  to stop the trainer (it, or the reaper, then ends the job here);
- a trained job -> ``uploading``; its upload -> ``succeeded``, or ``failed`` when its weights
  are missing, or it waits.

Entering ``failed`` or ``cancelled`` archives the logs (ledger/transitions.py). Each function
returns the record written, or ``transitions.Refused`` when the job had moved on.
"""

from __future__ import annotations

import logging

from lora_farm.errors import LoraFarmError
from lora_farm.jobs.state import TERMINAL, JobState
from lora_farm.ledger import JobRecord, Ledger
from lora_farm.ledger import transitions as tr
from lora_farm.scheduler.policy import Policy
from lora_farm.workers.dispatch import dispatch_once, mark_suspect
from lora_farm.workers.outcome import degraded_plan, retries_left

log = logging.getLogger(__name__)
S = JobState
OWN = {S.RUNNING}  # a runner or the reaper ends only the running job it holds (with its token)


def end_attempt(ledger: Ledger, record: JobRecord, reason: str, *, exit_code: int | None = None,
                degrade: bool = False, cancel_reason: str | None = None,
                avoid: list[str] | None = None) -> tr.Result:
    """A running attempt failed: honour a pending cancel, else retry (degraded after an OOM;
    placed away from the cards ``avoid``) while the budget lasts, else fail. ``record`` is the
    job as its attempt started."""
    if ledger.cancel_requested(record.id):
        why = cancel_reason or f"cancelled by user (the run had ended: {reason})"
        return tr.finish_cancelled(ledger, record.id, why, expect=OWN, token=record.token)
    plan = degraded_plan(record.spec, record.plan) if degrade else None
    if degrade and plan is None:
        reason += "; nothing left to degrade (batch_size 1 with gradient checkpointing)"
    if retries_left(record) and not (degrade and plan is None):
        away = f" away from {','.join(record.gpus)}" if avoid else ""
        log.info("job %s: %s; requeued for attempt %d%s", record.id, reason, record.attempt + 1, away)
        return tr.requeue(ledger, record.id, reason, expect=OWN, plan=plan, token=record.token,
                          exit_code=exit_code, avoid=avoid)
    if not retries_left(record):
        reason += f"; no retries left ({record.max_retries} allowed)"
    return tr.fail(ledger, record.id, reason, expect=OWN, token=record.token, exit_code=exit_code)


def requeue_after_shutdown(ledger: Ledger, record: JobRecord, reason: str,
                           exit_code: int | None = None) -> tr.Result:
    log.info("job %s: %s; requeued (retry budget untouched)", record.id, reason)
    return tr.requeue(ledger, record.id, reason, expect=OWN, token=record.token,
                      exit_code=exit_code, shutdown=True)


def requeue_away(ledger: Ledger, record: JobRecord, reason: str, policy: Policy,
                 exit_code: int | None = None) -> tr.Result:
    """The throughput watchdog stopped the job at a checkpoint: its card(s) become suspect and
    the job is requeued (a retry) never to return to them while they are; no retries left ->
    failed; a pending cancel -> cancelled."""
    for uuid in record.gpus:
        mark_suspect(ledger, uuid, f"job {record.id}: {reason}", policy.suspect_card_seconds)
    return end_attempt(ledger, record, reason, exit_code=exit_code, cancel_reason="cancelled by user",
                       avoid=sorted(set(record.avoid_gpus) | set(record.gpus)))


def fail_attempt(ledger: Ledger, record: JobRecord, reason: str,
                 exit_code: int | None = None) -> tr.Result:
    """An end that no retry can mend (bad input, a timeout)."""
    return tr.fail(ledger, record.id, reason, expect=OWN, token=record.token, exit_code=exit_code)


def stopped_on_request(ledger: Ledger, record: JobRecord) -> tr.Result:
    """The runner stopped the trainer because the user cancelled the job."""
    return tr.finish_cancelled(ledger, record.id, expect=OWN, token=record.token)


def trained(ledger: Ledger, record: JobRecord, job_dir: str) -> tr.Result:
    return tr.begin_upload(ledger, record.id, record.token, job_dir)


def uploaded(ledger: Ledger, job_id: str, uris: dict[str, str], manifest_uri: str) -> tr.Result:
    return tr.upload_succeeded(ledger, job_id, uris, manifest_uri)


def upload_impossible(ledger: Ledger, job_id: str, error: str) -> tr.Result:
    """The weights to ship are missing (a trainer bug): retrying cannot help."""
    return tr.fail(ledger, job_id, f"upload failed: {error}", expect={S.UPLOADING})


def cancel(ledger: Ledger, job_id: str) -> str:
    """A user's cancel, wherever the job is; returns what happened, for the user.

    Not yet running: ``cancelled`` at once (a message already on a card's queue then finds the
    job cancelled and is dropped). Running: the runner is asked to stop the trainer's process
    group and ends the job itself (the reaper does it if the runner is gone).
    """
    for _ in range(3):  # the job may move on between reading it and writing (a runner starting)
        state = S(ledger.get(job_id).state)
        if state in TERMINAL:
            return f"already {state.value}"
        if state == S.RUNNING:
            ledger.request_cancel(job_id)
            if ledger.get(job_id).state == S.RUNNING.value:
                return "stopping (the runner kills the trainer, then marks it cancelled)"
            continue
        if not isinstance(tr.finish_cancelled(ledger, job_id, expect={state}), tr.Refused):
            return "cancelled"
    return f"not cancelled: it kept changing state (now {ledger.get(job_id).state}); try again"


def retry(ledger: Ledger, job: str) -> str:
    """A user's retry (`lorafarm retry`, the dashboard) of a job id or unique prefix: a failed or
    cancelled job queued again with a fresh retry budget, then placed; any other state is refused
    with what to do instead. Returns what happened, as both show it."""
    record = ledger.find(job)
    result = tr.retry(ledger, record.id)
    if isinstance(result, tr.Refused):
        raise LoraFarmError(f"job {record.id} is `{result.state}`; only failed or cancelled jobs can "
                            "be retried (an uploading one: `lorafarm retry-upload`).")
    dispatch_once(ledger)
    return f"{record.id} {record.name}: queued again (attempt {result.attempt})"
