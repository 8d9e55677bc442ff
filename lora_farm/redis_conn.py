"""The Redis client of the farm (ledger, locks, snapshots), built from ``LORAFARM_REDIS_URL``.

``redis://``, ``rediss://`` (TLS) and passwords in the URL all work. The URL may hold a password,
so only :func:`redact_url` output ever reaches a message or a log.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis

from lora_farm.errors import BrokerUnavailable, ConfigError
from lora_farm.settings import Settings, get_settings

_SCHEMES = ("redis", "rediss", "unix")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    server = parts.netloc.rpartition("@")[2]  # host:port as written
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{server}"))


def make_client(url: str | None = None, settings: Settings | None = None) -> redis.Redis:
    """A client for the URL (default: the settings' ``redis_url``); answers are ``str``."""
    url = url or (settings or get_settings()).redis_url
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise ConfigError(f"LORAFARM_REDIS_URL must start with redis://, rediss:// or unix://, "
                          f"got {redact_url(url)!r}.")
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                socket_timeout=30, health_check_interval=30)


def ping(client: redis.Redis, url: str | None = None) -> None:
    """Raise ``BrokerUnavailable`` (URL redacted, with the fix) when Redis does not answer."""
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError, OSError) as error:
        where = redact_url(url or get_settings().redis_url)
        raise BrokerUnavailable(
            f"Redis does not answer at {where}: {type(error).__name__}: {error}. Start Redis "
            f"(e.g. `docker compose up -d redis`) or set LORAFARM_REDIS_URL to a reachable "
            f"server.") from None


def bytes_client(client: redis.Redis) -> redis.Redis:
    """The same server and credentials, answers as ``bytes`` (for code that expects them)."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs["decode_responses"] = False
    pool = redis.ConnectionPool(connection_class=client.connection_pool.connection_class, **kwargs)
    return redis.Redis(connection_pool=pool)


def connect(settings: Settings | None = None) -> redis.Redis:
    """A client that has answered a ping."""
    settings = settings or get_settings()
    client = make_client(settings.redis_url)
    ping(client, settings.redis_url)
    return client
