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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.table import Table
from rich.text import Text

from lora_farm.ledger.record import JobRecord
from lora_farm.protocol import format_duration

STATE_STYLE = {"queued": "white", "scheduled": "cyan", "running": "bold blue",
               "uploading": "magenta", "succeeded": "green", "failed": "bold red",
               "cancelled": "yellow", "retrying": "yellow"}
ACTIVE = ("running", "uploading", "scheduled", "retrying", "queued")  # shown first, in this order
FINISHED = ("succeeded", "failed", "cancelled")
WIDE_FROM = 120  # terminal columns: below this, the narrow layout
CHROME_LINES = 4  # the command typed, the summary, the header, and the next prompt
RICH_ROWS = 500
TABLE_FIELDS = ("id", "name", "batch", "task", "config_hash", "state", "attempt", "gpus", "step",
                "total_steps", "loss", "eta_s", "started", "finished", "peak_vram_mb",
                "exit_reason", "warning", "seq")  # what the table shows (id to config_hash: a record needs them)
CSV_FIELDS = ("id", "name", "batch", "state", "attempt", "priority", "gpu", "host", "phase",
              "step", "total_steps", "loss", "eta_s", "duration_s", "peak_vram_mb", "estimate_mb",
              "gpu_util", "sm_busy_mean", "util_source", "it_s", "data_wait_pct", "warning",
              "submitted", "started", "finished", "exit_reason", "config_hash",
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


def _steps(record: JobRecord) -> tuple[int, int] | None:
    """(step, total), once the trainer reported them (a succeeded job is at its last step)."""
    step = record.total_steps if record.state == "succeeded" and record.step is None else record.step
    return None if not record.total_steps or step is None else (step, record.total_steps)


def step_progress(record: JobRecord) -> str:
    """``Step 85/250 34%``; empty before the trainer reported its first step."""
    steps = _steps(record)
    return "" if steps is None else f"Step {steps[0]}/{steps[1]} {min(1.0, steps[0] / steps[1]):.0%}"


def progress_bar(record: JobRecord, width: int = 10) -> str:
    steps = _steps(record)
    if steps is None:
        return ""
    filled = int(round(width * max(0.0, min(1.0, steps[0] / steps[1]))))
    return "█" * filled + "░" * (width - filled) + " " + step_progress(record)


def format_mb(value: float | None) -> str:
    """``812 MB``, ``5.2 GB``; empty for None (also the dashboard's)."""
    return "" if value is None else f"{value / 1024:.1f} GB" if value >= 1024 else f"{value:.0f} MB"


def format_stamp(seconds: float | None) -> str:
    """A local date and time, ``2024-06-01 14:03:22``; empty for None (also the dashboard's)."""
    return "" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


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
    """Why it ended (not for a success), else the running attempt's warning (data-bound, watchdog)."""
    ended = "" if record.state == "succeeded" else record.exit_reason
    return one_line(ended or (f"warning: {record.warning}" if record.warning else ""))


_NAME = Column("name", lambda r, now: r.name, flex=True)
NARROW = (Column("id", lambda r, now: r.id[:8]), _NAME, Column("state", _state),
          Column("GPU", lambda r, now: r.gpu, cap=12),
          Column("progress", lambda r, now: step_progress(r)), Column("loss", _loss, ">"),
          Column("ETA", _eta, ">"))
WIDE = (Column("id", lambda r, now: r.id), _NAME, Column("state", _state),
        Column("GPU", lambda r, now: r.gpu, cap=40),
        Column("progress", lambda r, now: progress_bar(r)), Column("loss", _loss, ">"),
        Column("ETA", _eta, ">"), Column("duration", _duration, ">"),
        Column("peak VRAM", lambda r, now: format_mb(r.peak_vram_mb), ">"),
        Column("reason", _reason, flex=True))
SPANNED = ("failed", "cancelled", "queued", "retrying")  # narrow: the reason takes the progress' room


def _display_key(state: str, finished: float | None, seq: int) -> tuple:
    """Active jobs first (running, uploading, scheduled, queued; submission order within a
    state), then the finished ones, newest first."""
    if state in ACTIVE:
        return (ACTIVE.index(state), 0.0, seq)
    return (len(ACTIVE), -(finished or 0.0), -seq)


def display_order(records: Sequence[JobRecord]) -> list[JobRecord]:
    return sorted(records, key=lambda r: _display_key(r.state, r.finished, r.seq))


@dataclass(frozen=True)
class StatusView:
    """What one screen of `status` shows."""

    counts: dict[str, int]  # jobs per state, of every job listed
    shown: list[JobRecord]  # in display order
    hidden: int  # jobs that did not fit


def view_of(records: Sequence[JobRecord], rows: int | None) -> StatusView:
    """The view of these records in ``rows`` table lines (None: all of them)."""
    ordered = display_order(records)
    shown = ordered if rows is None else ordered[:rows]
    return StatusView(dict(Counter(r.state for r in records)), shown, len(ordered) - len(shown))


def read_view(ledger, batch: str | None, rows: int | None) -> StatusView:
    """The view of every job (of ``batch``): the state and finish time of all of them, then the
    records of the ``rows`` shown (None: all)."""
    ids = ledger.job_ids(batch)
    if rows is None or len(ids) <= rows:
        return view_of(ledger.records(ids, fields=TABLE_FIELDS), rows)
    brief = ledger.field_values(ids, ("state", "finished"))
    counts = dict(Counter(state for state, _ in brief if state))  # None: deleted since listed
    order = sorted(range(len(ids)), key=lambda i: _display_key(brief[i][0], float(brief[i][1] or 0), i))
    shown = display_order(ledger.records([ids[i] for i in order[:rows]], fields=TABLE_FIELDS))
    return StatusView(counts, shown, len(ids) - len(shown))


def summary_line(counts: dict[str, int], hidden: int = 0) -> str:
    if not counts:
        return "no jobs: `lorafarm submit FILES...` queues some"
    known = [s for s in ACTIVE + FINISHED if s in counts]
    states = known + sorted(set(counts) - set(known))
    line = f"{sum(counts.values())} job(s): " + ", ".join(f"{counts[s]} {s}" for s in states)
    return line + (f"; {hidden} more not shown (--all)" if hidden else "")


@dataclass(frozen=True)
class TableText:
    lines: list[str]  # the header, then one line per job
    state_at: int  # the column where the state word starts (for its colour)


def table_text(records: Sequence[JobRecord], width: int, now: float | None = None) -> TableText:
    """The status table as lines of at most ``width`` cells (as long as the fixed columns fit).
    Narrow, a failed, cancelled or requeued job shows its reason where progress, loss and ETA go."""
    now = now or time.time()
    columns = WIDE if width >= WIDE_FROM else NARROW
    rows = [[column.header for column in columns]]
    rows += [[column.cell(record, now) for column in columns] for record in records]
    if columns is WIDE and not any(row[-1] for row in rows[1:]):  # its room goes to the names
        columns, rows = columns[:-1], [row[:-1] for row in rows]
    widths = _widths(columns, rows, width)
    lines = [_join(row, widths, columns).rstrip() for row in rows]
    if columns is NARROW:
        start = sum(widths[:4]) + 2 * 4  # where the progress column begins
        for index, record in enumerate(records, 1):
            reason = _reason(record, now)
            if reason and record.state in SPANNED:
                lines[index] = (_join(rows[index][:4], widths, columns) + "  "
                                + _fit(reason, max(1, width - start), "<").rstrip())
    return TableText(lines, sum(widths[:2]) + 4)


def _join(cells: list[str], widths: list[int], columns: Sequence[Column]) -> str:
    return "  ".join(_fit(cell, w, c.align) for cell, w, c in zip(cells, widths, columns))


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


Reader = Callable[[int | None], StatusView]  # rows (None: all) -> the view


def rows_for(console, show_all: bool) -> int | None:
    """Table lines that fit the terminal (``LINES`` when not a terminal), or None for all."""
    return None if show_all else max(1, console.size.height - CHROME_LINES)


def status_renderable(console, view: StatusView) -> Text:
    """The summary and the table, styled, fitted to the console's width."""
    width = console.size.width
    text = Text(_fit(summary_line(view.counts, view.hidden), width, "<").rstrip())
    if not view.shown:
        return text
    table = table_text(view.shown, width)
    text.append("\n" + table.lines[0], style="bold")
    for record, line in zip(view.shown, table.lines[1:]):
        start = len(text) + 1 + table.state_at
        text.append("\n" + line)
        text.stylize(STATE_STYLE.get(record.state, "white"), start, start + len(record.state))
    return text


def print_status(console, read: Reader, show_all: bool) -> None:
    """What `lorafarm status` prints: as many jobs as fit the terminal (``show_all``: every one)."""
    view = read(rows_for(console, show_all))
    if len(view.shown) > RICH_ROWS:  # styling 10,000 lines costs more than it shows
        width = console.size.width
        lines = table_text(view.shown, width).lines
        console.file.write("\n".join([_fit(summary_line(view.counts), width, "<").rstrip(), *lines]) + "\n")
        return
    console.print(status_renderable(console, view), crop=True, soft_wrap=False)


def watch_status(console, read: Reader, show_all: bool = False, poll: float = 2.0,
                 until_done: bool = False, check: Callable[[], None] | None = None) -> StatusView:
    """Refresh the view every ``poll`` s, fitted to the terminal each time (it may be resized);
    with ``until_done``, return once every job has ended, else run until Ctrl-C. ``check`` runs
    at every refresh while jobs remain and may raise to stop watching."""
    from rich.live import Live

    with Live(console=console, auto_refresh=False) as live:
        while True:
            view = read(rows_for(console, show_all))
            live.update(status_renderable(console, view), refresh=True)
            if until_done and set(view.counts) <= set(FINISHED):
                return view
            if check is not None:
                check()
            time.sleep(poll)


def watch_until_done(console, ledger, job_ids: list[str], poll: float = 1.0,
                     check: Callable[[], None] | None = None) -> list[JobRecord]:
    """A live table of these jobs until every one has ended; their final records."""
    watch_status(console, lambda rows: view_of(ledger.records(job_ids, fields=TABLE_FIELDS), rows),
                 poll=poll, until_done=True, check=check)
    return ledger.records(job_ids, with_spec=False)


def print_record(console, record: JobRecord, now: float | None = None) -> None:
    """One job in full (`status JOB`): every figure and the whole exit reason."""
    now = now or time.time()
    fields = [("id", record.id), ("name", record.name), ("batch", record.batch),
              ("state", _state(record, now)), ("GPU", record.gpu), ("host", record.host),
              ("progress", step_progress(record)), ("loss", _loss(record, now)),
              ("ETA", _eta(record, now)), ("duration", _duration(record, now)),
              ("peak VRAM", format_mb(record.peak_vram_mb)), ("estimate", format_mb(record.estimate_mb)),
              ("submitted", format_stamp(record.submitted)),
              ("started", format_stamp(record.started)),
              ("finished", format_stamp(record.finished)), ("reason", record.exit_reason),
              ("warning", record.warning), ("GPU busy", _busy(record)),
              ("data wait", "" if record.data_wait_pct is None else f"{record.data_wait_pct:.0f}%"),
              ("it/s", "" if record.it_s is None else f"{record.it_s:.3g}"),
              ("manifest", record.manifest_uri)]
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")  # a long reason wraps under itself
    for label, value in fields:
        if value:
            grid.add_row(label, Text(value))
    console.print(grid)
def _busy(record: JobRecord) -> str:
    """``73% mean (card; shared with 2 jobs)`` where utilisation was sampled."""
    if record.sm_busy_mean is None:
        return ""
    shared = f"; shared with {len(record.co_tenants)} jobs" if record.co_tenants else ""
    return f"{record.sm_busy_mean:.0f}% mean ({record.util_source}{shared})"


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
        if float(card.get("suspect_until") or 0) > now:  # a throughput watchdog left it lately
            online += f" [yellow]suspect {format_duration(float(card['suspect_until']) - now)}[/]"
        util = card.get("util_pct") or ""
        table.add_row(card["uuid"], card.get("host", ""), format_mb(float(card["total_mb"])),
                      format_mb(float(card["free_mb"])), format_mb(sum(mb for _, mb in held)),
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
