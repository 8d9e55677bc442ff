"""The dashboard's actions: cancel, retry (``lifecycle.retry``), submit. Each checks the token,
then calls the function the CLI calls, so every outcome and error reads as on the command line.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_farm.errors import LoraFarmError, SpecError
from lora_farm.ledger import Ledger
from lora_farm.settings import Settings
from lora_farm.submit import submit_files
from lora_farm.workers.dispatch import Sender, celery_sender, dispatch_once
from lora_farm.workers.lifecycle import cancel as cancel_job

TOKEN_HEADER = "X-Lorafarm-Token"
UPLOAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ActionRefused(LoraFarmError):
    """Raised when an action comes without the right token, or no token is configured."""


def check_token(configured: str, given: str | None) -> None:
    """Actions need ``LORAFARM_WEB_TOKEN``; compared in constant time."""
    if not configured:
        raise ActionRefused("actions are off: this dashboard has no token. Fix: start it with "
                            "LORAFARM_WEB_TOKEN=<a long random string> and give that token here.")
    if not given or not hmac.compare_digest(configured.encode(), given.encode()):
        raise ActionRefused("refused: the token is missing or wrong. Fix: enter the dashboard's "
                            "token (LORAFARM_WEB_TOKEN) in the token field and try again.")


def cancel(ledger: Ledger, job_id: str) -> str:
    """`lorafarm cancel JOB`: what happened, as the CLI prints it."""
    record = ledger.find(job_id)
    outcome = cancel_job(ledger, record.id)
    dispatch_once(ledger)  # a reservation freed by a cancelled scheduled job goes to others
    return f"{record.id} {record.name}: {outcome}"


@dataclass
class SubmitResult:
    lines: list[str] = field(default_factory=list)  # one per job, as `lorafarm submit` prints
    problems: list[str] = field(default_factory=list)  # every spec problem, file named as given
    error: str = ""  # any other refusal (no card fits, bad batch name)
    job_ids: list[str] = field(default_factory=list)


def submit_text(ledger: Ledger, settings: Settings, text: str, filename: str = "pasted.yaml",
                batch: str | None = None, send: Sender = celery_sender) -> SubmitResult:
    """Submit one YAML spec given as text: it is written under ``<output root>/_web/specs/`` (so
    a worker on another host reads the same resolved paths) and goes through ``submit_files``."""
    name = Path(filename or "pasted.yaml").name
    if not UPLOAD_NAME.fullmatch(name) or not name.endswith((".yaml", ".yml")):
        return SubmitResult(error=f"the file name {name!r} is not a plain .yaml name. Fix: "
                                  "upload a file named like `my-lora.yaml`.")
    path = spec_path(settings, text, name)
    try:
        report = submit_files([path], ledger, batch=batch or None, send=send)
    except SpecError as error:
        return SubmitResult(problems=[str(p).replace(str(path), name) for p in error.problems])
    except LoraFarmError as error:
        return SubmitResult(error=str(error).replace(str(path), name))
    return SubmitResult(lines=[job.line for job in report.jobs],
                        job_ids=[job.record.id for job in report.jobs])


def spec_path(settings: Settings, text: str, name: str) -> Path:
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = settings.output_root_abs / "_web" / "specs" / digest
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path
