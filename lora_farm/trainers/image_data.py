"""Image training data as tensors: decode, resize + crop to the resolution, batch.

Which files form the dataset is ``lora_farm.jobs.datasets`` (shared with validation). Every example
is checked, decoded, before training starts, so a bad file stops the job in seconds with its name,
not hours later in the middle.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from lora_farm.jobs.datasets import Example, example_problems

def decoded_problems(example: Example) -> list[str]:
    """The dataset rules' problems, plus: the image decodes (a truncated file, not only its header)."""
    problems = example_problems(example)
    if example.image.is_file():
        try:
            with Image.open(example.image) as image:
                image.load()
        except (OSError, UnidentifiedImageError, ValueError) as error:
            problems.append(f"{example.image}: not a readable image ({error}); re-export or remove it")
    return problems


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int, center: bool,
                    rng: random.Random) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Shorter side to ``resolution``, then a square crop; returns (image, original hw, crop top-left)."""
    original = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    if center:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top, left = rng.randint(0, height - resolution), rng.randint(0, width - resolution)
    return image.crop((left, top, left + resolution, top + resolution)), original, (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the range the VAE expects."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.view(image.height, image.width, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


class ImageDataset(torch.utils.data.Dataset):
    """Item ``(index, flip)``: the caller decides flips so an epoch is a pure function of the seed."""

    def __init__(self, examples: list[Example], resolution: int, center_crop: bool, seed: int):
        self.examples = examples
        self.resolution = resolution
        self.center_crop = center_crop
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, bool, int]) -> dict[str, Any]:
        index, flip, epoch = key
        example = self.examples[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # same crop on a resumed run
        image, original, crop = resize_and_crop(load_rgb(example.image), self.resolution,
                                                self.center_crop, rng)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"index": index, "flip": flip, "pixel_values": to_tensor(image),
                "caption": example.caption, "original_size": original, "crop_top_left": crop}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels; keep captions, sizes and crops as plain lists (JSON-friendly, no tensors)."""
    batch: dict[str, Any] = {key: [item[key] for item in items] for key in items[0]}
    if "pixel_values" in batch:
        batch["pixel_values"] = torch.stack(batch["pixel_values"])
    return batch


def epoch_order(count: int, batch_size: int, seed: int, epoch: int,
                random_flip: bool) -> list[list[tuple[int, bool, int]]]:
    """The epoch's micro-batches as dataset keys, fixed by (seed, epoch) so a resume can skip ahead."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    flips = (torch.rand(count, generator=generator) < 0.5).tolist() if random_flip else [False] * count
    keys = [(index, bool(flips[index]), epoch) for index in order]
    return [keys[start:start + batch_size] for start in range(0, count, batch_size)]
