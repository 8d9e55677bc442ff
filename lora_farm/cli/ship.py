"""lorafarm ship commands: artifacts, fetch, retry-upload, flower, up, down, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from lora_farm.cli.app import app, console, fail, refuse_blank_ids


def _shipped_record(job: str):
    """The job's record, once its files are stored; else fail, saying why there are none."""
    from lora_farm.ledger import Ledger

    record = Ledger.from_settings().find(job)
    if record.state not in ("succeeded", "uploading"):
        fail(_no_artifacts(record))
    return record


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
def artifacts(job: str = typer.Argument(..., callback=refuse_blank_ids,
                                        help="job id (or a unique prefix)"),
              as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON")) -> None:
    """List a job's stored files with their sizes, sha256 and URIs."""
    from lora_farm.shipping import read_manifest

    record = _shipped_record(job)
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


def _no_artifacts(record) -> str:
    """Why a job that did not succeed has no artifacts, and what it does have."""
    from lora_farm.protocol import JobDir

    job = f"job {record.id} ({record.name})"
    if record.state not in ("cancelled", "failed"):
        return (f"{job} is {record.state}: its artifacts are stored when it succeeds; "
                f"`lorafarm status {record.id}` shows where it is.")
    reason = f" ({record.exit_reason})" if record.exit_reason else ""
    archive = JobDir(Path(record.job_dir)).log_archive if record.job_dir else None
    has = (f"Its log archive: {archive}; `lorafarm logs {record.id}` prints its log."
           if archive and archive.is_file() else "It never ran: there is no log either.")
    return f"{job} was {record.state}{reason}: it has no artifacts (only a succeeded job has). {has}"


@app.command()
def fetch(job: str = typer.Argument(..., callback=refuse_blank_ids, help="job id (or a unique prefix)"),
          dest: Path = typer.Argument(..., help="folder to download into (created if missing)")) -> None:
    """Download a job's stored files into DEST and verify each sha256."""
    from lora_farm.shipping import fetch_job

    record = _shipped_record(job)
    _check_destination(dest)
    files = fetch_job(_job_storage(record), record.batch, record.id, dest)
    for path in files:
        console.print(f"  {path}", highlight=False)
    console.print(f"[green]fetched and verified {len(files)} files of {record.id}[/]")


def _check_destination(dest: Path) -> None:
    """DEST must be a folder, or creatable in one, that this user may write into."""
    dest = dest.absolute()
    existing = next(p for p in (dest, *dest.parents) if p.exists())
    inside = "" if existing == dest else f", so {dest} cannot be created"
    if not existing.is_dir():
        fail(f"the destination {existing} is a file, not a folder{inside}. Fix: pass a folder to "
             "download into (it is created if missing).")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"the destination {existing} is not writable for this user{inside}. Fix: pass a "
             "folder you can write to.")


@app.command("retry-upload")
def retry_upload_command(job: str = typer.Argument(..., callback=refuse_blank_ids,
                                                   help="job id waiting in `uploading`")) -> None:
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


def flower_auth_hint() -> str | None:
    """Flower's HTTP API answers 401 unless it has credentials or is opened explicitly."""
    if os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_UNAUTHENTICATED_API"):
        return None
    return ("note: Flower's HTTP API (/api/...) answers 401 without credentials; set "
            "FLOWER_BASIC_AUTH=user:password to use it (the README's Flower section says more)")


@app.command()
def flower(port: int = typer.Option(5555, help="HTTP port"),
           address: str = typer.Option("127.0.0.1", help="listen address (0.0.0.0 in a container)"),
           url_prefix: str = typer.Option("", help="behind a reverse proxy at /PREFIX")) -> None:
    """Start Flower (worker health, tasks) on the farm's broker.

    Set FLOWER_BASIC_AUTH=user:password to protect it (and enable its HTTP API).
    """
    hint = flower_auth_hint()
    if hint:
        print(hint, file=sys.stderr, flush=True)
    os.execv(sys.executable, flower_argv(port, address, url_prefix))


@app.command()
def up(flower: bool = typer.Option(False, "--flower", help="also start Flower"),
       flower_port: int = typer.Option(5555, help="Flower's port"),
       web: bool = typer.Option(False, "--web", help="also start the dashboard (`lorafarm web`)"),
       web_port: int = typer.Option(8750, help="the dashboard's port")) -> None:
    """Bring this farm up on this machine: Redis (if none answers), a worker per GPU, Flower,
    the dashboard.

    A farm is its Redis URL and LORAFARM_KEY_PREFIX; `up` for another one starts another farm.
    """
    from lora_farm.localfarm import farm_up

    state = farm_up(with_flower=flower, flower_port=flower_port, with_web=web, web_port=web_port)
    if state.dead:
        console.print(f"this farm's recorded processes had stopped ({_pids(state.dead)}); cleaned "
                      "up and started it again", highlight=False)
    for process in state.processes:
        console.print(f"  started {process.role:<8} pid {process.pid:<7} log {process.log}",
                      highlight=False)
    if state.running:
        console.print(f"this farm was already up: {_farm_summary(state.running)}", highlight=False)
    if any(p.role == "flower" for p in state.processes) and flower_auth_hint():
        console.print(flower_auth_hint(), highlight=False)
    if any(p.role == "web" for p in state.processes):
        console.print(f"dashboard: http://127.0.0.1:{web_port}/", highlight=False)
    console.print(f"[green]farm up[/] ({escape(state.where)}); `lorafarm down` stops it",
                  highlight=False)


