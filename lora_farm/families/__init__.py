"""The registry of image and video model families (torch-free): what each is, how it is recognised, what
it costs. One module per family line holds its cards (``card.Family``); the torch side of a
family is the adapter its card names, imported only by the trainer process.

Adding a family: a module here with its ``CARDS``, its name in ``MODULES``, a torch adapter under
``lora_farm.trainers.families``, a tiny builder in ``lora_farm.demo`` and their tests.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from lora_farm.families.card import Family, TextEncoder

__all__ = ["Family", "TextEncoder", "all_families", "by_name", "denoiser_folders", "recognise_file", "recognise_folder",
           "supported"]

# recognition asks them in this order: the first card that matches wins (Chroma and Flux.2 before
# Flux.1: their single files hold Flux.1's block tensor names; SD last: its single-file rule claims any
# `model.diffusion_model.` file)
MODULES = ("wan", "zimage", "chroma", "flux2", "flux", "sd3", "qwen_image", "sd")


@cache
def all_families() -> tuple[Family, ...]:
    return tuple(card for module in MODULES for card in importlib.import_module(f"lora_farm.families.{module}").CARDS)


def by_name(name: str) -> Family:
    for card in all_families():
        if card.name == name:
            return card
    raise KeyError(f"no model family {name!r}; supported: {supported()}")


def supported() -> str:
    """``sd1 (Stable Diffusion 1.x), ...``: what an error lists when a model is none of them."""
    return ", ".join(f"{card.name} ({card.title})" for card in all_families())


def recognise_folder(index: dict[str, Any], configs: dict[str, dict[str, Any]],
                     folders: frozenset[str]) -> Family | None:
    """The family of a diffusers folder: its model_index.json, the config.json of each denoiser
    folder it has (``unet``, ``transformer``) and its subfolder names; None when no card matches."""
    return next((card for card in all_families()
                 if card.matches_folder(index, configs.get(card.denoiser, {}), folders)), None)


def recognise_file(header: dict[str, Any]) -> Family | None:
    """The family of a single-file checkpoint from its tensor names and shapes (never its name)."""
    return next((card for card in all_families() if card.matches_file is not None and card.matches_file(header)),
                None)


def denoiser_folders() -> tuple[str, ...]:
    """The folders whose config.json recognition reads (unet, transformer)."""
    return tuple(dict.fromkeys(card.denoiser for card in all_families()))
