"""Rendering the ledger: the status table (fitted to the terminal), one job's record, JSON and CSV
exports, the gpus/workers tables.

The status table lays itself out by hand instead of through rich's ``Table``: rich shrinks every
column evenly when the terminal is narrow (``succee…``), and its per-cell layout costs seconds at
thousands of rows. Here the state, progress, loss and ETA columns keep their whole width, and only
the name and the reason give way, cut with ``…``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lora_farm.ledger.record import JobRecord
from lora_farm.trainers.progress import format_duration

STATE_STYLE = {"queued": "white", "scheduled": "cyan", "running": "bold blue",
               "uploading": "magenta", "succeeded": "green", "failed": "bold red",
               "cancelled": "yellow", "retrying": "yellow"}
ACTIVE = ("running", "uploading", "scheduled", "retrying", "queued")  # shown first, in this order
FINISHED = ("succeeded", "failed", "cancelled")
WIDE_FROM = 120  # terminal columns: below this, the narrow layout
CHROME_LINES = 3  # summary line, header line, and the shell prompt (or the cursor line of --watch)
RICH_ROWS = 500  # above this, plain text: styling every line costs more than it shows
CSV_FIELDS = ("id", "name", "batch", "state", "attempt", "priority", "gpu", "host", "phase",
              "step", "total_steps", "loss", "eta_s", "duration_s", "peak_vram_mb", "estimate_mb",
              "gpu_util", "submitted", "started", "finished", "exit_reason", "config_hash",
              "manifest_uri")


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[JobRecord, float], str]
    align: str = "<"  # ">" for figures
    flex: bool = False  # gives way to the others (cut with …) when the terminal is narrow
    cap: int = 0  # cut above this many cells (a long list of GPU uuids)


def one_line(text: str) -> str:
    return " ".join(text.split())


def step_progress(record: JobRecord) -> str:
    """``Step 85/250 34%``; empty before the trainer reported its first step."""
    step = record.total_steps if record.state == "succeeded" and record.step is None else record.step
    if not record.total_steps or step is None:
        return ""
    return f"Step {step}/{record.total_steps} {max(0.0, min(1.0, step / record.total_steps)):.0%}"


def progress_bar(record: JobRecord, width: int = 10) -> str:
    text = step_progress(record)
    if not text:
        return ""
    filled = int(round(width * min(1.0, (record.step or record.total_steps) / record.total_steps)))
    return "█" * filled + "░" * (width - filled) + " " + text


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value / 1024:.1f} GB" if value >= 1024 else f"{value:.0f} MB"


def _state(record: JobRecord, now: float) -> str:
    return record.state + (f" #{record.attempt}" if record.attempt > 1 else "")


def _loss(record: JobRecord, now: float) -> str:
    return "" if record.loss is None else f"{record.loss:.4f}"


def _eta(record: JobRecord, now: float) -> str:
    running = record.state == "running" and record.eta_s is not None
    return format_duration(record.eta_s) if running else ""


def _duration(record: JobRecord, now: float) -> str:
    duration = record.duration(now)
    return "" if duration is None else format_duration(duration)


def _reason(record: JobRecord, now: float) -> str:
    return "" if record.state == "succeeded" else one_line(record.exit_reason)


_NAME = Column("name", lambda r, now: r.name, flex=True)
_REASON = Column("reason", _reason, flex=True)
NARROW = (Column("id", lambda r, now: r.id[:8]), _NAME, Column("state", _state),
          Column("GPU", lambda r, now: r.gpu, cap=12),
          Column("progress", lambda r, now: step_progress(r)), Column("loss", _loss, ">"),
          Column("ETA", _eta, ">"), _REASON)
WIDE = (Column("id", lambda r, now: r.id), _NAME, Column("state", _state),
        Column("GPU", lambda r, now: r.gpu, cap=40),
        Column("progress", lambda r, now: progress_bar(r)), Column("loss", _loss, ">"),
        Column("ETA", _eta, ">"), Column("duration", _duration, ">"),
        Column("peak VRAM", lambda r, now: _mb(r.peak_vram_mb), ">"), _REASON)


def display_order(records: Sequence[JobRecord]) -> list[JobRecord]:
    """Active jobs first (running, uploading, scheduled, queued; ledger order within a state),
    then the finished ones, newest first."""
    rank = {state: index for index, state in enumerate(ACTIVE)}
    active = sorted((r for r in records if r.state in rank), key=lambda r: rank[r.state])
    ended = sorted((r for r in records if r.state not in rank),
                   key=lambda r: (r.finished or 0.0, r.seq), reverse=True)
    return active + ended


def fit_rows(records: Sequence[JobRecord], rows: int | None) -> tuple[list[JobRecord], int]:
    """The jobs to show in ``rows`` lines (None: all), in display order, and how many did not fit."""
    ordered = display_order(records)
    if rows is None:
        return ordered, 0
    return ordered[:rows], max(0, len(ordered) - rows)


def summary_line(records: Sequence[JobRecord], hidden: int = 0) -> str:
    if not records:
        return "no jobs: `lorafarm submit FILES...` queues some"
    counts: dict[str, int] = {}
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
    known = [s for s in ACTIVE + FINISHED if s in counts]
    states = known + sorted(set(counts) - set(known))
    line = f"{len(records)} job(s): " + ", ".join(f"{counts[s]} {s}" for s in states)
    return line + (f"; {hidden} more not shown (--all)" if hidden else "")


@dataclass(frozen=True)
class TableText:
    lines: list[str]  # the header, then one line per job
    state_at: int  # the column where the state word starts (for its colour)


def table_text(records: Sequence[JobRecord], width: int, now: float | None = None) -> TableText:
    """The status table as lines of at most ``width`` cells (as long as the fixed columns fit)."""
    now = now or time.time()
    columns = WIDE if width >= WIDE_FROM else NARROW
    rows = [[column.header for column in columns]]
    rows += [[column.cell(record, now) for column in columns] for record in records]
    if not any(row[-1] for row in rows[1:]):  # no reason to show: its room goes to the names
        columns, rows = columns[:-1], [row[:-1] for row in rows]
    widths = _widths(columns, rows, width)
    lines = ["  ".join(_fit(cell, w, c.align) for cell, w, c in zip(row, widths, columns)).rstrip()
             for row in rows]
    return TableText(lines, sum(widths[:2]) + 4)


def _widths(columns: Sequence[Column], rows: list[list[str]], width: int) -> list[int]:
    natural = [max(cell_len(row[i]) for row in rows) for i in range(len(columns))]
    widths = [min(n, c.cap) if c.cap else n for n, c in zip(natural, columns)]
    flex = [i for i, column in enumerate(columns) if column.flex]
    room = width - 2 * (len(columns) - 1) - sum(w for i, w in enumerate(widths) if i not in flex)
    for index, share in zip(flex, _share([natural[i] for i in flex], room)):
        widths[index] = max(share, min(natural[index], 4))
    return widths


def _share(needs: list[int], room: int) -> list[int]:
    """Split ``room`` between columns needing ``needs``: the small ones whole, the rest evenly."""
    given = [0] * len(needs)
    for left, index in enumerate(sorted(range(len(needs)), key=needs.__getitem__)):
        given[index] = max(0, min(needs[index], room // (len(needs) - left)))
        room -= given[index]
    return given


def _fit(text: str, width: int, align: str) -> str:
    size = cell_len(text)
    if size > width:
        return set_cell_size(text, width - 1) + "…"
    return " " * (width - size) + text if align == ">" else text + " " * (width - size)


def status_lines(records: Sequence[JobRecord], width: int, height: int | None,
                 now: float | None = None) -> tuple[str, list[JobRecord], TableText]:
    """The summary line, the jobs shown and their table, for a ``width`` x ``height`` terminal
    (``height`` None: every job)."""
    rows = None if height is None else max(1, height - CHROME_LINES)
    shown, hidden = fit_rows(records, rows)
    summary = _fit(summary_line(records, hidden), width, "<").rstrip()
    return summary, shown, table_text(shown, width, now)


def status_renderable(console, records: Sequence[JobRecord], show_all: bool = False) -> Text:
    """What `status` and `status --watch` show: the summary and the table, styled."""
    size = console.size
    summary, shown, table = status_lines(records, size.width, None if show_all else size.height)
    text = Text(summary)
    if not shown:
        return text
    text.append("\n" + table.lines[0], style="bold")
    for record, line in zip(shown, table.lines[1:]):
        start = len(text) + 1 + table.state_at
        text.append("\n" + line)
        text.stylize(STATE_STYLE.get(record.state, "white"), start, start + len(record.state))
    return text


def print_status(console, records: Sequence[JobRecord], show_all: bool) -> None:
    """What `lorafarm status` prints: as many jobs as fit the terminal (``show_all``: every one)."""
    size = console.size
    if show_all and len(records) > RICH_ROWS:
        summary, _, table = status_lines(records, size.width, None)
        console.file.write("\n".join([summary, *table.lines]) + "\n")
        return
    console.print(status_renderable(console, records, show_all), crop=True, soft_wrap=False)


def watch_status(console, read: Callable[[], list[JobRecord]], show_all: bool = False,
                 poll: float = 2.0, until_done: bool = False) -> list[JobRecord]:
    """Refresh the status view every ``poll`` s (refitted to the terminal each time); with
    ``until_done``, return the records once every job has ended, else run until Ctrl-C."""
    from rich.live import Live

    with Live(console=console, auto_refresh=False) as live:
        while True:
            records = read()
            live.update(status_renderable(console, records, show_all), refresh=True)
            if until_done and all(r.state in FINISHED for r in records):
                return records
            time.sleep(poll)


def watch_until_done(console, ledger, job_ids: list[str], poll: float = 1.0) -> list[JobRecord]:
    """A live table of these jobs until every one has ended; their final records."""
    return watch_status(console, lambda: ledger.records(job_ids, with_spec=False), poll=poll,
                        until_done=True)


def print_record(console, record: JobRecord, now: float | None = None) -> None:
    """One job in full (`status JOB`): every figure and the whole exit reason."""
    now = now or time.time()
    stamp = lambda t: "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))  # noqa: E731
    fields = [("id", record.id), ("name", record.name), ("batch", record.batch),
              ("state", _state(record, now)), ("GPU", record.gpu), ("host", record.host),
              ("progress", step_progress(record)), ("loss", _loss(record, now)),
              ("ETA", _eta(record, now)), ("duration", _duration(record, now)),
              ("peak VRAM", _mb(record.peak_vram_mb)), ("estimate", _mb(record.estimate_mb)),
              ("submitted", stamp(record.submitted)), ("started", stamp(record.started)),
              ("finished", stamp(record.finished)), ("reason", record.exit_reason),
              ("manifest", record.manifest_uri)]
    for label, value in fields:
        if value:
            console.print(f"{label + ':':<11}{value}", highlight=False, markup=False)
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
