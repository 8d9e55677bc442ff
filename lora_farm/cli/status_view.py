"""Rendering the ledger: the rich status table, JSON and CSV exports, the gpus/workers tables."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table

from lora_farm.ledger import JobRecord
from lora_farm.protocol import format_duration

STATE_STYLE = {"queued": "white", "scheduled": "cyan", "running": "bold blue",
               "uploading": "magenta", "succeeded": "green", "failed": "bold red",
               "cancelled": "yellow", "retrying": "yellow"}
CSV_FIELDS = ("id", "name", "batch", "state", "attempt", "priority", "gpu", "host", "phase",
              "step", "total_steps", "loss", "eta_s", "duration_s", "peak_vram_mb", "estimate_mb",
              "gpu_util", "submitted", "started", "finished", "exit_reason", "config_hash",
              "manifest_uri")


def progress_bar(record: JobRecord, width: int = 12) -> str:
    if record.state == "succeeded":
        return "█" * width + " 100%"
    if not record.total_steps or record.step is None:
        return ""
    fraction = max(0.0, min(1.0, record.step / record.total_steps))
    filled = int(round(fraction * width))
    return "█" * filled + "░" * (width - filled) + f" {fraction:4.0%}"


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value / 1024:.1f} GB" if value >= 1024 else f"{value:.0f} MB"


def status_table(records: Sequence[JobRecord], now: float | None = None, title: str = "") -> Table:
    now = now or time.time()
    table = Table(title=title or None, header_style="bold", expand=False)
    for column in ("id", "name", "state", "GPU", "progress", "loss", "ETA", "duration",
                   "peak VRAM", "reason"):
        table.add_column(column, overflow="fold" if column == "reason" else "ellipsis",
                         no_wrap=column != "reason")
    for r in records:
        state = f"[{STATE_STYLE.get(r.state, 'white')}]{r.state}[/]"
        if r.attempt > 1:
            state += f" #{r.attempt}"
        eta = format_duration(r.eta_s) if r.state == "running" and r.eta_s is not None else ""
        duration = r.duration(now)
        table.add_row(r.id, r.name, state, r.gpu, progress_bar(r),
                      "" if r.loss is None else f"{r.loss:.4f}", eta,
                      "" if duration is None else format_duration(duration),
                      _mb(r.peak_vram_mb), escape(r.exit_reason) if r.state != "succeeded" else "")
    return table


RICH_ROWS = 500  # above this, rich's per-cell layout costs seconds: print plain columns instead
_PLAIN = "{:<12}  {:<24.24}  {:<12}  {:<12.12}  {:<17}  {:>8}  {:>6}  {:>8}  {:>9}  {}"


def plain_lines(records: Sequence[JobRecord], now: float | None = None) -> list[str]:
    """The status table as fixed-width text: same columns, no layout pass."""
    now = now or time.time()
    lines = [_PLAIN.format("id", "name", "state", "GPU", "progress", "loss", "ETA", "duration",
                           "peak VRAM", "reason")]
    for r in records:
        state = r.state + (f" #{r.attempt}" if r.attempt > 1 else "")
        eta = format_duration(r.eta_s) if r.state == "running" and r.eta_s is not None else ""
        duration = r.duration(now)
        lines.append(_PLAIN.format(r.id, r.name, state, r.gpu, progress_bar(r),
                                   "" if r.loss is None else f"{r.loss:.4f}", eta,
                                   "" if duration is None else format_duration(duration),
                                   _mb(r.peak_vram_mb), r.exit_reason if r.state != "succeeded" else ""))
    return lines


def watch_until_done(console, ledger, job_ids: list[str], poll: float = 1.0) -> list[JobRecord]:
    """A live table of these jobs until every one has ended; their final records."""
    from rich.live import Live

    from lora_farm.jobs.state import TERMINAL, JobState

    with Live(console=console, refresh_per_second=1) as live:
        while True:
            records = ledger.records(job_ids)
            live.update(status_table(records))
            if all(JobState(r.state) in TERMINAL for r in records):
                return records
            time.sleep(poll)


def print_status(console, records: Sequence[JobRecord], show_all: bool, recent: int) -> None:
    """What `lorafarm status` prints: the table (rich, or plain when long) and a summary."""
    shown, hidden = recent_view(records, len(records) if show_all else recent)
    if len(shown) > RICH_ROWS:
        console.file.write("\n".join(plain_lines(shown)) + "\n")
    else:
        console.print(status_table(shown))
    note = f" ({hidden} older finished jobs not shown: --all, --csv or --json)" if hidden else ""
    console.print(summary_line(records) + note, highlight=False)


def recent_view(records: Sequence[JobRecord], finished_shown: int) -> tuple[list[JobRecord], int]:
    """Every unfinished job plus the newest ``finished_shown`` finished ones (in ledger order);
    returns them and how many finished jobs were left out."""
    finished = [i for i, r in enumerate(records) if r.state in ("succeeded", "failed", "cancelled")]
    hidden = set(finished[:-finished_shown] if finished_shown else finished)
    return [r for i, r in enumerate(records) if i not in hidden], len(hidden)


def summary_line(records: Sequence[JobRecord]) -> str:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
    return f"{len(records)} job(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _flat(record: JobRecord, now: float) -> dict:
    data = record.to_public()
    data["gpu"] = record.gpu
    data["duration_s"] = record.duration(now)
    return data


def to_json(records: Sequence[JobRecord], now: float | None = None) -> str:
    now = now or time.time()
    return json.dumps([_flat(r, now) for r in records], indent=2, default=str)


def to_csv(records: Sequence[JobRecord], now: float | None = None) -> str:
    now = now or time.time()
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if v is None else v) for k, v in _flat(record, now).items()})
    return out.getvalue()


def gpus_table(cards: list[dict], reservations: dict[str, dict], names: dict[str, str],
               stale_after: float, now: float | None = None) -> Table:
    now = now or time.time()
    table = Table(header_style="bold")
    for column in ("card", "host", "total", "free", "reserved", "jobs", "util", "worker"):
        table.add_column(column)
    for card in cards:
        held = [(job, r["mb"]) for job, r in reservations.items() if card["uuid"] in r["gpus"]]
        age = now - float(card.get("heartbeat", 0))
        online = "[green]online[/]" if age <= stale_after else f"[red]offline {format_duration(age)}[/]"
        util = card.get("util_pct") or ""
        table.add_row(card["uuid"], card.get("host", ""), _mb(float(card["total_mb"])),
                      _mb(float(card["free_mb"])), _mb(sum(mb for _, mb in held)),
                      ", ".join(f"{job} {names.get(job, '')}".strip() for job, _ in held),
                      f"{float(util):.0f}%" if util else "", online)
    return table


def workers_table(workers: list[dict], stale_after: float, now: float | None = None) -> Table:
    now = now or time.time()
    table = Table(header_style="bold")
    for column in ("worker", "host", "pid", "queues", "slots", "active jobs", "heartbeat"):
        table.add_column(column)
    for worker in workers:
        age = now - worker["heartbeat"]
        style = "green" if age <= stale_after else "red"
        table.add_row(worker["name"], worker["host"], str(worker["pid"]), ", ".join(worker["queues"]),
                      str(worker["slots"]), ", ".join(worker["jobs"]),
                      f"[{style}]{age:.0f}s ago[/]")
    return table
