"""The farm's Celery configuration: Redis broker, JSON only, late acks, one message in flight per
slot; and sending a job to a card's queue.

Apps are built from the settings on demand (:func:`make_app`, :func:`sending_app`); the one
built at import is ``workers/app.py``, the ``celery -A`` target. Everything Celery stores in Redis
sits under ``LORAFARM_KEY_PREFIX`` through kombu's ``global_keyprefix``, so two farms (or two
tests) can share one Redis server.
"""

from __future__ import annotations

import ssl
from functools import lru_cache
from typing import Any

from celery import Celery

from lora_farm.settings import Settings, get_settings


def gpu_queue(uuid: str) -> str:
    return f"gpu.{uuid}"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The whole Celery configuration, derived from the farm settings (tested directly)."""
    # Celery reads the visibility timeout in three places; a shorter one anywhere would make Redis
    # redeliver a long training to a second worker while the first still runs it.
    transport = {"visibility_timeout": settings.visibility_timeout,
                 "global_keyprefix": f"{settings.key_prefix}:celery:"}
    config: dict[str, Any] = {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "broker_transport_options": dict(transport),
        "result_backend_transport_options": dict(transport),
        "visibility_timeout": settings.visibility_timeout,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],  # any other content type is refused, never loaded
        "event_serializer": "json",
        "task_ignore_result": True,  # the ledger is the record of a job, not the result backend
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "worker_send_task_events": True,  # Flower
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    if settings.redis_url.startswith("rediss://"):
        tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        config["broker_use_ssl"] = tls
        config["redis_backend_use_ssl"] = tls
    return config


def make_app(settings: Settings) -> Celery:
    celery_app = Celery("lora_farm", include=["lora_farm.workers.tasks"])
    celery_app.conf.update(celery_config(settings))
    return celery_app


@lru_cache(maxsize=16)
def _sending_app(redis_url: str, key_prefix: str, visibility_timeout: int) -> Celery:
    settings = Settings(redis_url=redis_url, key_prefix=key_prefix,
                        visibility_timeout=visibility_timeout)
    return make_app(settings)


def sending_app(settings: Settings | None = None) -> Celery:
    """An app configured from the settings as they are now (a CLI or test process may change
    LORAFARM_KEY_PREFIX after ``app`` was built at import); one per distinct configuration."""
    settings = settings or get_settings()
    return _sending_app(settings.redis_url, settings.key_prefix, settings.visibility_timeout)


def send_run_job(job_id: str, token: str, queue: str, settings: Settings | None = None) -> None:
    """Put ``lorafarm.run_job(job_id, token)`` on a card's queue (JSON)."""
    sending_app(settings).send_task("lorafarm.run_job", args=[job_id, token], queue=queue)

