"""A stand-in trainer for the runner's exit-classification tests ONLY: a real process that
writes real progress events (lora_farm.trainers.progress) and exits with the real exit codes.

Its behaviour comes from the spec's first tag ``fake:<mode>``:
``ok`` (export and exit 0), ``oom`` (exit 3 unless batch_size == 1), ``crash`` (exit 1 on the
first attempt, then ok), ``bad`` (exit 2), ``slow`` (4 s of progress, then ok), ``hang`` (a child in its process group, both sleep
until signalled; SIGTERM -> exit 4; it holds on to its runner as the real trainer does: the
runner's death is a SIGTERM), ``killed`` (SIGKILL itself).
Usage: python tests/fake_trainer.py JOB_FILE --job-dir DIR --events PATH
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lora_farm.protocol import EventWriter, ExitCode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job_file")
    parser.add_argument("--job-dir", required=True)
    parser.add_argument("--events", required=True)
    args = parser.parse_args()
    spec = yaml.safe_load(Path(args.job_file).read_text())
    mode = next((t.split(":", 1)[1] for t in spec.get("tags", []) if t.startswith("fake:")), "ok")
    job_dir = Path(args.job_dir)
    events = EventWriter(args.events)
    attempt = int(os.environ.get("LORAFARM_ATTEMPT", "1"))
    events.emit("start", pid=os.getpid(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                device="cpu", attempt_resume_step=0, batch_size=spec["batch_size"],
                gradient_checkpointing=spec["gradient_checkpointing"],
                aws_secret_seen="AWS_SECRET_ACCESS_KEY" in os.environ)
    events.emit("phase", phase="train")
    events.emit("progress", epoch=1, epochs=1, step=1, total_steps=2, loss=0.5, it_s=1.0,
                eta_s=1.0, peak_vram_mb=12.5)
    print("Epoch 1/1 | Step 1/2 | Loss 0.500 | 1.0 it/s | ETA 1s", flush=True)
    if mode == "oom" and spec["batch_size"] > 1:
        events.emit("error", kind="oom", message="CUDA out of memory. Tried to allocate 2.00 GiB")
        return ExitCode.OUT_OF_MEMORY
    if mode == "crash" and attempt == 1:
        events.emit("error", kind="crash", message="RuntimeError: boom")
        print("Traceback (most recent call last):\nRuntimeError: boom", flush=True)
        return ExitCode.CRASH
    if mode == "bad":
        events.emit("error", kind="bad_input", message="train_data_dir is empty")
        return ExitCode.BAD_INPUT
    if mode == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        return hang(job_dir, events)
    if mode == "slow":  # long enough for a Redis restart in the middle
        for step in range(2, 9):
            time.sleep(0.5)
            events.emit("progress", epoch=1, epochs=1, step=step, total_steps=8, loss=0.4,
                        it_s=2.0, eta_s=(8 - step) / 2, peak_vram_mb=12.5)
    (job_dir / "adapter").mkdir(parents=True, exist_ok=True)
    (job_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"fake weights " * 10)
    events.emit("artifact", path=str(job_dir / "adapter"), kind="peft")
    events.emit("summary", final_loss=0.25, steps=2, phase_seconds={}, peak_vram_mb=20.0)
    return ExitCode.SUCCESS


def hang(job_dir: Path, events: EventWriter) -> int:
    from lora_farm.protocol import Fence
    from lora_farm.trainers.entry import hold_on_to_runner

    hold_on_to_runner(Fence.of_attempt(job_dir))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (job_dir / "hang.pids").write_text(f"{os.getpid()} {child.pid}\n")

    def on_term(signum, frame):
        events.emit("error", kind="interrupted", message="SIGTERM")
        sys.exit(ExitCode.INTERRUPTED)

    signal.signal(signal.SIGTERM, on_term)
    while True:
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
