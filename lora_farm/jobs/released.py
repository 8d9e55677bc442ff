"""What a single-file checkpoint of a released model needs to load without `base_model_config`.

A single file holds weights only. The diffusers configs of the released SD 1.x (v1-5) and SDXL
(base 1.0) models ship here (``released_configs/<family>/``, no weights); CLIP's BPE vocabulary
comes from the ``openai-clip`` package (``clip/bpe_simple_vocab_16e6.txt.gz``), which needs no
torch. SD 2.x is left out on purpose: its 512 px (epsilon) and 768 px (v-prediction) models have
the same weights layout, so the file alone cannot say which objective to train.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # inspect asks this module, so no import at run time
    from lora_farm.jobs.inspect import BaseModelInfo

RELEASED_CONFIGS = Path(__file__).parent / "released_configs"
CLIP_BPE_PACKAGE = "openai-clip==1.0.1"
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def clip_bpe_file() -> Path | None:
    """CLIP's BPE file in the installed ``clip`` package, found without importing the package
    (its ``__init__`` imports torch and torchvision)."""
    spec = importlib.util.find_spec("clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / CLIP_BPE_FILE).is_file():
            return Path(folder) / CLIP_BPE_FILE
    return None


def released_config_mismatch(info: BaseModelInfo) -> str | None:
    """Why the shipped configs cannot describe the single file ``info``; None when they can."""
    folder = RELEASED_CONFIGS / info.family
    if not folder.is_dir():
        return (f"lora-farm ships no configs for {info.family} single files (SD 2.x: the file does "
                "not say whether the model predicts epsilon or v)")
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    released = {key: unet[key] for key in ("in_channels", "block_out_channels", "cross_attention_dim")}
    found = info.details.get("unet", {})
    if found != released:
        return (f"its UNet ({_describe(found)}) is not the released {info.family} one "
                f"({_describe(released)}), whose configs lora-farm ships")
    if clip_bpe_file() is None:
        return f"CLIP's tokenizer vocabulary is not installed (`pip install {CLIP_BPE_PACKAGE}`)"
    return None


def _describe(unet: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(unet.items())) or "no UNet widths found"
