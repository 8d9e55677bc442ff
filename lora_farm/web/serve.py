"""`lorafarm web`: the address and token rules, then uvicorn.

It listens on 127.0.0.1 unless told otherwise; any other address needs ``LORAFARM_WEB_TOKEN``
(actions always do), since the dashboard can cancel jobs and submit new ones.
"""

from __future__ import annotations

import ipaddress
import os

from lora_farm.errors import ConfigError
from lora_farm.settings import Settings

TOKEN_ENV = "LORAFARM_WEB_TOKEN"
MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


def web_config(host: str, token: str | None = None):
    """The dashboard's config for this address, or a ConfigError saying what to set."""
    from lora_farm.web.app import WebConfig

    token = os.environ.get(TOKEN_ENV, "") if token is None else token
    if token and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{TOKEN_ENV} is {len(token)} characters long; it guards cancel and submit, "
                          f"so it must have at least {MIN_TOKEN_LENGTH}. Fix: "
                          f"`export {TOKEN_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')`.")
    if not is_loopback(host) and not token:
        raise ConfigError(f"refusing to listen on {host!r} without a token: anyone who reaches it "
                          f"could cancel and submit jobs. Fix: set {TOKEN_ENV} (16+ characters), "
                          "or listen on 127.0.0.1 (the default).")
    return WebConfig(token=token, guard_reads=not is_loopback(host))


def serve(settings: Settings, host: str, port: int, token: str | None = None) -> None:
    import uvicorn

    from lora_farm.ledger import Ledger
    from lora_farm.web.app import create_app

    config = web_config(host, token)
    app = create_app(Ledger.from_settings(settings), settings, config)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
