"""The ledger: one Redis hash per job under one key template, plus the indexes around it.

Reads and non-transition writes (progress, heartbeat) live here; state changes go through
``transitions.py`` so each one is checked and lands in one MULTI/EXEC pipeline.
"""

from __future__ import annotations

import json
import time
import uuid
from itertools import islice
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

import redis

from lora_farm.errors import JobNotFound
from lora_farm.jobs.spec import JobSpec
from lora_farm.jobs.state import JobState
from lora_farm.ledger.keys import Keys
from lora_farm.ledger.record import JobRecord, encode_fields
from lora_farm.redis_conn import connect
from lora_farm.settings import Settings, get_settings

LISTING_FIELDS = [f.name for f in dataclass_fields(JobRecord) if f.name != "spec"]
PRIORITY_WEIGHT = 1e12  # queue score = -priority * weight + seq: higher priority first, then FIFO


def queue_score(priority: int, seq: int) -> float:
    return -priority * PRIORITY_WEIGHT + seq


@dataclass(frozen=True)
class NewJob:
    """One job to create: the validated spec and what the farm knows about it."""

    spec: JobSpec
    batch: str
    priority: int
    estimate_mb: float
    host_ram_mb: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)  # overrides of the spec chosen at submit


@dataclass(frozen=True)
class Created:
    record: JobRecord
    created: bool  # False: an identical spec was already in the batch (no-op)


