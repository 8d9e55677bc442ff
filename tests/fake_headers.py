"""Header-only model folders (safetensors headers with real shapes, no data written): SD 1.5-sized
models for the VRAM estimate, which reads nothing but headers and configs. Each file is as long as
its header says (a sparse file: the data are holes), since validation refuses a shorter one."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

SD15_PARAMS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}


def write_header_only(path: Path, shapes: dict[str, list[int]], dtype: str = "F32") -> None:
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 if dtype == "F32" else 2
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(raw)) + raw)
        stream.truncate(8 + len(raw) + offset)


def sd15_unet_shapes() -> dict[str, list[int]]:
    """The 16 transformer blocks of SD 1.5 with real attention shapes, the rest as one filler."""
    shapes: dict[str, list[int]] = {}
    blocks = [("down_blocks.0", 320, 2), ("down_blocks.1", 640, 2), ("down_blocks.2", 1280, 2),
              ("mid_block", 1280, 1), ("up_blocks.1", 1280, 3), ("up_blocks.2", 640, 3),
              ("up_blocks.3", 320, 3)]
    for prefix, dim, count in blocks:
        for i in range(count):
            base = f"{prefix}.attentions.{i}.transformer_blocks.0"
            for attn, kv_in in (("attn1", dim), ("attn2", 768)):
                shapes[f"{base}.{attn}.to_q.weight"] = [dim, dim]
                shapes[f"{base}.{attn}.to_k.weight"] = [dim, kv_in]
                shapes[f"{base}.{attn}.to_v.weight"] = [dim, kv_in]
                shapes[f"{base}.{attn}.to_out.0.weight"] = [dim, dim]
                shapes[f"{base}.{attn}.to_out.0.bias"] = [dim]
    counted = sum(_numel(s) for s in shapes.values())
    shapes["resnets_and_the_rest.weight"] = [SD15_PARAMS["unet"] - counted]
    return shapes


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


@pytest.fixture(scope="session")
def sd15(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd15")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps(
        {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "sample_size": 64}))
    write_header_only(root / "unet" / "diffusion_pytorch_model.safetensors", sd15_unet_shapes())
    # an fp16 variant next to it must not be counted twice
    write_header_only(root / "unet" / "diffusion_pytorch_model.fp16.safetensors",
                      sd15_unet_shapes(), dtype="F16")
    write_header_only(root / "text_encoder" / "model.safetensors",
                      {"text_model.rest.weight": [SD15_PARAMS["text_encoder"]]})
    write_header_only(root / "vae" / "diffusion_pytorch_model.safetensors",
                      {"encoder_decoder.weight": [SD15_PARAMS["vae"]]})
    return root
