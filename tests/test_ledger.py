"""The ledger against the real Redis: records, indexes, idempotent submits, checked transitions
landing whole, reservations and the timeline, key isolation."""

import json
from pathlib import Path

import pytest

from lora_farm.errors import IllegalTransition, JobNotFound
from lora_farm.jobs.spec import LlmJobSpec
from lora_farm.jobs.state import JobState
from lora_farm.ledger import Ledger, NewJob
from lora_farm.ledger import transitions as tr

S = JobState


def make_spec(name: str, **extra) -> LlmJobSpec:
    return LlmJobSpec(name=name, base_model=Path("/models/tiny"), train_data_dir=Path("/data/t.jsonl"),
                      **extra)


def submit(ledger: Ledger, *names: str, batch: str = "b1", priority: int = 0, mb: float = 1000.0):
    jobs = [NewJob(make_spec(n), batch, priority, mb) for n in names]
    return ledger.create_jobs(jobs)


def test_create_writes_record_and_indexes(ledger):
    created = submit(ledger, "alpha", "beta")
    assert all(c.created for c in created)
    record = ledger.get(created[0].record.id)
    assert (record.name, record.batch, record.state, record.attempt) == ("alpha", "b1", "queued", 1)
    assert record.estimate_mb == 1000.0 and record.spec["name"] == "alpha"
    assert record.config_hash == make_spec("alpha").config_hash()
    assert [r.name for r in ledger.list_jobs(batch="b1")] == ["alpha", "beta"]
    assert ledger.ids_in_state(S.QUEUED) == {c.record.id for c in created}
    assert ledger.timeline(record.id)[0]["to"] == "queued"


def test_identical_spec_in_same_batch_is_a_noop(ledger):
    first = submit(ledger, "alpha")[0]
    again = submit(ledger, "alpha")[0]
    assert not again.created and again.record.id == first.record.id
    other_batch = submit(ledger, "alpha", batch="b2")[0]
    assert other_batch.created and other_batch.record.id != first.record.id
    assert len(ledger.list_jobs()) == 2


def test_queue_orders_by_priority_then_submission(ledger):
    low = submit(ledger, "low1", "low2")
    high = submit(ledger, "urgent", priority=10)[0]
    assert ledger.queued_ids() == [high.record.id, low[0].record.id, low[1].record.id]


def test_schedule_reserves_and_release_lands_with_the_transition(ledger):
    job_id = submit(ledger, "alpha", mb=1234.5)[0].record.id
    record = tr.schedule(ledger, job_id, ["gpu0"], 1234.5, token="t1")
    assert record.state == "scheduled" and record.gpus == ["gpu0"]
    assert ledger.reservations()[job_id]["mb"] == 1234.5
    assert job_id not in ledger.queued_ids()
    assert isinstance(tr.start(ledger, job_id, "wrong-token", "host"), tr.Refused)  # a stale message
    assert tr.start(ledger, job_id, "t1", "host").state == "running"
    failed = tr.fail(ledger, job_id, "crashed (exit 1)", expect={S.RUNNING}, exit_code=1)
    assert failed.state == "failed" and failed.exit_reason == "crashed (exit 1)"
    assert job_id not in ledger.reservations()
    timeline = ledger.timeline(job_id)
    assert [e["to"] for e in timeline] == ["queued", "scheduled", "running", "failed"]
    assert timeline[1]["reserved_mb"] == 1234.5 and timeline[-1]["released_mb"] == 1234.5


def test_requeue_passes_through_retrying_and_keeps_queue_position(ledger):
    first, second = (c.record.id for c in submit(ledger, "alpha", "beta"))
    tr.schedule(ledger, first, ["gpu0"], 10, token="t")
    tr.start(ledger, first, "t", "host")
    plan = {"batch_size": 1}
    record = tr.requeue(ledger, first, "oom", expect={S.RUNNING}, plan=plan)
    assert (record.state, record.attempt, record.plan, record.gpus) == ("queued", 2, plan, [])
    assert record.effective_spec()["batch_size"] == 1
    assert ledger.queued_ids() == [first, second]
    assert [e["to"] for e in ledger.timeline(first)][-2:] == ["retrying", "queued"]


