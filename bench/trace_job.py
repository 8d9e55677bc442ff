"""One tiny job from `lorafarm submit` to `succeeded`, traced in every process it passes through:
each spec validation and each read of its ledger record, counted per process and listed by the
lora_farm function that did it.

    python bench/trace_job.py                      # this checkout
    python bench/trace_job.py --repo /tmp/before   # another checkout (a `git worktree add`)

A real farm on the real Redis (a unique key prefix, deleted afterwards): one Celery worker for a
declared card, a tiny LLM built offline, `lorafarm submit` as a user runs it. The tracing lives in
``bench/trace_site/sitecustomize.py`` (first on ``PYTHONPATH`` of every process, active when
``LORAFARM_TRACE`` is set), so lora_farm carries none of it. Per-tick polls (the runner's
cancel check) grow with the training's length; they are counted apart.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
SITE = HERE / "trace_site"
KINDS = {"validate.full": "full validation (load_spec_file)",
         "validate.full.partial": "load_spec_file, some checks off (flags listed)",
         "validate.fs": "filesystem checks (check_spec)",
         "validate.fs.partial": "filesystem checks, some off (flags listed)",
         "validate.model": "spec model built from data (model_validate)",
         "read.record": "whole record read (HGETALL/HMGET)",
         "read.field": "one-field read (HGET)"}


def farm_env(repo: Path, root: Path, prefix: str, trace: Path) -> dict[str, str]:
    (root / "policy.yaml").write_text("headroom: 0.2\nmax_jobs_per_gpu: 2\nstarvation_seconds: 3600\n")
    return {**os.environ, "PYTHONPATH": f"{SITE}{os.pathsep}{repo}", "LORAFARM_TRACE": str(trace),
            "LORAFARM_KEY_PREFIX": prefix, "LORAFARM_GPUS": "gpu0:24GiB",
            "LORAFARM_POLICY": str(root / "policy.yaml"), "LORAFARM_OUTPUT_ROOT": str(root / "output"),
            "LORAFARM_STORAGE_DIR": str(root / "storage"), "LORAFARM_HEARTBEAT_SECONDS": "1",
            "LORAFARM_STALE_AFTER_SECONDS": "8", "LORAFARM_CANCEL_GRACE_SECONDS": "5"}


def build_job(root: Path, env: dict[str, str]) -> Path:
    """A tiny LLM, a text dataset and the spec, built by the checkout under test (untraced)."""
    build = ("import sys; from pathlib import Path; from lora_farm.demo import build_tiny_llm, "
             "write_text_dataset; root = Path(sys.argv[1]); build_tiny_llm(root / 'llm'); "
             "write_text_dataset(root / 'data.jsonl', 16, 'jsonl')")
    subprocess.run([sys.executable, "-c", build, str(root)], check=True,
                   env={k: v for k, v in env.items() if k != "LORAFARM_TRACE"})
    spec = root / "traced.yaml"
    spec.write_text(f"name: traced\ntask: llm\nbase_model: {root / 'llm'}\n"
                    f"train_data_dir: {root / 'data.jsonl'}\nlora_rank: 4\nbatch_size: 4\n"
                    "max_steps: 4\nsave_steps: 2\nnum_workers: 0\n")
    return spec


def start_worker(repo: Path, root: Path, env: dict[str, str], client: redis.Redis,
                 prefix: str) -> subprocess.Popen:
    name = f"gpu-gpu0-trace@{os.uname().nodename}"
    argv = [str(Path(sys.executable).with_name("celery")), "-A", "lora_farm.workers.app", "worker",
            "-Q", "gpu.gpu0", "-c", "1", "-n", name, "-P", "prefork", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
    log = open(root / "worker.log", "ab")
    worker = subprocess.Popen(argv, env={**env, "LORAFARM_WORKER_GPU": "gpu0"}, cwd=repo,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: client.hexists(f"{prefix}:workers", name), 120, "the worker to come online")
    return worker


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def run_one_job(repo: Path, root: Path, trace: Path) -> str:
    prefix = f"lorafarm-trace-{uuid.uuid4().hex[:12]}"
    env = farm_env(repo, root, prefix, trace)
    spec = build_job(root, env)
    client = redis.Redis(decode_responses=True)
    worker = start_worker(repo, root, env, client, prefix)
    try:
        trace.write_text("")  # the job's path only: not the worker's start-up
        subprocess.run([sys.executable, "-m", "lora_farm", "submit", str(spec)], env=env,
                       cwd=root, check=True, capture_output=True)
        job_id = client.zrange(f"{prefix}:jobs", 0, -1)[0]
        wait_for(lambda: client.hget(f"{prefix}:job:{job_id}", "state") in
                 ("succeeded", "failed", "cancelled"), 600, "the job to end")
        state = client.hget(f"{prefix}:job:{job_id}", "state")
        if state != "succeeded":
            raise RuntimeError(f"job ended {state}: see {root / 'worker.log'}")
        time.sleep(2)  # the dispatch after release lands in the trace too
        return job_id
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


def describe(call: dict) -> str:
    """A validation with its flags; a Redis read by its command (the job id is always the same)."""
    return call["what"] if call["kind"].startswith("validate") else call["what"].split(" ")[0]


def summarize(trace: Path, label: str) -> str:
    calls = [json.loads(line) for line in trace.read_text().splitlines() if line]
    roles = list(dict.fromkeys(call["role"] for call in calls))
    lines = [f"== {label}", ""]
    totals = Counter(call["kind"] for call in calls)
    for kind, title in KINDS.items():
        lines.append(f"  {title:<46} {totals[kind]:>4}")
    for role in roles:
        mine = [call for call in calls if call["role"] == role]
        lines += ["", f"  -- {role}"]
        for kind, title in KINDS.items():
            sites = Counter(f"{describe(call)} by {call['site']}"
                            for call in mine if call["kind"] == kind)
            if sites:
                lines.append(f"     {title}: {sum(sites.values())}")
                lines += [f"        {count:>3} x {site}" for site, count in sites.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=HERE.parent, help="checkout to trace")
    parser.add_argument("--label", default="", help="heading of the figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorafarm-trace-") as tmp:
        root, trace = Path(tmp), Path(tmp) / "trace.jsonl"
        commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        job_id = run_one_job(args.repo.resolve(), root, trace)
        print(summarize(trace, f"{args.label or args.repo} ({commit}): job {job_id}, submit -> succeeded"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
