"""Farm settings from the environment (``LORAFARM_*``), with embedded defaults.

Secrets (S3 keys, the Redis password inside the URL) are read here and nowhere else; they are
never written to the ledger, a log or an error message.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lora_farm.errors import ConfigError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFARM_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field("lorafarm", description="prefix of every Redis key the farm writes")
    hostname: str = Field("", description="this host's name in the farm (default: the OS "
                          "hostname); two worker hosts on one machine need two names")
    # output_root and storage_dir are made absolute once, at load (see _absolute)
    output_root: Path = Field(Path("output"), validate_default=True,
                              description="where job folders live (shared FS)")
    gpus: str = Field("", description="declared inventory 'name:memory,...' when there is no NVML")
    host_ram: str = Field("", description="this host's RAM for placement, e.g. '64GiB' (default: "
                          "what the OS reports)")
    policy: str = Field("", description="placement policy file (default: scheduler/policy.yaml)")
    headroom: str = Field("", description="overrides the policy's headroom (a fraction)")
    visibility_timeout: int = Field(7 * 24 * 3600, description="seconds before Redis redelivers")
    heartbeat_seconds: float = 5.0
    stale_after_seconds: float = 60.0
    cancel_grace_seconds: float = 20.0
    data_roots: str = Field("", description="folders a dataset's symlinks and metadata.csv paths "
                            "may lead into besides the dataset's own folder (absolute, os.pathsep-"
                            "separated)")
    s3_bucket: str = ""
    s3_prefix: str = "lora-farm"
    s3_endpoint_url: str = ""
    s3_region: str = ""
    # storage tuning (shipping); keys come from the standard boto3 chain, never from here
    storage_dir: Path | None = Field(None, description="local storage root when no S3 bucket is "
                                     "set (default: <output_root>/_storage)")
    s3_multipart_threshold_mb: int = Field(64, ge=5, description="files above this go multipart")
    s3_multipart_chunksize_mb: int = Field(64, ge=5, description="multipart part size (S3 min 5)")
    s3_max_attempts: int = Field(5, ge=1, le=50, description="botocore retries per request")
    upload_retry_seconds: float = Field(30.0, gt=0, description="first wait before an upload "
                                        "that hit a storage outage is tried again (doubles)")
    upload_retry_max_seconds: float = Field(600.0, gt=0, description="cap of that wait")

    @field_validator("output_root", "storage_dir")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        # a relative path would name another folder in each process whose cwd differs (a
        # worker, its trainer, a later `lorafarm artifacts`); the ledger records absolute ones
        return None if path is None else path.expanduser().resolve()

    @field_validator("data_roots")
    @classmethod
    def _absolute_roots(cls, value: str) -> str:
        relative = [root for root in value.split(os.pathsep) if root and not os.path.isabs(root)]
        if relative:  # relative to which process's cwd? A worker's differs from submit's
            raise ValueError(f"lists the relative path {relative[0]!r}; write absolute folders")
        return value

    @property
    def data_roots_abs(self) -> tuple[Path, ...]:
        return tuple(Path(root).resolve() for root in self.data_roots.split(os.pathsep) if root)

    @property
    def output_root_abs(self) -> Path:
        return self.output_root.expanduser().resolve()  # already so, unless set by model_copy


def host_name() -> str:
    """Who this host is in the ledger, locks and worker names: ``LORAFARM_HOSTNAME`` or the OS's."""
    return get_settings().hostname or socket.gethostname()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, loaded once."""
    return load_settings()


def load_settings() -> Settings:
    """The settings as the environment says now (``get_settings`` keeps the first)."""
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigError("\n".join(_env_problem(item) for item in error.errors())) from None


def _env_problem(item: dict) -> str:
    name = "LORAFARM_" + "_".join(str(part) for part in item["loc"]).upper()
    return (f"{name}={item.get('input')!r} is invalid: {item['msg']}. "
            f"Fix: correct or unset {name} (the README lists the settings).")


def reload_settings() -> Settings:
    """Re-read the environment (tests and long-lived processes that change it)."""
    get_settings.cache_clear()
    return get_settings()
