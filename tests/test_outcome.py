"""Pure parts of the workers: exit classification from evidence, the degraded plan after an
OOM, and the Celery configuration (JSON only, one visibility timeout)."""

import pickle

import pytest

from lora_farm.settings import Settings
from lora_farm.workers.broker import celery_config, make_app
from lora_farm.workers.outcome import Outcome, RunEvidence, classify, degraded_plan


@pytest.mark.parametrize("evidence,outcome", [
    (RunEvidence(0, exported=True), Outcome.SUCCEEDED),
    (RunEvidence(0, exported=False), Outcome.CRASHED),  # exit 0 is not proof of weights
    (RunEvidence(3), Outcome.OOM),
    (RunEvidence(1, last_error={"kind": "oom", "message": "CUDA out of memory"}), Outcome.OOM),
    (RunEvidence(2), Outcome.BAD_INPUT),
    (RunEvidence(4), Outcome.INTERRUPTED),
    (RunEvidence(-9), Outcome.CRASHED),
    (RunEvidence(4, cancelled=True), Outcome.CANCELLED),  # our SIGTERM, not a crash
    (RunEvidence(-15, timed_out=True, timeout_s=60), Outcome.TIMED_OUT),
    (RunEvidence(4, shutdown=True), Outcome.SHUTDOWN),  # stopped at a checkpoint: not counted
    (RunEvidence(-9, shutdown=True), Outcome.SHUTDOWN),  # SIGKILLed after the grace
    (RunEvidence(3, shutdown=True), Outcome.OOM),  # what really happened still counts
    (RunEvidence(0, exported=True, shutdown=True), Outcome.SUCCEEDED),
])
def test_classify_from_evidence(evidence, outcome):
    verdict = classify(evidence)
    assert verdict.outcome == outcome and verdict.extra["returncode"] == evidence.returncode


def test_degraded_plan_keeps_the_effective_batch_until_nothing_is_left():
    spec = {"batch_size": 3, "gradient_accumulation_steps": 2, "gradient_checkpointing": False}
    plan = degraded_plan(spec, {})
    assert plan == {"batch_size": 1, "gradient_accumulation_steps": 6, "gradient_checkpointing": True}
    assert degraded_plan(spec, plan) is None


def test_celery_config_is_json_only_with_one_visibility_timeout():
    settings = Settings(redis_url="rediss://:s3cret@redis.example:6380/2", key_prefix="farm-x",
                        visibility_timeout=123456)
    config = celery_config(settings)
    assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["worker_send_task_events"]
    timeouts = {config["broker_transport_options"]["visibility_timeout"],
                config["result_backend_transport_options"]["visibility_timeout"],
                config["visibility_timeout"]}
    assert timeouts == {123456}
    assert config["broker_transport_options"]["global_keyprefix"] == "farm-x:celery:"
    assert config["broker_use_ssl"]["ssl_cert_reqs"] and config["broker_url"].startswith("rediss://")


def test_a_pickled_message_is_refused():
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import loads

    app = make_app(Settings(key_prefix="unused"))
    with pytest.raises(ContentDisallowed):
        loads(pickle.dumps({"x": 1}), "application/x-python-serialize", "binary",
              accept=app.conf.accept_content)
