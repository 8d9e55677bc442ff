"""The GPU suite's CPU dry run (``bench/gpu_suite.sh --dry-run``): every part's code path runs
here (tiny models, a declared card, the CUDA-only calls behind ``Context.cuda``), so the one
call on a GPU machine never fails on a script bug."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from bench.gpu.common import Context
from bench.gpu.suite import PARTS, run_part

REPO = Path(__file__).resolve().parents[1]


def test_a_failing_part_records_its_error_and_the_suite_goes_on(tmp_path):
    ctx = Context(True, tmp_path / "work", tmp_path / "out")
    (ctx.work / "logs").mkdir(parents=True)
    ctx.to_file(ctx.work / "context.json")
    result = run_part(ctx, "broken", "no_such_part", timeout=60)
    assert result["error"] == "exit 1"
    assert any("No module named" in line for line in result["log_tail"])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_dry_run_exercises_every_part(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([str(REPO / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out),
                           "--work", str(work)], capture_output=True, text=True, timeout=1400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["raw-logs.tar.gz", "results.json", "summary.txt"]
    parts = json.loads((out / "results.json").read_text())["parts"]
    assert list(parts) == [name for name, _, _ in PARTS]
    assert parts["inventory"]["pinning_ok"] and parts["inventory"]["farm_cards"][0]["uuid"] == "gpu0"
    unet = parts["unet"]
    assert unet["farm"]["it_s"] > 0 and unet["plain"]["it_s"] > 0
    assert unet["farm"]["trainable_params"] == unet["plain"]["trainable_params"]  # the same work
    packing = parts["packing"]
    assert packing["packed"]["states"] == packing["serial"]["states"] == ["succeeded"] * 2
    assert packing["packed"]["oom_ends"] == 0 and packing["serial_over_packed_makespan"] > 0
    oom = parts["oom"]
    assert oom["state"] == "succeeded" and oom["oom_ends"] >= 1
    assert oom["final_plan"]["batch_size"] == 1 and oom["final_plan"]["gradient_checkpointing"]
    assert all(parts["precision"][p]["loss_finite"] for p in ("fp16", "bf16"))
    flux = parts["flux"]  # torchao's fp8 and NF4 bases, forced onto the CPU in the dry run
    assert all(flux[mode]["final_loss"] is not None and flux[mode]["steps"] == 2 for mode in ("none", "fp8", "nf4"))
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "ERROR" not in summary and "## estimate vs measured peak" in summary
    with tarfile.open(out / "raw-logs.tar.gz") as tar:
        names = tar.getnames()
    assert {f"logs/{name}.log" for name, _, _ in PARTS} <= set(names)
    assert any(name.endswith("train.log") for name in names)  # the farms' job logs too
