"""Tiny offline models and datasets: tests, demos and `lorafarm demo` run without any hub.

Every builder is deterministic for a given seed and takes seconds on one CPU core.
Heavy imports (torch, diffusers, transformers) happen inside the builders, so importing
this package stays cheap.
"""

from lora_farm.demo.batch import build_demo_assets, write_demo_batch
from lora_farm.demo.chroma import build_tiny_chroma
from lora_farm.demo.datasets import write_image_dataset, write_text_dataset
from lora_farm.demo.flux import build_tiny_flux
from lora_farm.demo.flux2 import build_tiny_flux2_klein
from lora_farm.demo.llm import build_tiny_llm
from lora_farm.demo.qwen_image import build_tiny_qwen_image
from lora_farm.demo.sd import build_tiny_sd, build_tiny_sdxl
from lora_farm.demo.sd3 import build_tiny_sd3
from lora_farm.demo.wan import build_tiny_wan, write_clip_dataset
from lora_farm.demo.single_file import write_single_file_checkpoint
from lora_farm.demo.zimage import build_tiny_zimage

__all__ = [
    "build_demo_assets", "build_tiny_chroma", "build_tiny_flux", "build_tiny_flux2_klein", "build_tiny_llm",
    "build_tiny_qwen_image", "build_tiny_sd", "build_tiny_sd3", "build_tiny_sdxl", "build_tiny_wan",
    "write_clip_dataset",
    "write_demo_batch", "write_image_dataset", "write_single_file_checkpoint",
    "write_text_dataset", "build_tiny_zimage",
]
