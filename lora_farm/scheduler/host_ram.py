"""Peak host RAM of a job, before it is queued, without loading the model (torch-free).

Interface::

    estimate_host_ram(spec) -> HostRamEstimate(total_mb, parts)

The parts, in MiB:

- ``base_as_stored``: every weight of the base model as the files store it, or at the training
  dtype where that is wider. A trainer loads the base on the host before it casts and moves it
  (``from_pretrained`` reads the files whole), so a 14B transformer stored in fp32 needs its
  57 GB of host RAM before it is 28 GB of bf16 on the card; the fp8 base and the swapped blocks
  come after this peak, and the blocks kept on the host are part of it.
- ``process``: the interpreter, torch, the CUDA libraries and the allocator's slack (~3 GiB).
- ``data``: the decoded samples in flight: the main process and each DataLoader worker with its
  prefetch (2 micro-batches), at uint8 while decoding plus float32 as tensors; a video sample is
  ``num_frames`` frames of its largest bucket.

``spec.host_ram_gb`` (when set) overrides the figure. Placement (``place.py``) refuses a host
whose RAM is smaller than the figure plus what the jobs already there need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lora_farm.jobs.spec import ImageJobSpec, JobSpec, VideoJobSpec
from lora_farm.scheduler.estimate import MIB, base_model_info, _tensors

PROCESS_MB = 3072.0
PREFETCH = 2  # micro-batches a DataLoader worker holds ahead
SAMPLE_BYTES_PER_VALUE = 1 + 4  # uint8 decoded + float32 tensor


@dataclass(frozen=True)
class HostRamEstimate:
    total_mb: float
    parts: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"total_mb": self.total_mb, "parts": dict(self.parts)}


def estimate_host_ram(spec: JobSpec) -> HostRamEstimate:
    """The peak host RAM ``spec`` needs (see the module docstring)."""
    override = getattr(spec, "host_ram_gb", None)
    if override is not None:
        total = round(override * 1024, 1)
        return HostRamEstimate(total, {"override": total})
    parts = {"base_as_stored": round(_base_mb(spec), 1), "process": PROCESS_MB,
             "data": round(_data_mb(spec), 1)}
    return HostRamEstimate(float(math.ceil(sum(parts.values()))), parts)


def _base_mb(spec: JobSpec) -> float:
    info = base_model_info(spec)
    width = 4 if spec.mixed_precision == "no" else 2
    cast = sum(math.prod(t.shape) for t in _tensors(info)) * width
    return max(info.weight_bytes, cast) / MIB


def _data_mb(spec: JobSpec) -> float:
    if isinstance(spec, VideoJobSpec):
        values = spec.num_frames * max(w * h for w, h in spec.frame_sizes) * 3
    elif isinstance(spec, ImageJobSpec):
        values = spec.resolution ** 2 * 3
    else:
        return 0.0  # token ids: negligible beside the model
    in_flight = (1 + spec.num_workers * PREFETCH) * spec.batch_size
    return in_flight * values * SAMPLE_BYTES_PER_VALUE / MIB
