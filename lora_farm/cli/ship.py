"""lorafarm ship commands: artifacts, fetch, retry-upload, flower, up, down, demo."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from lora_farm.cli.app import app, console, fail


def _record(job: str):
    from lora_farm.ledger import Ledger

    return Ledger.from_settings().find(job)


def _job_storage(record):
    """Where the job's upload went (the manifest URI in the ledger), else the configured storage."""
    from lora_farm.shipping import MANIFEST_NAME, job_prefix
    from lora_farm.storage import storage_holding

    return storage_holding(record.manifest_uri, f"{job_prefix(record.batch, record.id)}/{MANIFEST_NAME}")


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


@app.command()
def artifacts(job: str = typer.Argument(..., help="job id (or a unique prefix)"),
              as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON")) -> None:
    """List a job's stored files with their sizes, sha256 and URIs."""
    from lora_farm.shipping import read_manifest

    record = _record(job)
    manifest = read_manifest(_job_storage(record), record.batch, record.id)
    if as_json:
        console.print_json(json.dumps(manifest))
        return
    table = Table(title=f"{record.name} ({record.id}, batch {record.batch})")
    for column in ("file", "size", "sha256", "uri"):
        table.add_column(column, overflow="fold")
    for entry in manifest["files"]:
        table.add_row(entry["path"], _human_size(entry["size"]), entry["sha256"][:12], entry["uri"])
    console.print(table)
    console.print(f"manifest: {manifest['base_uri']}/manifest.json", highlight=False)


@app.command()
def fetch(job: str = typer.Argument(..., help="job id (or a unique prefix)"),
          dest: Path = typer.Argument(..., help="folder to download into")) -> None:
    """Download a job's stored files into DEST and verify each sha256."""
    from lora_farm.shipping import fetch_job

    record = _record(job)
    files = fetch_job(_job_storage(record), record.batch, record.id, dest)
    for path in files:
        console.print(f"  {path}", highlight=False)
    console.print(f"[green]fetched and verified {len(files)} files of {record.id}[/]")


@app.command("retry-upload")
def retry_upload_command(job: str = typer.Argument(..., help="job id waiting in `uploading`")) -> None:
    """Try the upload of a job waiting in `uploading` now (storage is back)."""
    from lora_farm.ledger import Ledger
    from lora_farm.workers.upload import retry_upload

    record = retry_upload(Ledger.from_settings(), job)
    if record.state == "succeeded":
        console.print(f"[green]{record.id} uploaded and verified: {record.manifest_uri}[/]")
    else:
        console.print(f"{record.id} is still `{record.state}`: {record.exit_reason}", highlight=False)
        raise typer.Exit(1)


def flower_argv(port: int, address: str, url_prefix: str = "") -> list[str]:
    """Flower on the farm's own Celery app: its broker URL (with any password) stays off argv."""
    argv = [sys.executable, "-m", "celery", "-A", "lora_farm.workers.app", "flower",
            f"--port={port}", f"--address={address}"]
    return argv + ([f"--url_prefix={url_prefix}"] if url_prefix else [])


@app.command()
def flower(port: int = typer.Option(5555, help="HTTP port"),
           address: str = typer.Option("127.0.0.1", help="listen address (0.0.0.0 in a container)"),
           url_prefix: str = typer.Option("", help="behind a reverse proxy at /PREFIX")) -> None:
    """Start Flower (worker health, tasks) on the farm's broker.

    Set FLOWER_BASIC_AUTH=user:password to protect it (and enable its HTTP API).
    """
    os.execv(sys.executable, flower_argv(port, address, url_prefix))


@app.command()
def up(flower: bool = typer.Option(False, "--flower", help="also start Flower"),
       flower_port: int = typer.Option(5555, help="Flower's port")) -> None:
    """Bring a whole farm up on this machine: Redis (if none answers), a worker per GPU, Flower."""
    from lora_farm.localfarm import farm_up

    state = farm_up(with_flower=flower, flower_port=flower_port)
    for process in state.processes:
        console.print(f"  started {process.role:<8} pid {process.pid:<7} log {process.log}",
                      highlight=False)
    if not state.processes:
        console.print("the farm was already up")
    console.print(f"[green]farm up[/] (Redis {state.redis_display}); `lorafarm down` stops "
                  "what this started")


@app.command()
def down() -> None:
    """Stop what `lorafarm up` started (workers finish by checkpointing; Redis keeps its data)."""
    from lora_farm.localfarm import farm_down

    stopped = farm_down()
    for process in stopped:
        console.print(f"  stopped {process.role:<8} pid {process.pid}", highlight=False)
    console.print("[green]farm down[/]" if stopped else "nothing was running")


@app.command()
def demo(root: Path = typer.Option(Path("output/demo"), help="where the demo models, data and "
                                   "specs go"),
         keep_up: bool = typer.Option(False, help="leave the farm running afterwards"),
         steps_scale: int = typer.Option(1, min=1, help="train N times longer")) -> None:
    """Build the demo batch, bring the farm up, submit, watch the four jobs, list the artifacts."""
    from lora_farm.cli.status_view import watch_until_done
    from lora_farm.demo import write_demo_batch
    from lora_farm.ledger import Ledger
    from lora_farm.localfarm import farm_down, farm_up
    from lora_farm.settings import get_settings
    from lora_farm.submit import submit_files

    settings = get_settings()
    console.print(f"building the demo batch under {root} (tiny offline models, seconds)")
    specs = write_demo_batch(root, steps_scale=steps_scale)
    state = farm_up(settings)
    console.print(f"farm up (Redis {state.redis_display}); started {len(state.processes)} process(es)")
    try:
        ledger = Ledger.from_settings(settings)
        batch = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh batch: a rerun trains again
        report = submit_files(specs, ledger, batch=batch, settings=settings)
        records = watch_until_done(console, ledger, [job.record.id for job in report.jobs])
        _print_artifacts(records)
    finally:
        if state.started_anything and not keep_up:
            farm_down(settings)
            console.print("farm down (stopped what the demo started)")
    failed = [r for r in records if r.state != "succeeded"]
    if failed:
        fail(f"{len(failed)} demo job(s) did not succeed: "
             + ", ".join(f"{r.name} ({r.state}: {r.exit_reason})" for r in failed)
             + "; `lorafarm logs JOB` shows why")


def _print_artifacts(records: list) -> None:
    from lora_farm.shipping import read_manifest

    table = Table(title="artifacts")
    for column in ("job", "file", "size", "uri"):
        table.add_column(column, overflow="fold")
    for record in records:
        if record.state == "succeeded":
            for entry in read_manifest(_job_storage(record), record.batch, record.id)["files"]:
                table.add_row(record.name, entry["path"], _human_size(entry["size"]), entry["uri"])
    console.print(table)