def test_queued_at_restarts_on_a_requeue_and_dispatch_reads_it(ledger):
    from lora_farm.workers.dispatch import queued_jobs

    job_id = submit(ledger, "alpha")[0].record.id
    record = ledger.get(job_id)
    assert record.queued_at == record.submitted
    tr.schedule(ledger, job_id, ["gpu0"], 10, token="t")
    assert tr.unschedule(ledger, job_id, "worker went away", "t").queued_at == record.submitted
    tr.schedule(ledger, job_id, ["gpu0"], 10, token="t2")
    tr.start(ledger, job_id, "t2", "host")
    requeued = tr.requeue(ledger, job_id, "oom", expect={S.RUNNING})
    assert requeued.queued_at == ledger.timeline(job_id)[-1]["t"] > record.submitted
    (queued,) = queued_jobs(ledger)
    assert (queued.submitted_at, queued.queued_at) == (record.submitted, requeued.queued_at)


def test_illegal_transition_raises_and_writes_nothing(ledger):
    job_id = submit(ledger, "alpha")[0].record.id
    before = ledger.client.hgetall(ledger.keys.job(job_id))
    with pytest.raises(IllegalTransition):
        tr.apply(ledger, job_id, tr.Move(S.UPLOADING))
    assert ledger.client.hgetall(ledger.keys.job(job_id)) == before
    assert ledger.ids_in_state(S.UPLOADING) == set()


def test_lost_race_returns_none(ledger):
    job_id = submit(ledger, "alpha")[0].record.id
    tr.finish_cancelled(ledger, job_id, expect={S.QUEUED})
    assert isinstance(tr.schedule(ledger, job_id, ["gpu0"], 10, token="t"), tr.Refused)
    assert ledger.get(job_id).state == "cancelled" and ledger.reservations() == {}


def test_upload_path_and_retry(ledger):
    job_id = submit(ledger, "alpha")[0].record.id
    tr.schedule(ledger, job_id, ["gpu0"], 10, token="t")
    tr.start(ledger, job_id, "t", "host")
    assert tr.begin_upload(ledger, job_id, "t", "/tmp/x").state == "uploading"
    assert ledger.reservations() == {}  # the card is free while the upload runs
    assert tr.upload_waits(ledger, job_id, "endpoint down").state == "uploading"
    done = tr.upload_succeeded(ledger, job_id, {"a.safetensors": "s3://b/a"}, "s3://b/manifest.json")
    assert done.state == "succeeded" and done.artifacts == {"a.safetensors": "s3://b/a"}
    with pytest.raises(IllegalTransition):
        tr.apply(ledger, job_id, tr.Move(S.QUEUED))


def test_retry_gives_a_fresh_budget(ledger):
    job_id = submit(ledger, "alpha")[0].record.id
    tr.fail(ledger, job_id, "bad", expect={S.QUEUED})
    record = tr.retry(ledger, job_id)
    assert (record.state, record.attempt, record.exit_reason) == ("queued", 2, "")
    assert record.max_retries == 2 + 1


def test_find_by_prefix_and_not_found(ledger):
    job_id = submit(ledger, "alpha")[0].record.id
    assert ledger.find(job_id[:6]).id == job_id
    with pytest.raises(JobNotFound, match="lorafarm status"):
        ledger.find("zzzz")


@pytest.mark.parametrize("blank", ["", " ", "\t"])
def test_a_blank_id_finds_no_job_even_when_one_job_matches_every_prefix(ledger, blank):
    submit(ledger, "only")
    with pytest.raises(JobNotFound, match="must not be empty or blank"):
        ledger.find(blank)


def test_every_key_is_under_the_prefix(ledger):
    job_id = submit(ledger, "alpha")[0].record.id
    tr.schedule(ledger, job_id, ["gpu0"], 10, token="t")
    keys = list(ledger.client.scan_iter(match=f"{ledger.keys.prefix}:*"))
    assert ledger.keys.job(job_id) in keys and ledger.keys.reservations in keys
    assert ledger.delete_prefix() == len(keys)
    assert list(ledger.client.scan_iter(match=f"{ledger.keys.prefix}:*")) == []
    assert json.loads(json.dumps(keys))  # plain strings


def test_unreachable_redis_names_the_url_without_the_password():
    from lora_farm.errors import BrokerUnavailable
    from lora_farm.redis_conn import make_client, ping

    url = "redis://:hunter2@127.0.0.1:1/0"
    with pytest.raises(BrokerUnavailable) as raised:
        ping(make_client(url), url)
    message = str(raised.value)
    assert "127.0.0.1:1" in message and "hunter2" not in message and "LORAFARM_REDIS_URL" in message


def test_bad_scheme_is_a_config_error():
    from lora_farm.errors import ConfigError
    from lora_farm.redis_conn import make_client

    with pytest.raises(ConfigError, match="redis://, rediss://"):
        make_client("http://127.0.0.1:6379")
