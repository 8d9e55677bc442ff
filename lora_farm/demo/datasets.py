"""Tiny deterministic training sets: coloured-shape images with captions, and repetitive text.

The images differ by what their captions say (shape, colour, background), so a LoRA has
something real to learn; the text records repeat a few patterns, so a tiny LM's loss falls
within ~100 steps.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Literal

from lora_farm.errors import DatasetError

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (235, 215, 40), "purple": (150, 50, 190), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")

FACTS = [("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("snow", "white"),
         ("coal", "black"), ("blood", "red"), ("orange", "orange"), ("plum", "purple")]


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)


def _image_records(n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(shape, colour, background, caption) for each image; the first ones cycle every shape."""
    rng = random.Random(seed)
    records = []
    for index in range(n):
        shape = SHAPES[index % len(SHAPES)]
        colour = list(COLOURS)[(index // len(SHAPES) + index) % len(COLOURS)]
        background = rng.choice(list(BACKGROUNDS))
        article = "an" if colour[0] in "aeiou" else "a"
        caption = f"a photo of {article} {colour} {shape} on a {background} background"
        records.append((shape, colour, background, caption))
    return records


def write_image_dataset(folder: Path, n: int = 8, size: int = 64,
                        captions: Literal["metadata", "sidecar"] = "metadata", seed: int = 0) -> Path:
    """Write ``n`` PNGs of coloured shapes plus captions: ``metadata.csv`` or ``.txt`` sidecars.

    Same seed, same bytes. Returns ``folder``.
    """
    from PIL import Image, ImageDraw

    if captions not in ("metadata", "sidecar"):
        raise DatasetError(f"`captions` must be 'metadata' or 'sidecar', got {captions!r}")
    if n < 1 or size < 8:
        raise DatasetError(f"an image dataset needs n >= 1 and size >= 8, got n={n}, size={size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    rows = []
    for index, (shape, colour, background, caption) in enumerate(_image_records(n, seed)):
        image = Image.new("RGB", (size, size), BACKGROUNDS[background])
        extent = rng.randint(size // 3, size * 2 // 3)
        left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
        _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + extent, top + extent),
                    COLOURS[colour])
        file_name = f"{index:04d}_{colour}_{shape}.png"
        image.save(folder / file_name, format="PNG")
        rows.append((file_name, caption))
    return write_captions(folder, rows, captions)


def write_captions(folder: Path, rows: list[tuple[str, str]], captions: Literal["metadata", "sidecar"]) -> Path:
    """``(file name, caption)`` rows as ``folder/metadata.csv`` or as ``.txt`` sidecars; returns ``folder``."""
    if captions == "metadata":
        with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["file_name", "text"])
            writer.writerows(rows)
        return folder
    for name, caption in rows:
        (folder / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def _text_record(rng: random.Random) -> str:
    thing, colour = rng.choice(FACTS)
    return f"question: what colour is the {thing}? answer: the {thing} is {colour}."


def _instruction_record(rng: random.Random) -> dict[str, str]:
    thing, colour = rng.choice(FACTS)
    kind = rng.randrange(3)
    if kind == 0:
        return {"instruction": f"What colour is the {thing}?", "input": "",
                "output": f"The {thing} is {colour}."}
    if kind == 1:
        return {"instruction": "Name the colour of this thing.", "input": thing, "output": colour}
    return {"instruction": "Repeat the word twice.", "input": thing, "output": f"{thing} {thing}"}


def write_text_dataset(path: Path, n: int = 64,
                       fmt: Literal["jsonl", "csv", "instruction"] = "jsonl", seed: int = 0) -> Path:
    """Write ``n`` records to the file ``path``: jsonl/csv with ``text``, or instruction jsonl.

    ``instruction`` records have ``instruction``, ``input`` and ``output`` fields. Returns ``path``.
    """
    if fmt not in ("jsonl", "csv", "instruction"):
        raise DatasetError(f"`fmt` must be 'jsonl', 'csv' or 'instruction', got {fmt!r}")
    if n < 1:
        raise DatasetError(f"a text dataset needs n >= 1 records, got n={n}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    if fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["text"])
            writer.writerows([_text_record(rng)] for _ in range(n))
        return path
    records = ([{"text": _text_record(rng)} for _ in range(n)] if fmt == "jsonl"
               else [_instruction_record(rng) for _ in range(n)])
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