@app.command()
def down() -> None:
    """Stop what `lorafarm up` started for this farm (its Redis URL and LORAFARM_KEY_PREFIX).

    Workers finish by checkpointing; Redis keeps its data; another farm's processes are left alone.
    """
    from lora_farm.localfarm import farm_down

    result = farm_down()
    for process in result.stopped:
        console.print(f"  stopped {process.role:<8} pid {process.pid}", highlight=False)
    for process, other in result.handed_over:
        console.print(f"  left Redis pid {process.pid} running: the farm on {other} uses it "
                      "(its `lorafarm down` stops it)", highlight=False)
    if result.stopped or result.handed_over:
        console.print(f"[green]farm down[/] ({escape(result.where)})", highlight=False)
    else:
        console.print(f"no farm started by `lorafarm up` runs on {result.where}; nothing stopped",
                      highlight=False)


def _pids(processes: list) -> str:
    return ", ".join(f"{p.role} pid {p.pid}" for p in processes)


def _farm_summary(processes: list) -> str:
    """E.g. '1 redis, 2 workers (18 processes)': what is running, children included."""
    from lora_farm.localfarm import process_count

    roles = [p.role for p in processes]
    parts = [f"{roles.count(role)} {role}{'s' if roles.count(role) > 1 else ''}"
             for role in ("redis", "worker", "flower", "web") if role in roles]
    return f"{', '.join(parts)} ({process_count(processes)} processes)"


@app.command()
def demo(root: Path = typer.Option(Path("output/demo"), help="where the demo models, data and "
                                   "specs go"),
         keep_up: bool = typer.Option(False, help="leave the farm running afterwards"),
         steps_scale: int = typer.Option(1, min=1, help="train N times longer")) -> None:
    """Bring the farm up, build the demo batch, submit, watch its jobs, list the artifacts."""
    from lora_farm.ledger import Ledger
    from lora_farm.localfarm import farm_up
    from lora_farm.settings import get_settings
    from lora_farm.submit import submit_files

    settings = get_settings()
    state = farm_up(settings)
    running = state.processes or state.running
    console.print(f"farm up ({escape(state.where)}): {_farm_summary(running)}"
                  + ("" if state.started_anything else ", already running"), highlight=False)
    try:
        ledger = Ledger.from_settings(settings)
        _require_workers(ledger, settings)
        console.print(f"building the demo batch under {root} (tiny offline models, seconds)")
        specs = _build_demo_batch(root, steps_scale)
        batch = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh batch: a rerun trains again
        report = submit_files(specs, ledger, batch=batch, settings=settings)
        records = _watch_demo(ledger, settings, [job.record.id for job in report.jobs])
        _print_artifacts(records)
    finally:
        _leave_farm(state, keep_up, settings)
    failed = [r for r in records if r.state != "succeeded"]
    if failed:
        fail(f"{len(failed)} demo job(s) did not succeed: "
             + ", ".join(f"{r.name} ({r.state}: {r.exit_reason})" for r in failed)
             + "; `lorafarm logs JOB` shows why")


def _build_demo_batch(root: Path, steps_scale: int) -> list[Path]:
    """The tiny models need torch: build them in a child process, so the CLI never imports it."""
    built = subprocess.run([sys.executable, "-m", "lora_farm.demo", str(root), "--steps-scale",
                            str(steps_scale)], stdout=subprocess.PIPE, text=True)
    if built.returncode != 0:
        fail(f"building the demo batch under {root} failed (exit {built.returncode}; its error is "
             "above). Fix: install the training stack: pip install -c constraints.txt -e '.[train]'")
    return [Path(line) for line in built.stdout.splitlines() if line.strip()]


def _require_workers(ledger, settings) -> None:
    """Fail unless a worker of this farm beat lately (a hung or dead one serves no queue)."""
    from lora_farm.localfarm import describe_farm, farm_home
    from lora_farm.workers.presence import read_workers

    now = time.time()
    if any(now - w["heartbeat"] < settings.stale_after_seconds for w in read_workers(ledger)):
        return
    fail(f"no worker serves this farm ({describe_farm(settings)}): none sent a heartbeat in the "
         f"last {settings.stale_after_seconds:.0f}s, so the demo jobs would wait forever. Fix: "
         f"`lorafarm down` then `lorafarm demo` again; worker logs: {farm_home(settings) / 'logs'}")


def _watch_demo(ledger, settings, job_ids: list[str]) -> list:
    """A live table until every job has ended, or no worker is left to run them."""
    from lora_farm.cli.status_view import watch_until_done

    return watch_until_done(console, ledger, job_ids, check=lambda: _require_workers(ledger, settings))


def _leave_farm(state, keep_up: bool, settings) -> None:
    """Stop what the demo started, or say what stays up and how to stop it."""
    from lora_farm.localfarm import farm_down, load_processes

    if state.started_anything and not keep_up:
        farm_down(settings)
        console.print("farm down (stopped what the demo started)")
        return
    console.print(f"the farm stays up: {_farm_summary(load_processes(settings))}; "
                  "`lorafarm down` stops it", highlight=False)


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


@app.command()
def web(host: str = typer.Option("127.0.0.1", help="listen address (another than loopback needs "
                                 "LORAFARM_WEB_TOKEN)"),
        port: int = typer.Option(8750, help="HTTP port")) -> None:
    """The dashboard: jobs, loss curves, samples, cards; cancel/retry/submit with LORAFARM_WEB_TOKEN."""
    from lora_farm.settings import get_settings
    from lora_farm.web.serve import serve, web_config

    web_config(host)  # refuse a bad address/token before printing anything
    console.print(f"lorafarm web on http://{host}:{port}/ (Ctrl-C stops it)", highlight=False)
    serve(get_settings(), host, port)
