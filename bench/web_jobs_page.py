"""How long the dashboard's pages take with 10,000 jobs in the ledger.

    .venv/bin/python bench/web_jobs_page.py [--jobs 10000] [--repeat 5]

Fills a ledger (``fill_ledger``: finished jobs and 10 running) under a fresh
``lorafarm-bench-<uuid>`` prefix of the local Redis, then times each page over real HTTP
(uvicorn on a free loopback port, one keep-alive connection): the best and the median of
``--repeat`` requests. The keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fill_ledger import fill_ledger  # noqa: E402
from lora_farm.ledger import Ledger  # noqa: E402
from lora_farm.redis_conn import make_client  # noqa: E402
from lora_farm.settings import get_settings  # noqa: E402
from lora_farm.web.app import WebConfig, create_app  # noqa: E402

RUNNING = 10


def start_server(ledger: Ledger) -> int:
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(ledger, get_settings(), WebConfig())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return port


def timed(connection: http.client.HTTPConnection, path: str, repeat: int) -> tuple[float, float, int]:
    times, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        size = len(body)
        assert response.status == 200 and (b"</html>" in body or path.endswith("table")), (path, response.status, body[:300])
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ledger = Ledger(make_client(), f"lorafarm-bench-{uuid.uuid4().hex[:8]}")
    try:
        start = time.perf_counter()
        ids = fill_ledger(ledger, finished=args.jobs - RUNNING, running=RUNNING)
        print(f"filled {len(ids)} jobs in {time.perf_counter() - start:.1f} s")
        connection = http.client.HTTPConnection("127.0.0.1", start_server(ledger), timeout=60)
        pages = ["/jobs", "/jobs?page=100", "/jobs?state=running", "/jobs?state=succeeded&page=3",
                 "/jobs/table", f"/jobs/{ids[-1]}", "/jobs?batch=nightly", "/batches"]
        print(f"{'page':<34} {'best':>9} {'median':>9} {'bytes':>8}")
        for path in pages:
            best, median, size = timed(connection, path, args.repeat)
            print(f"{path:<34} {best * 1000:>7.1f}ms {median * 1000:>7.1f}ms {size:>8}")
    finally:
        ledger.delete_prefix()


if __name__ == "__main__":
    main()
