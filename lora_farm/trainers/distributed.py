"""``gpus: N`` — one job over N cards as N rank processes, LoRA gradients averaged (data parallel).

The trainer entry launches the ranks itself rather than through torchrun, so the runner still
spawns one process group, reads one events file and gets one exit code with our meaning
(``exitcodes``). Rank ``r`` sees all N pinned cards and uses ``cuda:r``; on a CPU the ranks talk
over gloo, so the same path is tested without GPUs. Only rank 0 writes events, checkpoints,
TensorBoard and the exported adapter; every rank reads the checkpoint it resumes from.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from lora_farm.process_group import forwarding_signals, signal_process, terminate_then_kill
from lora_farm.protocol import ExitCode

RANK_GRACE_SECONDS = 30.0  # a failed rank's peers get this long to stop before SIGKILL
# which code wins when ranks disagree: the one that says most about what went wrong
_SEVERITY = [ExitCode.FENCED, ExitCode.OUT_OF_MEMORY, ExitCode.BAD_INPUT, ExitCode.CRASH,
             ExitCode.INTERRUPTED]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: Any) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world)

    def sum_gradients(self, params: list[Any]) -> None:
        """All-reduce the LoRA gradients to their sum over ranks (a rank with no batch adds 0).

        Each micro-batch's loss is already scaled by its share of the step (``loss_weight``), so
        the sum is the step's mean gradient, exactly as one process accumulating them all."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)

    def sum(self, value: float) -> float:
        """The sum of a float over ranks (e.g. each rank's share of the step loss)."""
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total[0])

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (e.g. a SIGTERM seen by one rank)."""
        return self.sum(1.0 if flag else 0.0) > 0

    def close(self, together: bool) -> None:
        """Leave the group. ``together`` (the ranks ended alike: done, or stopped at one step):
        wait for every rank first, so none tears the group down while rank 0 still exports or
        checkpoints (gloo aborts such a peer). After a failure a peer may be gone: no wait."""
        if not self.enabled:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()


def launch_ranks(argv: list[str], world: int) -> int:
    """Run ``python -m lora_farm.trainers argv`` as ``world`` ranks; forward signals; one exit code."""
    port = _free_port()
    children = [subprocess.Popen([sys.executable, "-m", "lora_farm.trainers", *argv],
                                 env=_rank_env(rank, world, port)) for rank in range(world)]
    with forwarding_signals(children):
        return combine_exit_codes(_wait_all(children))


def _wait_all(children: list[subprocess.Popen], grace_seconds: float = RANK_GRACE_SECONDS) -> list[int]:
    """Wait for every rank. When one fails, the others would block in a collective until the
    backend's timeout (minutes, holding every card): stop them — SIGTERM, grace, SIGKILL (each
    rank alone: they share the launcher's group, which the runner stops as a whole)."""
    while any(child.poll() is None for child in children):
        if any(child.returncode not in (None, 0) for child in children):
            terminate_then_kill(children, grace_seconds, alive=lambda child: child.poll() is None,
                                send=lambda child, sig: signal_process(child.pid, sig))
            break
        time.sleep(0.1)
    return [child.wait() for child in children]


def combine_exit_codes(codes: list[int]) -> int:
    """Success only when every rank succeeded; else the most telling failure."""
    failed = {code for code in codes if code != ExitCode.SUCCESS}
    if not failed:
        return ExitCode.SUCCESS
    # a rank killed by a signal (negative code) or an unknown code: a crash
    return next((code for code in _SEVERITY if code in failed), ExitCode.CRASH)


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    # N ranks with one thread per core each would oversubscribe the CPU (torchrun caps it too)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // world))
    return os.environ | {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                         "OMP_NUM_THREADS": threads}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
