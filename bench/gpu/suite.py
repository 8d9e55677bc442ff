"""The GPU suite's driver: ``python -m bench.gpu.suite [--dry-run] [--out DIR]`` (through
``bench/gpu_suite.sh``). Each part runs in its own process with its own time box, so one part
that fails, hangs or runs out of memory records its error and the suite goes on; the whole real
run stays inside ``BUDGET_S``. Writes to ``--out`` (``$OUT`` when set): ``summary.txt``,
``results.json`` and ``raw-logs.tar.gz`` (every part's log, the farms' worker and job logs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gpu.common import DRY_CARD, REPO, Context
from bench.gpu.report import status_of, summary_text

# (part, module, seconds at most on a real card); the order matters: models first
PARTS = (("models", "models", 150), ("inventory", "inventory", 45), ("unet", "unet_step", 120),
         ("precision", "precision", 90), ("packing", "packing", 200), ("oom", "oom", 150),
         ("flux", "flux_quant", 120))
BUDGET_S = 470  # the real suite ends inside 8 minutes on one H100/H200-class card
DRY_PART_S = 600  # a loaded CI machine; the dry run has no overall budget


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = _context(args)
    started, results = time.monotonic(), {}
    for part, module, box in PARTS:
        if args.only and part not in args.only:
            continue
        left = BUDGET_S - (time.monotonic() - started)
        timeout = DRY_PART_S if ctx.dry_run else min(box, left)
        results[part] = run_part(ctx, part, module, timeout) if timeout > 5 else {
            "error": f"not run: the suite's {BUDGET_S}s budget was spent"}
        print(f"{part}: {status_of(results[part])} ({results[part].get('seconds', 0)}s)", flush=True)
    meta = _meta(ctx, time.monotonic() - started)
    (ctx.out / "results.json").write_text(json.dumps({"meta": meta, "parts": results}, indent=2,
                                                     default=str), encoding="utf-8")
    (ctx.out / "summary.txt").write_text(summary_text(meta, results), encoding="utf-8")
    _archive_logs(ctx)
    print((ctx.out / "summary.txt").read_text(encoding="utf-8"), flush=True)
    return 0 if all(status_of(r) in ("ok", "skipped") for r in results.values()) else 1


def run_part(ctx: Context, part: str, module: str, timeout: float) -> dict[str, Any]:
    """One part in its own process group, killed at ``timeout``; its result or its error."""
    logs = ctx.work / "logs"
    result_path, log_path = ctx.work / f"{part}.result.json", logs / f"{part}.log"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", f"bench.gpu.{module}",
                                    str(ctx.work / "context.json"), str(result_path)],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    seconds = round(time.monotonic() - started, 1)
    if code == 0 and result_path.exists():
        return {**json.loads(result_path.read_text(encoding="utf-8")), "seconds": seconds}
    why = f"timed out after {timeout:.0f}s" if code is None else f"exit {code}"
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
    return {"error": why, "log_tail": tail, "seconds": seconds}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_suite.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny models on the CPU, a declared card (the tests run this)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, "
                        "else bench/results/gpu-<date>/)")
    parser.add_argument("--work", type=Path, default=None, help="models and runs (default: a temp dir)")
    parser.add_argument("--only", nargs="*", choices=[p for p, _, _ in PARTS],
                        help="run only these parts (models is needed by the training parts)")
    return parser.parse_args(argv)


def _context(args: argparse.Namespace) -> Context:
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    out = args.out or Path(os.environ.get("OUT") or REPO / "bench" / "results" / f"gpu-{stamp}")
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafarm-gpu-suite-"))
    for folder in (out, work, work / "logs"):
        folder.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ["LORAFARM_GPUS"] = DRY_CARD  # the parts' processes inherit it
    else:
        os.environ.pop("LORAFARM_GPUS", None)  # NVML or nothing
    from lora_farm.scheduler.gpus import read_gpus

    cards = read_gpus()
    card = cards[0].to_dict() if cards else {}
    if not args.dry_run and card.get("source") != "nvml":
        raise SystemExit("bench/gpu_suite.sh: NVML finds no card here; run it on the GPU machine, "
                         "or add --dry-run for the CPU rehearsal")
    ctx = Context(args.dry_run, work.resolve(), out.resolve(),
                  {k: card.get(k) for k in ("uuid", "name", "total_mb", "source")})
    ctx.to_file(work / "context.json")
    return ctx


def _meta(ctx: Context, seconds: float) -> dict[str, Any]:
    import platform

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": ctx.dry_run,
            "card": ctx.card, "python": platform.python_version(), "seconds": round(seconds, 1),
            "host": platform.node()}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return meta


def _archive_logs(ctx: Context) -> None:
    """Every log of the run in one archive (the device call brings back few files)."""
    with tarfile.open(ctx.out / "raw-logs.tar.gz", "w:gz") as tar:
        for path in sorted(ctx.work.rglob("*.log")) + sorted(ctx.work.glob("*.result.json")):
            tar.add(path, arcname=str(path.relative_to(ctx.work)))


if __name__ == "__main__":
    sys.exit(main())
