"""A complete demo batch: tiny models, datasets and five job specs that train in seconds on CPU.

Layout under ``root``::

    models/tiny-sd  tiny-sdxl  tiny-flux-dev  tiny-sd35-medium  tiny-llm  tiny-sd.safetensors  tiny-sdxl.safetensors
    data/shapes-metadata/  shapes-sidecar/  facts.jsonl  facts-instructions.jsonl
    jobs/demo-sd-shapes.yaml  demo-sdxl-shapes.yaml  demo-flux-shapes.yaml  demo-llm-facts.yaml
         demo-llm-instructions.yaml

Spec paths are relative to the spec's folder (``../models/...``), so the whole tree can move.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lora_farm.demo.datasets import write_image_dataset, write_text_dataset
from lora_farm.demo.flux import build_tiny_flux
from lora_farm.demo.flux2 import build_tiny_flux2_klein
from lora_farm.demo.chroma import build_tiny_chroma
from lora_farm.demo.llm import build_tiny_llm
from lora_farm.demo.qwen_image import build_tiny_qwen_image
from lora_farm.demo.sd import IMAGE_SIZE, build_tiny_sd, build_tiny_sdxl
from lora_farm.demo.sd3 import build_tiny_sd3
from lora_farm.demo.wan import build_tiny_wan, write_clip_dataset
from lora_farm.demo.single_file import write_single_file_checkpoint
from lora_farm.demo.zimage import build_tiny_zimage

DEMO_BATCH = "demo"

# what every demo job shares: small, CPU-friendly, no worker processes, checkpoints mid-way
COMMON: dict[str, Any] = {
    "batch": DEMO_BATCH, "tags": ["demo"], "num_workers": 0, "mixed_precision": "no",
    "max_retries": 1, "timeout": "15m", "seed": 0, "lora_rank": 4, "batch_size": 2,
    "keep_checkpoints": 2,
}


# what the demo's image jobs render (the shapes dataset's kind of caption), seeds fixed per prompt;
# two prompts of 2 steps: a round costs about 2 training steps of the tiny models
SAMPLE_PROMPTS = ["a photo of a red circle on a white background",
                  {"prompt": "a photo of a blue square on a black background", "seed": 7}]


def _ensure(path: Path, build: Callable[[Path], Path]) -> Path:
    """Build ``path`` unless it exists: rerunning the demo reuses what is there."""
    if not path.exists():
        build(path)
    return path


def build_demo_assets(root: Path) -> dict[str, Path]:
    """Tiny models and datasets under ``root/models`` and ``root/data`` (skips what exists)."""
    models, data = root / "models", root / "data"
    assets = {
        "sd": _ensure(models / "tiny-sd", build_tiny_sd),
        "sdxl": _ensure(models / "tiny-sdxl", build_tiny_sdxl),
        "flux": _ensure(models / "tiny-flux-dev", build_tiny_flux),  # configs/flux-dev-lora.yaml
        "zimage": _ensure(models / "tiny-z-image", build_tiny_zimage),  # configs/z-image-lora.yaml
        "chroma": _ensure(models / "tiny-chroma", build_tiny_chroma),  # configs/chroma-lora.yaml
        "flux2_klein": _ensure(models / "tiny-flux2-klein", build_tiny_flux2_klein),  # configs/flux2-klein-lora.yaml
        "sd3": _ensure(models / "tiny-sd35-medium", build_tiny_sd3),  # configs/sd35-large-lora.yaml
        "qwen_image": _ensure(models / "tiny-qwen-image", build_tiny_qwen_image),  # configs/qwen-image-lora.yaml
        "wan": _ensure(models / "tiny-wan", build_tiny_wan),  # configs/wan21-t2v-lora.yaml
        "llm": _ensure(models / "tiny-llm", build_tiny_llm),
        "shapes_metadata": _ensure(data / "shapes-metadata",
                                   lambda p: write_image_dataset(p, n=8, captions="metadata")),
        "shapes_sidecar": _ensure(data / "shapes-sidecar",
                                  lambda p: write_image_dataset(p, n=8, captions="sidecar", seed=1)),
        "clips": _ensure(data / "moving-shapes", lambda p: write_clip_dataset(p, n=4, frames=81)),
        "facts": _ensure(data / "facts.jsonl", lambda p: write_text_dataset(p, n=64, fmt="jsonl")),
        "instructions": _ensure(data / "facts-instructions.jsonl",
                                lambda p: write_text_dataset(p, n=64, fmt="instruction")),
    }
    assets["sd_single_file"] = _ensure(models / "tiny-sd.safetensors",
                                       lambda p: write_single_file_checkpoint(assets["sd"], p))
    assets["sdxl_single_file"] = _ensure(models / "tiny-sdxl.safetensors",
                                         lambda p: write_single_file_checkpoint(assets["sdxl"], p))
    return assets


def _spec(name: str, task: str, base_model: str, train_data_dir: str, **rest: Any) -> dict[str, Any]:
    # identity and data first, so the YAML reads like a hand-written spec
    return {"name": name, "task": task, "base_model": base_model, "train_data_dir": train_data_dir,
            **COMMON, **rest}


def demo_specs(steps_scale: int = 1) -> dict[str, dict[str, Any]]:
    """The demo's job specs as YAML-ready dicts (paths relative to ``root/jobs``)."""
    # a sample grid (prompt x step) at each checkpoint and the end; few steps: the demo stays fast
    image = {"resolution": IMAGE_SIZE, "learning_rate": 1e-3, "max_steps": 30 * steps_scale,
             "save_steps": 15 * steps_scale, "sample_prompts": SAMPLE_PROMPTS, "sample_steps": 2}
    llm = {"max_seq_len": 64, "learning_rate": 2e-3, "lora_rank": 8,
           "max_steps": 60 * steps_scale, "save_steps": 30 * steps_scale,
           "sample_prompts": ["question: what colour is the sky? answer:"], "sample_max_new_tokens": 12,
           "validation_split": 0.1}
    specs = [
        _spec("demo-sd-shapes", "image", "../models/tiny-sd", "../data/shapes-metadata",
              metadata_path="../data/shapes-metadata/metadata.csv", **image),
        _spec("demo-sdxl-shapes", "image", "../models/tiny-sdxl", "../data/shapes-sidecar",
              caption_extension=".txt", priority=1, **image),
        # a flow-matching transformer: the T5 captions encoded once, auto quantization (none on the CPU)
        _spec("demo-flux-shapes", "image", "../models/tiny-flux-dev", "../data/shapes-metadata",
              metadata_path="../data/shapes-metadata/metadata.csv", quantize_base="auto",
              cache_text_encoder_outputs=True, **image),
        _spec("demo-llm-facts", "llm", "../models/tiny-llm", "../data/facts.jsonl", **llm),
        # the Alpaca prompt around each record takes ~50 tokens of the tiny tokenizer
        _spec("demo-llm-instructions", "llm", "../models/tiny-llm",
              "../data/facts-instructions.jsonl", **{**llm, "max_seq_len": 96}),
    ]
    return {spec["name"]: spec for spec in specs}


def write_demo_batch(root: Path, *, steps_scale: int = 1) -> list[Path]:
    """Build the demo assets under ``root`` and write the demo's job specs to ``root/jobs``.

    Returns the spec paths; ``lorafarm submit <root>/jobs/*.yaml`` runs them.
    """
    from lora_farm.jobs.yaml_io import dump_yaml

    if steps_scale < 1:
        raise ValueError(f"`steps_scale` must be >= 1, got {steps_scale}")
    root = Path(root).absolute()
    build_demo_assets(root)
    jobs = root / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, spec in demo_specs(steps_scale).items():
        path = jobs / f"{name}.yaml"
        path.write_text(f"# lora-farm demo job (tiny model, CPU friendly)\n{dump_yaml(spec)}",
                        encoding="utf-8")
        paths.append(path)
    return paths
