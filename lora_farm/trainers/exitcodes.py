"""Exit codes of a trainer process: the runner classifies a job's end from these (torch-free)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    SUCCESS = 0
    CRASH = 1  # an unexpected exception; the traceback is in the job log
    BAD_INPUT = 2  # the spec, data or model is unusable; retrying will not help
    OUT_OF_MEMORY = 3  # CUDA (or host) out of memory; retry with a degraded plan
    INTERRUPTED = 4  # SIGTERM/SIGINT: a checkpoint was written, then the process exited