class Ledger:
    """The farm's job records in Redis, all keys under ``prefix``."""

    def __init__(self, client: redis.Redis, prefix: str, settings: Settings | None = None):
        self.client = client
        self.keys = Keys(prefix)
        self._settings = settings

    @property
    def settings(self) -> Settings:
        """The settings this ledger was opened with (what works on the ledger reads them here);
        a ledger opened without any follows the process's settings."""
        return self._settings or get_settings()

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "Ledger":
        settings = settings or get_settings()
        return cls(connect(settings), settings.key_prefix, settings)

    # ---- creating -------------------------------------------------------------------------

    def create_jobs(self, jobs: Sequence[NewJob], now: float | None = None) -> list[Created]:
        """Create every job in one transaction; an identical spec already in its batch is kept.

        The config-hash index of each batch is WATCHed, so two concurrent submits of the same
        spec create one job between them.
        """
        index_keys = sorted({self.keys.config_index(job.batch) for job in jobs})

        def write(pipe: redis.client.Pipeline) -> list[Created]:
            existing = [pipe.hget(self.keys.config_index(j.batch), j.spec.config_hash()) for j in jobs]
            last_seq = int(pipe.get(self.keys.seq) or 0)
            pipe.multi()
            results, seen = [], {}
            for job, found in zip(jobs, existing):
                ident = (job.batch, job.spec.config_hash())
                if found or ident in seen:
                    results.append(("old", found or seen[ident]))
                    continue
                last_seq += 1
                record = self._new_record(job, last_seq, now or time.time())
                seen[ident] = record.id
                self._write_new(pipe, record)
                results.append(("new", record))
            pipe.set(self.keys.seq, last_seq)
            return results

        outcome = self.client.transaction(write, self.keys.seq, *index_keys, value_from_callable=True)
        return [Created(item, True) if kind == "new" else Created(self.get(item), False)
                for kind, item in outcome]

    def _new_record(self, job: NewJob, seq: int, now: float) -> JobRecord:
        spec = job.spec
        return JobRecord(
            id=uuid.uuid4().hex[:12], name=spec.name, batch=job.batch, task=spec.task,
            config_hash=spec.config_hash(), priority=job.priority, max_retries=spec.max_retries,
            timeout=spec.timeout, gpus_needed=spec.gpus, estimate_mb=round(job.estimate_mb, 1),
            host_ram_mb=round(job.host_ram_mb, 1), seq=seq, submitted=now, queued_at=now, updated=now,
            spec=spec.to_yaml_dict(), plan=dict(job.plan))

    def _write_new(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        keys = self.keys
        pipe.hset(keys.job(record.id), mapping=encode_fields(vars(record)))
        pipe.zadd(keys.jobs, {record.id: record.seq})
        pipe.zadd(keys.batch(record.batch), {record.id: record.seq})
        pipe.sadd(keys.batches, record.batch)
        pipe.hset(keys.config_index(record.batch), record.config_hash, record.id)
        pipe.sadd(keys.state(JobState.QUEUED.value), record.id)
        pipe.zadd(keys.queue, {record.id: queue_score(record.priority, record.seq)})
        entry = {"t": record.submitted, "to": "queued", "from": "", "reason": "submitted"}
        pipe.rpush(keys.timeline(record.id), json.dumps(entry))

    # ---- reading --------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        data = self.client.hgetall(self.keys.job(job_id))
        if not data:
            raise JobNotFound(f"no job `{job_id}` in the ledger (prefix {self.keys.prefix!r}); "
                              f"`lorafarm status` lists the jobs.")
        return JobRecord.from_hash(data)

    def find(self, id_or_prefix: str) -> JobRecord:
        """A job by its id or a unique prefix of it (as `git` does with hashes); a blank one
        names no job (as a prefix it would match them all)."""
        if not id_or_prefix.strip():
            raise JobNotFound("a job id must not be empty or blank; `lorafarm status` lists them.")
        if self.client.exists(self.keys.job(id_or_prefix)):
            return self.get(id_or_prefix)
        matches = [job_id for job_id in self.client.zrange(self.keys.jobs, 0, -1)
                   if job_id.startswith(id_or_prefix)]
        if len(matches) == 1:
            return self.get(matches[0])
        if matches:
            raise JobNotFound(f"`{id_or_prefix}` matches {len(matches)} jobs "
                              f"({', '.join(matches[:5])}...); give more characters of the id.")
        raise JobNotFound(f"no job id starts with `{id_or_prefix}`; `lorafarm status` lists them.")

    def records(self, job_ids: Iterable[str], with_spec: bool = True,
                fields: Sequence[str] = ()) -> list[JobRecord]:
        """Records in the given order (missing ids skipped); ``with_spec=False`` skips the
        largest field, for listings; ``fields`` reads only those (the others keep their
        defaults): a listing of 10,000 jobs reads what it shows."""
        job_ids, names = list(job_ids), list(fields) or LISTING_FIELDS
        whole = with_spec and not fields
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            if whole:
                pipe.hgetall(self.keys.job(job_id))
            else:
                pipe.hmget(self.keys.job(job_id), names)
        rows = pipe.execute()
        if not whole:
            rows = [{k: v for k, v in zip(names, row) if v is not None} for row in rows]
        return [JobRecord.from_hash(data) for data in rows if data]

    def list_jobs(self, batch: str | None = None, with_spec: bool = True) -> list[JobRecord]:
        return self.records(self.job_ids(batch), with_spec=with_spec)

    def job_ids(self, batch: str | None = None) -> list[str]:
        """Every job id (or a batch's), in submission order."""
        return self.client.zrange(self.keys.batch(batch) if batch else self.keys.jobs, 0, -1)

    def field_values(self, job_ids: Sequence[str], names: Sequence[str]) -> list[list[str | None]]:
        """A few raw fields of many jobs: `status` sorts 10,000 jobs on two of them, then reads
        the records of the few it shows (a whole record costs ten times more to read)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), names)
        return pipe.execute()

    def ids_in_state(self, state: JobState) -> set[str]:
        return set(self.client.smembers(self.keys.state(state.value)))

    def queued_ids(self, limit: int = -1) -> list[str]:
        """Queued job ids, highest priority first, then first submitted."""
        return self.client.zrange(self.keys.queue, 0, limit - 1 if limit > 0 else -1)

    def timeline(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.client.lrange(self.keys.timeline(job_id), 0, -1)]

    def reservations(self) -> dict[str, dict[str, Any]]:
        """job id -> {gpus, mb, since}: the VRAM each scheduled or running job holds."""
        return {job_id: json.loads(raw)
                for job_id, raw in self.client.hgetall(self.keys.reservations).items()}

    # ---- non-transition writes (the state does not change) --------------------------------

    def update(self, job_id: str, values: dict[str, Any]) -> None:
        """Progress, pid, heartbeat, artifacts: fields that do not change the state."""
        values = {**values, "updated": time.time()}
        self.client.hset(self.keys.job(job_id), mapping=encode_fields(values))

    def request_cancel(self, job_id: str) -> None:
        self.client.hset(self.keys.job(job_id), "cancel_requested", "1")

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.client.hget(self.keys.job(job_id), "cancel_requested"))

    def delete_prefix(self) -> int:
        """Remove every key under the prefix (tests; `lorafarm` never calls this)."""
        removed = 0
        keys = self.client.scan_iter(match=self.keys.pattern, count=1000)
        while batch := list(islice(keys, 500)):
            removed += self.client.delete(*batch)
        return removed
