"""Text captures of `lorafarm status` and `lorafarm status --watch` in real terminals (tmux), for
docs/status-captures.md.

    .venv/bin/python bench/status_captures.py [--out docs/status-captures.md]

Fills a ledger (20 finished jobs, one of them failed with a long reason, and 3 running) under a
fresh ``lorafarm-capture-<uuid>`` prefix of the local Redis, types each command into a bash in a
detached tmux session of 80x24 and of 200x50 (its own tmux server, ``-L``), copies the screen with
``tmux capture-pane -p``, and deletes the keys and the tmux server at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fill_ledger import fill_ledger  # noqa: E402
from lora_farm.cli.status_view import WIDE_FROM  # noqa: E402
from lora_farm.ledger import Ledger  # noqa: E402
from lora_farm.redis_conn import connect  # noqa: E402
from lora_farm.settings import reload_settings  # noqa: E402

SIZES = ((80, 24), (200, 50))
COMMANDS = ("lorafarm status", "lorafarm status --watch")
REASON = ("crashed (exit 1): RuntimeError: CUDA error: an illegal memory access was encountered. "
          "CUDA kernel errors might be asynchronously reported at some other API call, so the "
          "stacktrace below might be incorrect; no retries left (2 of 2 used)")


def capture(socket: str, command: str, width: int, height: int, env: dict[str, str]) -> str:
    """The screen of a ``width`` x ``height`` terminal where ``command`` was typed at a prompt."""
    tmux = ["tmux", "-L", socket]
    session = f"cap{width}x{height}"
    subprocess.run(tmux + ["new-session", "-d", "-s", session, "-x", str(width), "-y", str(height),
                           "bash --norc --noprofile"], env=env, check=True)
    try:
        subprocess.run(tmux + ["send-keys", "-t", session, "PS1='$ '; clear", "Enter"], check=True)
        time.sleep(1)
        subprocess.run(tmux + ["send-keys", "-t", session, command, "Enter"], check=True)
        time.sleep(6)  # start-up, then at least one --watch refresh
        screen = subprocess.run(tmux + ["capture-pane", "-p", "-t", session], check=True,
                                capture_output=True, text=True).stdout
    finally:
        subprocess.run(tmux + ["kill-session", "-t", session], check=False)
    return screen.rstrip("\n")


def document(screens: list[tuple[str, int, int, str]]) -> str:
    parts = ["# `lorafarm status` in real terminals\n",
             "Made by `.venv/bin/python bench/status_captures.py`: tmux `capture-pane -p` of a bash "
             "where the command was typed, over a ledger of 19 succeeded jobs, 1 failed and 3 "
             f"running. Below {WIDE_FROM} columns the narrow layout (a failed job's reason where "
             "progress goes); from there the wide one (bar, duration, peak VRAM, reason). Active "
             "jobs come first, then the newest finished ones, as many as fit; a reason is cut to "
             "its line, `lorafarm status JOB` shows it whole (last capture); `--all` lists every "
             "job; `--json`/`--csv` export everything.\n"]
    for command, width, height, screen in screens:
        parts.append(f"## `{command}` at {width}x{height}\n\n```\n{screen}\n```\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/status-captures.md"))
    args = parser.parse_args()
    prefix = f"lorafarm-capture-{uuid.uuid4().hex[:8]}"
    os.environ["LORAFARM_KEY_PREFIX"] = prefix
    ledger = Ledger(connect(reload_settings()), prefix)
    socket = f"lorafarm-capture-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    try:
        failed = fill_ledger(ledger, finished=19, running=3, failed_reason=REASON)[-1]
        screens = [(command, width, height, capture(socket, command, width, height, env))
                   for width, height in SIZES for command in COMMANDS]
        one = f"lorafarm status {failed[:8]}"
        screens.append((one, 80, 40, capture(socket, one, 80, 40, env)))  # all of it on screen
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], check=False, capture_output=True)
        print(f"cleaned up {ledger.delete_prefix()} keys under {prefix}")
    args.out.write_text(document(screens), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
