"""lorafarm farm commands: submit, status, logs, cancel, retry, gpus, workers, worker."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.markup import escape

from lora_farm.cli.app import app, console, err_console, refuse_blank_ids
from lora_farm.errors import SpecError


def _ledger():
    from lora_farm.ledger import Ledger

    return Ledger.from_settings()


@app.command()
def submit(
    files: list[Path] = typer.Argument(..., help="Job spec YAML files, or folders of them.",
                                       show_default=False),
    batch: str = typer.Option(None, "--batch", "-b", help="Batch name (default: the spec's, else 'default')."),
    priority: int = typer.Option(None, "--priority", "-p", help="Override the specs' priority (higher first)."),
    wait: bool = typer.Option(False, "--wait", help="Wait until every job has finished."),
) -> None:
    """Validate every file, then queue them all (or nothing). Identical resubmits are no-ops."""
    from lora_farm.jobs.loader import expand_spec_paths
    from lora_farm.submit import submit_files

    ledger = _ledger()
    try:
        report = submit_files(expand_spec_paths(files), ledger, batch=batch, priority=priority)
    except SpecError as error:
        for problem in error.problems:
            err_console.print(f"[red]✗[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
        err_console.print(f"{len(error.problems)} problem(s); nothing was queued.", highlight=False)
        raise typer.Exit(1) from None
    for job in report.jobs:
        word, rest = job.line.split(" ", 1)
        console.print(f"[{'green' if job.created else 'yellow'}]{word}[/] {escape(rest)}", highlight=False)
    if report.placed:
        console.print(f"{len(report.placed)} job(s) placed on cards now.")
    if wait:
        _wait_for(ledger, [job.record for job in report.jobs])


def _wait_for(ledger, submitted: list) -> None:
    from lora_farm.cli.status_view import watch_until_done
    from lora_farm.jobs.state import JobState

    try:
        records = watch_until_done(console, ledger, [r.id for r in submitted], poll=2.0)
    except KeyboardInterrupt:
        batches = sorted({r.batch for r in submitted})
        err_console.print(f"stopped waiting; the {len(submitted)} job(s) keep running on the farm. "
                          + " ".join(f"Follow them: `lorafarm status --batch {b} --watch`; cancel "
                                     f"them: `lorafarm cancel --batch {b}`." for b in batches),
                          highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    failed = [r for r in records if r.state != JobState.SUCCEEDED.value]
    if failed:
        err_console.print(f"{len(failed)} of {len(records)} job(s) did not succeed.")
        raise typer.Exit(1)


@app.command()
def status(
    job: str = typer.Argument(None, callback=refuse_blank_ids,
                              help="A job id (or unique prefix) for its full record.",
                              show_default=False),
    batch: str = typer.Option(None, "--batch", "-b", metavar="NAME", help="Only this batch."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh every 2 s until Ctrl-C."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (every job, whole reasons)."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV (every job, whole reasons)."),
    show_all: bool = typer.Option(False, "--all", "-a", help="Every job (default: as many as fit "
                                  "the terminal: active jobs first, then the newest finished)."),
) -> None:
    """The ledger as a table fitted to the terminal: state, card, progress, loss, ETA, reason."""
    from lora_farm.cli import status_view as view

    ledger = _ledger()
    if job:
        _show_one(ledger, ledger.find(job), as_json, as_csv)
        return
    if as_json:
        sys.stdout.write(view.to_json(ledger.list_jobs(batch=batch, with_spec=False)) + "\n")
    elif as_csv:
        sys.stdout.write(view.to_csv(ledger.list_jobs(batch=batch, with_spec=False)))
    elif watch:
        view.watch_status(console, lambda rows: view.read_view(ledger, batch, rows), show_all)
    else:
        view.print_status(console, lambda rows: view.read_view(ledger, batch, rows), show_all)


def _show_one(ledger, record, as_json: bool, as_csv: bool) -> None:
    import json

    from lora_farm.cli import status_view as view

    timeline = ledger.timeline(record.id)
    if as_json:
        sys.stdout.write(json.dumps(record.to_public() | {"timeline": timeline}, indent=2, default=str) + "\n")
        return
    if as_csv:
        sys.stdout.write(view.to_csv([record]))
        return
    view.print_record(console, record)
    for entry in timeline:
        stamp = time.strftime("%H:%M:%S", time.localtime(entry["t"]))
        extra = "".join(f" {k}={entry[k]}" for k in ("gpus", "reserved_mb", "released_mb") if k in entry)
        console.print(f"  {stamp} {entry.get('from') or '-'} -> {entry['to']}  {entry.get('reason', '')}{extra}",
                      highlight=False, markup=False)


@app.command()
def logs(job: str = typer.Argument(..., callback=refuse_blank_ids, help="Job id (or unique prefix)."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines.")) -> None:
    """Print a job's train.log (the trainer's output, one header per attempt)."""
    from lora_farm.jobs.state import TERMINAL, JobState
    from lora_farm.settings import get_settings
    from lora_farm.protocol import JobDir
    from lora_farm.workers.runner import job_dir_for

    ledger = _ledger()
    record = ledger.find(job)
    path = JobDir(Path(record.job_dir or job_dir_for(record, get_settings()))).log
    if not path.exists() and not follow:
        raise typer.Exit(_no_log(record, path))
    offset = 0
    while True:
        if path.exists():
            with open(path, encoding="utf-8", errors="replace") as stream:
                stream.seek(offset)
                sys.stdout.write(stream.read())
                sys.stdout.flush()
                offset = stream.tell()
        if not follow or JobState(ledger.get(record.id).state) in TERMINAL:
            return
        time.sleep(1)


def _no_log(record, path: Path) -> int:
    """Say why there is no log: the job has not started yet, or it ended before it started."""
    job = f"job {record.id} ({record.name})"
    if record.state in ("cancelled", "failed") and record.started is None:
        why = f": {record.exit_reason}" if record.exit_reason else ""
        message = f"{job} was {record.state} before it started{why}; it has no log."
    elif record.state in ("queued", "scheduled", "retrying"):
        message = (f"{job} is {record.state} and has not started, so it has no log yet; "
                   f"`lorafarm logs {record.id} -f` waits for it.")
    else:
        message = f"{job} ({record.state}) has no log at {path}."
    err_console.print(message, highlight=False, markup=False, soft_wrap=True)
    return 1


@app.command()
def cancel(jobs: list[str] = typer.Argument(None, callback=refuse_blank_ids,
                                            help="Job ids (or unique prefixes)."),
           batch: str = typer.Option(None, "--batch", "-b", help="Cancel every unfinished job of a batch.")) -> None:
    """Cancel jobs: queued ones at once; running ones stop their trainer (SIGTERM, grace, SIGKILL)."""
    from lora_farm.workers.dispatch import dispatch_once
    from lora_farm.workers.lifecycle import cancel as cancel_job

    ledger = _ledger()
    if not jobs and not batch:
        raise typer.BadParameter("name one or more jobs, or --batch NAME")
    records = [ledger.find(j) for j in jobs or []] + (ledger.list_jobs(batch=batch) if batch else [])
    for record in records:
        outcome = cancel_job(ledger, record.id)
        console.print(f"{record.id} {record.name}: {outcome}", highlight=False)
    dispatch_once(ledger)  # reservations freed by cancelled scheduled jobs go to others


@app.command()
def retry(job: str = typer.Argument(..., callback=refuse_blank_ids,
                                    help="A failed or cancelled job.")) -> None:
    """Queue a failed or cancelled job again (fresh retry budget; resumes from its checkpoint)."""
    from lora_farm.workers.lifecycle import retry as retry_job

    console.print(retry_job(_ledger(), job))


@app.command()
def gpus() -> None:
    """The farm's cards: memory, reservations, the jobs on each, and whether a worker serves it."""
    from lora_farm.cli.status_view import gpus_table
    from lora_farm.settings import get_settings
    from lora_farm.workers.dispatch import read_gpu_snapshots

    ledger = _ledger()
    cards = read_gpu_snapshots(ledger)
    if not cards:
        console.print("no worker has published a card yet; start one with `lorafarm worker`.")
        return
    reservations = ledger.reservations()
    names = {r.id: r.name for r in ledger.records(reservations)}
    console.print(gpus_table(cards, reservations, names, get_settings().stale_after_seconds))


@app.command()
def workers() -> None:
    """Online workers: their queues, slots, active jobs and heartbeat age."""
    from lora_farm.cli.status_view import workers_table
    from lora_farm.settings import get_settings
    from lora_farm.workers.presence import read_workers

    found = read_workers(_ledger())
    if not found:
        console.print("no worker online; start one with `lorafarm worker`.")
        return
    console.print(workers_table(found, get_settings().stale_after_seconds))


@app.command()
def worker(
    gpus_option: str = typer.Option(None, "--gpus", "--gpu", help="Cards to serve (uuids, comma-separated; default: all)."),
    pool: str = typer.Option("prefork", "--pool", help="Celery pool (prefork, threads, solo)."),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
) -> None:
    """Start one Celery worker per card of this host, each on its queue gpu.<uuid>, restarted if it
    exits (backoff; a crash loop exits 1); Ctrl-C stops all."""
    from lora_farm.workers.launch import run_workers

    selected = [g.strip() for g in gpus_option.split(",") if g.strip()] if gpus_option else None
    raise typer.Exit(run_workers(selected, pool=pool, loglevel=loglevel))
