"""Calibration against the real Redis: measured peaks correct later estimates of the same shape."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
import redis

from lora_farm.jobs.spec import ImageJobSpec
from lora_farm.scheduler.calibration import (FLOOR, calibrated_estimate, calibration_key, correction,
                                             record_peak, shape_key)
from lora_farm.scheduler.estimate import CUDA_CONTEXT_MB, estimate_vram


@pytest.fixture
def client():
    connection = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    connection.ping()  # fail loudly when Redis is missing: these tests need the real one
    yield connection
    connection.close()


@pytest.fixture
def prefix(client):
    name = f"lorafarm-test-{uuid.uuid4().hex}"
    yield name
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)


def spec(base, **fields) -> ImageJobSpec:
    return ImageJobSpec(**{"name": "job", "base_model": base, "train_data_dir": base, **fields})


def test_shape_key_ignores_what_does_not_change_memory(sd15):  # noqa: F811
    one = shape_key(spec(sd15, learning_rate=1e-4, epochs=3, seed=1))
    two = shape_key(ImageJobSpec(name="other", base_model=sd15, train_data_dir=sd15.parent,
                                 learning_rate=5e-5, epochs=30, seed=9, priority=4))
    assert one == two
    fields = json.loads(one)
    assert fields["family"] == "sd1" and fields["resolution"] == 512 and fields["rank"] == 16
    for change in ({"batch_size": 2}, {"resolution": 768}, {"lora_rank": 32},
                   {"gradient_checkpointing": True}, {"mixed_precision": "no"}):
        assert shape_key(spec(sd15, **change)) != one, change


def test_no_record_no_correction(client, prefix, sd15):  # noqa: F811
    assert correction(client, prefix, spec(sd15)) is None
    assert calibrated_estimate(client, prefix, spec(sd15)).source == "estimate"


def test_a_higher_peak_raises_the_next_estimate_at_once(client, prefix, sd15):  # noqa: F811
    job = spec(sd15)
    model = estimate_vram(job)
    modelled = model.model_mb - CUDA_CONTEXT_MB
    ratio = record_peak(client, prefix, job, model.model_mb, peak_mb=modelled * 1.3)
    assert ratio == pytest.approx(1.3, rel=1e-3)
    assert correction(client, prefix, job) == pytest.approx(1.3, rel=1e-3)
    corrected = calibrated_estimate(client, prefix, spec(sd15, name="later"))
    assert corrected.source == "calibrated" and corrected.model_mb == model.model_mb
    assert corrected.total_mb == pytest.approx(modelled * 1.3 + CUDA_CONTEXT_MB, abs=2)
    # a job of another shape is not affected
    assert correction(client, prefix, spec(sd15, batch_size=2)) is None


def test_lower_peaks_pull_it_down_gradually_never_below_the_floor(client, prefix, sd15):  # noqa: F811
    job = spec(sd15)
    estimated = estimate_vram(job).model_mb
    modelled = estimated - CUDA_CONTEXT_MB
    record_peak(client, prefix, job, estimated, modelled * 1.2)
    after_low = record_peak(client, prefix, job, estimated, modelled * 0.8)
    assert after_low == pytest.approx(1.0, rel=1e-3)  # EWMA of 1.2 and 0.8
    for _ in range(10):
        floor = record_peak(client, prefix, job, estimated, modelled * 0.1)
    assert floor == FLOOR
    record = client.hgetall(calibration_key(prefix, job))
    assert int(record[b"count"]) == 12 and float(record[b"max"]) == pytest.approx(1.2, rel=1e-3)
    assert json.loads(record[b"shape"]) == json.loads(shape_key(job))
    assert 0 < client.ttl(calibration_key(prefix, job)) <= 90 * 24 * 3600


def test_runs_without_a_peak_teach_nothing(client, prefix, sd15):  # noqa: F811
    assert record_peak(client, prefix, spec(sd15), 5000.0, None) is None  # CPU run
    assert record_peak(client, prefix, spec(sd15), 5000.0, 0.0) is None
    assert list(client.scan_iter(f"{prefix}:*")) == []


def test_concurrent_records_lose_no_update(client, prefix, sd15):  # noqa: F811
    job = spec(sd15)
    estimated = estimate_vram(job).model_mb

    def finish_jobs():
        own = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        for _ in range(10):
            record_peak(own, prefix, job, estimated, 3000.0)
        own.close()

    workers = [threading.Thread(target=finish_jobs) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert int(client.hget(calibration_key(prefix, job), "count")) == 40


def test_vram_gb_jobs_keep_their_figure(client, prefix, sd15):  # noqa: F811
    record_peak(client, prefix, spec(sd15, vram_gb=8), 8192, 9000)
    assert calibrated_estimate(client, prefix, spec(sd15, vram_gb=8)).total_mb == 8192


def submit_and_finish(client, prefix, job, true_ratio, plan=None):
    """One job through submit (calibrated estimate stored) and the runner's end (its peak)."""
    from lora_farm.ledger import Ledger, NewJob
    from lora_farm.redis_conn import make_client
    from lora_farm.workers.runner import _calibrate

    ledger = Ledger(make_client(), prefix)
    stored = calibrated_estimate(client, prefix, job).total_mb  # what submit records
    record = ledger.create_jobs([NewJob(job, f"b-{uuid.uuid4().hex[:8]}", 0, stored)])[0].record
    ran = job.model_copy(update=plan or {})
    peak = (estimate_vram(ran).model_mb - CUDA_CONTEXT_MB) * true_ratio
    ledger.update(record.id, {"peak_vram_mb": peak, **({"plan": plan} if plan else {})})
    _calibrate(ledger, record.id)


def test_repeated_jobs_converge_to_the_true_ratio(client, prefix, sd15):  # noqa: F811
    """The runner compares peaks with the uncorrected model figure, not with the (already
    corrected) estimate submit stored: a 2x shape converges to 2x, not to sqrt(2)."""
    for i in range(6):
        submit_and_finish(client, prefix, spec(sd15, name=f"job{i}"), 2.0)
    assert correction(client, prefix, spec(sd15)) == pytest.approx(2.0, rel=1e-3)
    later = calibrated_estimate(client, prefix, spec(sd15, name="later"))
    modelled = estimate_vram(spec(sd15)).model_mb - CUDA_CONTEXT_MB
    assert later.total_mb == pytest.approx(modelled * 2 + CUDA_CONTEXT_MB, abs=3)


def test_runner_skips_overrides_and_keys_by_the_plan_that_ran(client, prefix, sd15):  # noqa: F811
    submit_and_finish(client, prefix, spec(sd15, name="pinned", vram_gb=8), 2.0)
    assert list(client.scan_iter(f"{prefix}:vram:*")) == []  # a user's figure measures nothing
    plan = {"batch_size": 1, "gradient_checkpointing": True}
    submit_and_finish(client, prefix, spec(sd15, batch_size=2), 1.5, plan=plan)
    assert correction(client, prefix, spec(sd15, batch_size=2)) is None
    assert correction(client, prefix, spec(sd15, **plan)) == pytest.approx(1.5, rel=1e-3)
