"""Video training data as tensors: each clip's sample frames (``lora_farm.jobs.clips``, the rule
validation checked), resized to cover its bucket and cropped (one crop for every frame of a
clip), batched by bucket.

A clip goes to the bucket whose aspect ratio is nearest its own (log scale, so 2:1 and 1:2 are
as far from 1:1); a micro-batch holds clips of one bucket only, so its frames stack.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lora_farm.jobs.clips import ClipError, FrameRule, sample_frames
from lora_farm.jobs.datasets import Example, clip_problems
from lora_farm.trainers.image_data import to_tensor

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Clip:
    example: Example
    size: Size  # the clip's frame size
    bucket: Size  # the frame size it trains at


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - ratio))


def checked_clips(examples: list[Example], rule: FrameRule, buckets: list[Size]) -> tuple[list[Clip], list[str]]:
    """Each example decoded as far as its sample reaches: the clips, and every problem found."""
    clips, problems = [], []
    for example in examples:
        found = clip_problems(example)
        if not found:
            try:
                first = sample_frames(example.image, rule)[0]
                size = (first.width, first.height)
                clips.append(Clip(example, size, nearest_bucket(size, buckets)))
            except ClipError as error:
                found.append(str(error))
        problems += found
    return clips, problems


def cover_and_crop(frames: list[Image.Image], bucket: Size, center: bool, rng: random.Random) -> list[Image.Image]:
    """Scale so the frames cover ``bucket`` (width x height), then crop each at the same place."""
    width, height = bucket
    scale = max(width / frames[0].width, height / frames[0].height)
    resized = (max(width, round(frames[0].width * scale)), max(height, round(frames[0].height * scale)))
    if center:
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    else:
        left, top = rng.randint(0, resized[0] - width), rng.randint(0, resized[1] - height)
    return [frame.resize(resized, Image.Resampling.BILINEAR).crop((left, top, left + width, top + height))
            for frame in frames]


class VideoDataset(torch.utils.data.Dataset):
    """Item ``(index, flip, epoch)`` -> ``pixel_values`` (3, frames, height, width) in [-1, 1]."""

    def __init__(self, clips: list[Clip], rule: FrameRule, center_crop: bool, seed: int):
        self.clips = clips
        self.examples = [clip.example for clip in clips]
        self.rule = rule
        self.center_crop = center_crop
        self.seed = seed

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: tuple[int, bool, int]) -> dict[str, Any]:
        index, flip, epoch = key
        clip = self.clips[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # same crop on a resumed run
        frames = [frame.to_image().convert("RGB") for frame in sample_frames(clip.example.image, self.rule)]
        frames = cover_and_crop(frames, clip.bucket, self.center_crop, rng)
        if flip:
            frames = [frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for frame in frames]
        return {"index": index, "flip": flip, "pixel_values": torch.stack([to_tensor(f) for f in frames], dim=1),
                "caption": clip.example.caption, "original_size": clip.size[::-1], "crop_top_left": (0, 0)}


def bucketed_epoch_order(buckets: list[Size], batch_size: int, seed: int, epoch: int,
                         random_flip: bool) -> list[list[tuple[int, bool, int]]]:
    """The epoch's micro-batches as dataset keys, each of one bucket, fixed by (seed, epoch): the
    clips shuffled, cut into batches per bucket, the batches shuffled."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(buckets), generator=generator).tolist()
    flips = (torch.rand(len(buckets), generator=generator) < 0.5).tolist() if random_flip else [False] * len(buckets)
    batches: list[list[tuple[int, bool, int]]] = []
    for bucket in sorted(set(buckets)):
        keys = [(index, bool(flips[index]), epoch) for index in order if buckets[index] == bucket]
        batches += [keys[start:start + batch_size] for start in range(0, len(keys), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[position] for position in shuffle]
