"""Image training data: find (image, caption) pairs, check them all, resize + crop to the resolution.

Captions come from ``metadata.csv`` (columns ``file_name,text``, the diffusers/HF ``imagefolder``
layout) or from sidecar files (``cat.png`` + ``cat.txt``). Every example is checked before training
starts, so a bad file stops the job in seconds with its name, not hours later in the middle.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from lora_farm.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    caption_source: Path  # metadata.csv or the sidecar file: where to fix the caption


def find_examples(train_data_dir: Path, metadata_path: Path | None, caption_extension: str) -> list[Example]:
    """Every example of the dataset, in a stable order (metadata row order, else sorted names)."""
    if not train_data_dir.is_dir():
        raise DatasetError(f"`train_data_dir`: {train_data_dir} is not a folder. "
                           "Fix: point it at the folder holding the training images.")
    metadata = metadata_path or train_data_dir / "metadata.csv"
    if metadata_path is not None or metadata.is_file():
        return _examples_from_metadata(metadata, train_data_dir)
    return _examples_from_sidecars(train_data_dir, caption_extension)


def _examples_from_metadata(metadata: Path, image_root: Path) -> list[Example]:
    try:
        with open(metadata, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            missing = {"file_name", "text"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{metadata}: missing column(s) {sorted(missing)}, found "
                                   f"{reader.fieldnames}. Fix: the header must be `file_name,text`.")
            rows = list(reader)
    except OSError as error:
        raise DatasetError(f"`metadata_path`: cannot read {metadata}: {error}") from error
    return [Example(image_root / row["file_name"], (row["text"] or "").strip(), metadata) for row in rows]


def _examples_from_sidecars(folder: Path, caption_extension: str) -> list[Example]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    examples = []
    for image in images:
        sidecar = image.with_suffix(caption_extension)
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
        examples.append(Example(image, caption, sidecar))
    return examples


def check_examples(examples: list[Example], where: Path) -> None:
    """Raise ``DatasetError`` listing every missing/unreadable image and every empty caption."""
    if not examples:
        raise DatasetError(f"{where}: no training examples found (no metadata.csv rows, no images "
                           f"with {'/'.join(IMAGE_SUFFIXES)}). Fix: add images and captions.")
    problems = [problem for example in examples for problem in _problems_of(example)]
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DatasetError(f"{len(problems)} problem(s) in the training data under {where}:\n  "
                           + "\n  ".join(shown) + more)


def _problems_of(example: Example) -> list[str]:
    problems = []
    if not example.image.is_file():
        problems.append(f"{example.image}: image file not found (listed in {example.caption_source}). "
                        "Fix: add the file or remove its row.")
    else:
        try:
            with Image.open(example.image) as image:
                image.load()  # decodes the pixels: catches truncated files, not only bad headers
        except (OSError, UnidentifiedImageError, ValueError) as error:
            problems.append(f"{example.image}: not a readable image ({error}). Fix: re-export or remove it.")
    if not example.caption:
        if example.caption_source.suffix == ".csv":
            problems.append(f"{example.image}: empty caption in {example.caption_source}. Fix: write a caption.")
        elif example.caption_source.is_file():
            problems.append(f"{example.caption_source}: caption file is empty. Fix: write a caption.")
        else:
            problems.append(f"{example.caption_source}: caption file not found for {example.image.name}. "
                            "Fix: add it, or a metadata.csv with file_name,text.")
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
