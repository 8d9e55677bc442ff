"""Learn from measured peaks: correct later estimates of jobs of the same shape (Redis, JSON).

Interface::

    shape_key(spec) -> str                                   # what makes two jobs "the same shape"
    record_peak(redis, prefix, spec, estimated_mb, peak_mb)  # after a job ends -> new correction
    correction(redis, prefix, spec) -> float | None          # ratio to feed estimate_vram()
    calibrated_estimate(redis, prefix, spec) -> VramEstimate # the two above, for submit/dispatch
    planned_estimate(redis, prefix, spec, largest_card_mb)   # and the plan (quantize_base: auto)
    learn_from_run(redis, prefix, spec, peak_mb) -> float | None  # a finished run's peak (runner)

``estimated_mb`` must be the *uncorrected* model figure (``VramEstimate.model_mb``), else
corrections would compound. ``peak_mb`` is the trainer's ``peak_vram_mb`` event field
(``torch.cuda.max_memory_reserved``), which excludes the CUDA context, so the ratio compares it
with the estimate minus ``CUDA_CONTEXT_MB``, and the correction scales every part but the context.
CPU runs report no peak and teach nothing.

The correction is ``max(EWMA of ratios, the latest ratio)``, never below ``FLOOR``: one job that
peaked higher than expected raises it at once (the next one must not OOM), while lower peaks only
pull it down gradually. One Redis hash per shape::

    <prefix>:vram:shape:<sha1 of shape_key>  {shape, ewma, last, max, count, last_peak_mb, ...}

kept ``TTL_SECONDS`` after its last update, so shapes nobody trains any more fade away.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from lora_farm.errors import LoraFarmError
from lora_farm.jobs.spec import ImageJobSpec, JobSpec, LlmJobSpec, VideoJobSpec
from lora_farm.scheduler.estimate import (CUDA_CONTEXT_MB, VramEstimate, base_model_info, choose_quantization,
                                         estimate_vram)

FLOOR = 0.5  # never trust a calibration to more than halve the model's figure
EWMA_WEIGHT = 0.5  # weight of the newest ratio
TTL_SECONDS = 90 * 24 * 3600


def shape_key(spec: JobSpec) -> str:
    """Canonical JSON of what drives peak memory: same key, same peak (within noise)."""
    try:
        info = base_model_info(spec)
        family, model_mb = info.family, round(info.weight_bytes / 2**20)
    except LoraFarmError:
        family, model_mb = "unknown", 0
    shape: dict[str, Any] = {
        "task": spec.task, "family": family, "model_mb": model_mb,
        "batch_size": spec.batch_size, "rank": spec.lora_rank,
        "precision": spec.mixed_precision, "gradient_checkpointing": spec.gradient_checkpointing,
        "targets": sorted(spec.target_modules or []),
    }
    if isinstance(spec, VideoJobSpec):  # what the video estimate grows or shrinks with
        shape.update(frames=spec.num_frames, sizes=sorted(spec.frame_sizes),
                     blocks_to_swap=spec.blocks_to_swap, expert=spec.expert)
    elif isinstance(spec, ImageJobSpec):
        shape.update(resolution=spec.resolution, train_text_encoder=spec.train_text_encoder)
    elif isinstance(spec, LlmJobSpec):
        shape.update(seq_len=spec.max_seq_len)
    if isinstance(spec, ImageJobSpec):  # video too; only where set, so the shapes recorded before
        if spec.quantize_base != "none":  # these fields existed keep their keys
            shape.update(quantize_base=spec.quantize_base)
        if spec.cache_text_encoder_outputs:
            shape.update(cache_text_encoder_outputs=True)
    return json.dumps(shape, sort_keys=True, separators=(",", ":"))


def calibration_key(prefix: str, spec: JobSpec) -> str:
    digest = hashlib.sha1(shape_key(spec).encode()).hexdigest()[:16]
    return f"{prefix}:vram:shape:{digest}"


def record_peak(redis_client: Any, prefix: str, spec: JobSpec, estimated_mb: float,
                peak_mb: float | None) -> float | None:
    """Fold one finished job's peak into its shape's record; the new correction (None: no peak)."""
    if not peak_mb or peak_mb <= 0 or estimated_mb <= 0:
        return None
    ratio = peak_mb / _modelled_mb(estimated_mb)
    key = calibration_key(prefix, spec)
    shape = shape_key(spec)

    def update(pipe: Any) -> float:
        old = pipe.hgetall(key)
        ewma = ratio if not old else (EWMA_WEIGHT * ratio
                                      + (1 - EWMA_WEIGHT) * float(old[b"ewma"]))
        fields = {"shape": shape, "ewma": ewma, "last": ratio,
                  "max": max(ratio, float(old.get(b"max", ratio))),
                  "count": int(old.get(b"count", 0)) + 1, "last_peak_mb": peak_mb,
                  "last_estimate_mb": estimated_mb, "updated_at": time.time()}
        pipe.multi()
        pipe.hset(key, mapping=fields)
        pipe.expire(key, TTL_SECONDS)
        return _correction_of(ewma, ratio)

    # WATCH/MULTI: two workers finishing jobs of one shape at once must not lose an update
    return redis_client.transaction(update, key, value_from_callable=True)


def learn_from_run(redis_client: Any, prefix: str, spec: JobSpec,
                   peak_mb: float | None) -> float | None:
    """Record the peak of a run of ``spec`` (the effective spec: the plan that ran) against the
    *uncorrected* model figure. A ``vram_gb`` job teaches nothing: its figure is the user's."""
    if spec.vram_gb is not None:
        return None
    return record_peak(redis_client, prefix, spec, estimate_vram(spec).model_mb, peak_mb)


def correction(redis_client: Any, prefix: str, spec: JobSpec) -> float | None:
    """The ratio to scale this shape's estimate by, or None when no job of it has finished."""
    record = redis_client.hgetall(calibration_key(prefix, spec))
    if not record:
        return None
    return _correction_of(float(record[b"ewma"]), float(record[b"last"]))


def calibrated_estimate(redis_client: Any, prefix: str, spec: JobSpec) -> VramEstimate:
    """``estimate_vram`` corrected by what jobs of the same shape really peaked at."""
    if spec.vram_gb is not None:
        return estimate_vram(spec)  # the user's figure stands; don't read model files for it
    return estimate_vram(spec, correction(redis_client, prefix, spec))


def planned_estimate(redis_client: Any, prefix: str, spec: JobSpec,
                     largest_card_mb: float | None) -> tuple[VramEstimate, dict[str, Any]]:
    """The estimate and the plan a job is queued with: ``quantize_base: auto`` becomes the least
    quantization whose estimate fits the farm's largest card (none on a CPU-only farm)."""
    if not isinstance(spec, ImageJobSpec) or spec.quantize_base != "auto" or spec.vram_gb is not None:
        return calibrated_estimate(redis_client, prefix, spec), {}
    mode = "none" if largest_card_mb is None else choose_quantization(spec, largest_card_mb)
    chosen = spec.model_copy(update={"quantize_base": mode})
    return calibrated_estimate(redis_client, prefix, chosen), {"quantize_base": mode}


def _modelled_mb(estimated_mb: float) -> float:
    """The part of an estimate the peak measures (all but the CUDA context)."""
    return estimated_mb - CUDA_CONTEXT_MB if estimated_mb > CUDA_CONTEXT_MB + 1 else estimated_mb


def _correction_of(ewma: float, last: float) -> float:
    return round(max(FLOOR, ewma, last), 4)
