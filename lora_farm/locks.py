"""Locks in Redis: ``SET key token NX PX ttl``, kept alive by a heartbeat, released only by the
holder (compare-and-delete in Lua, so a lock that expired and was taken by someone else is never
deleted by the old holder).

The per-job lock is what makes a redelivered Celery message harmless: the second copy finds the
lock taken and drops out. The dispatch and reaper locks are leases (``lease``): one pass at a time
across all workers, and a holder that died (or could not release it while Redis was away) blocks
nobody for longer than a heartbeat period.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from lora_farm.settings import host_name

log = logging.getLogger(__name__)

_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def owner_token() -> str:
    """Who holds a lock: host, pid and a random part (readable in `redis-cli GET`)."""
    return f"{host_name()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease(client: redis.Redis, key: str, heartbeat_seconds: float) -> "RedisLock":
    """A lock for one pass of periodic work (dispatch, reaper), held under ``kept_alive``.

    Its TTL is one heartbeat period, so a holder that died frees it within a period; its token
    names this thread (host:pid:thread), so a holder whose release failed while Redis was away
    (the AOF restores the key) takes its own lock again on its next tick.
    """
    token = f"{host_name()}:{os.getpid()}:{threading.get_ident()}"
    return RedisLock(client, key, heartbeat_seconds, token=token)


class RedisLock:
    def __init__(self, client: redis.Redis, key: str, ttl_seconds: float, token: str | None = None):
        self.client = client
        self.key = key
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.token = token or owner_token()

    def acquire(self) -> bool:
        """Take the lock, or renew it when it is already ours (same token)."""
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms)) or self.refresh()

    def refresh(self) -> bool:
        """Extend the TTL; False when the lock is no longer ours (expired, taken over)."""
        return bool(self.client.eval(_REFRESH, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> bool:
        return bool(self.client.eval(_RELEASE, 1, self.key, self.token))

    def holder(self) -> str | None:
        return self.client.get(self.key)

    def __enter__(self) -> "RedisLock":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except redis.RedisError as error:  # the TTL frees it anyway
            log.warning("could not release lock %s: %s", self.key, error)


class Heartbeat(threading.Thread):
    """Calls ``beat()`` every ``interval`` seconds until stopped; Redis outages are survived.

    ``beat`` returns False when the lock was lost, which sets ``lost`` (the runner then stops
    writing as if it owned the job).
    """

    def __init__(self, beat: Callable[[], bool], interval: float, name: str = "heartbeat"):
        super().__init__(name=name, daemon=True)
        self._beat = beat
        self._interval = interval
        self._stop_event = threading.Event()
        self.lost = threading.Event()
        self.failures = 0

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            try:
                if not self._beat():
                    self.lost.set()
                self.failures = 0
            except redis.RedisError as error:
                # Redis restarting: keep the trainer running, try again next beat
                self.failures += 1
                log.warning("heartbeat failed (%d in a row): %s", self.failures, error)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self._interval + 5)


@contextmanager
def kept_alive(lock: RedisLock, interval: float | None = None) -> Iterator[Heartbeat]:
    """Refresh ``lock`` every ``interval`` seconds (default: a quarter of its TTL) while the block
    runs (an upload may last longer than the lock's TTL; an expired lock would let the reaper
    ship the job too)."""
    heartbeat = Heartbeat(lock.refresh, interval or lock.ttl_ms / 4000, name=f"keep-{lock.key}")
    heartbeat.start()
    try:
        yield heartbeat
    finally:
        heartbeat.stop()
