"""Header-only model folders (safetensors headers with real shapes, no data written): every image
family at its real size for the VRAM estimate (tests and bench/estimate_table.py), which reads
nothing but headers and configs. Each file is as long as its header says (a sparse file: the data
are holes), since validation refuses a shorter one."""

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
            shapes |= _attention_shapes(f"{prefix}.attentions.{i}.transformer_blocks.0", dim, 768)
    counted = sum(_numel(s) for s in shapes.values())
    shapes["resnets_and_the_rest.weight"] = [SD15_PARAMS["unet"] - counted]
    return shapes


def _attention_shapes(block: str, dim: int, context: int) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for attn, kv_in in (("attn1", dim), ("attn2", context)):
        shapes[f"{block}.{attn}.to_q.weight"] = [dim, dim]
        shapes[f"{block}.{attn}.to_k.weight"] = [dim, kv_in]
        shapes[f"{block}.{attn}.to_v.weight"] = [dim, kv_in]
        shapes[f"{block}.{attn}.to_out.0.weight"] = [dim, dim]
        shapes[f"{block}.{attn}.to_out.0.bias"] = [dim]
    return shapes


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def sd15_headers(root: Path) -> Path:
    """SD 1.5's parameter counts (fp32 headers, no data) with its attention shapes."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps(
        {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "sample_size": 64}))
    write_header_only(root / "unet" / "diffusion_pytorch_model.safetensors", sd15_unet_shapes())
    write_header_only(root / "text_encoder" / "model.safetensors",
                      {"text_model.rest.weight": [SD15_PARAMS["text_encoder"]]})
    write_header_only(root / "vae" / "diffusion_pytorch_model.safetensors",
                      {"encoder_decoder.weight": [SD15_PARAMS["vae"]]})
    return root


@pytest.fixture(scope="session")
def sd15(tmp_path_factory) -> Path:
    root = sd15_headers(tmp_path_factory.mktemp("sd15") / "sd15")
    # an fp16 variant next to it must not be counted twice
    write_header_only(root / "unet" / "diffusion_pytorch_model.fp16.safetensors",
                      sd15_unet_shapes(), dtype="F16")
    return root


def sdxl_headers(root: Path) -> Path:
    """SDXL base 1.0's parameter counts (fp16 headers, no data): UNet 2.57 B with its 70
    transformer blocks' attention shapes, CLIP-L 123 M, OpenCLIP-G 695 M, VAE 84 M."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps(
        {"block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "sample_size": 128,
         "addition_embed_type": "text_time"}))
    shapes: dict[str, list[int]] = {}
    for prefix, dim, attentions, depth in (("down_blocks.1", 640, 2, 2), ("down_blocks.2", 1280, 2, 10),
                                           ("mid_block", 1280, 1, 10), ("up_blocks.0", 1280, 3, 10),
                                           ("up_blocks.1", 640, 3, 2)):
        for i in range(attentions):
            for j in range(depth):
                shapes |= _attention_shapes(f"{prefix}.attentions.{i}.transformer_blocks.{j}", dim, 2048)
    shapes["resnets_and_the_rest.weight"] = [2_567_463_684 - sum(_numel(s) for s in shapes.values())]
    write_header_only(root / "unet" / "diffusion_pytorch_model.safetensors", shapes, "F16")
    for folder, params in (("text_encoder", 123_060_480), ("text_encoder_2", 694_659_840),
                           ("vae", 83_653_863)):
        write_header_only(root / folder / "model.safetensors", {"weight": [params]}, "F16")
    return root


# ---- today's image families at their real sizes (bf16 headers, no data) --------------------
# Nearly every weight of these transformers and text encoders is a linear layer's (what
# `quantize_base` stores in 8 or 4 bits): the rest is written as linear weights of the model's
# width, token embeddings at their real shapes, and a 1-D remainder (norms, biases).

def linear_rest(params: int, width: int) -> dict[str, list[int]]:
    rows, remainder = divmod(params, width)
    return {"rest.linear.weight": [rows, width], "rest.norms": [remainder]}


def text_encoder(params: int, embedding: str, shape: list[int]) -> dict[str, list[int]]:
    return {embedding: shape} | linear_rest(params - shape[0] * shape[1], shape[1])


T5_XXL = text_encoder(4_762_310_656, "shared.weight", [32_128, 4096])


def flux_dev_headers(root: Path) -> Path:
    """Flux.1-dev's parameter counts (bf16 headers, no data): transformer 11.9 B, T5-XXL 4.76 B,
    CLIP-L 123 M, VAE 84 M; the transformer's LoRA targets with their real shapes."""
    config = {"_class_name": "FluxTransformer2DModel", "num_layers": 19, "num_single_layers": 38,
              "num_attention_heads": 24, "attention_head_dim": 128, "guidance_embeds": True}
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    shapes = {f"transformer_blocks.{i}.attn.{p}.weight": [3072, 3072] for i in range(19)
              for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    shapes |= {f"single_transformer_blocks.{i}.attn.{p}.weight": [3072, 3072] for i in range(38)
               for p in ("to_q", "to_k", "to_v")}
    shapes |= linear_rest(11_901_408_320 - sum(a * b for a, b in shapes.values()), 3072)
    write_header_only(root / "transformer" / "diffusion_pytorch_model.safetensors", shapes, "BF16")
    write_header_only(root / "text_encoder_2" / "model.safetensors", T5_XXL, "BF16")
    for folder, params in (("text_encoder", 123_060_480), ("vae", 83_819_683)):
        write_header_only(root / folder / "model.safetensors", {"weight": [params]}, "BF16")
    return root


def sd3_folder(root: Path, **config) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **config}))
    return root


def sd35_large_headers(root: Path) -> Path:
    """SD3.5 Large's parameter counts (bf16 headers, no data): transformer 8.06 B, T5-XXL 4.76 B,
    CLIP-G 695 M, CLIP-L 124 M, VAE 84 M; the default LoRA targets with their real shapes."""
    sd3_folder(root, num_layers=38, num_attention_heads=38, attention_head_dim=64, qk_norm="rms_norm",
               dual_attention_layers=[])
    shapes = {f"transformer_blocks.{i}.attn.{p}.weight": [2432, 2432] for i in range(38)
              for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")}
    shapes |= {f"transformer_blocks.{i}.attn.to_add_out.weight": [2432, 2432] for i in range(37)}
    shapes |= linear_rest(8_056_697_984 - sum(a * b for a, b in shapes.values()), 2432)
    write_header_only(root / "transformer" / "diffusion_pytorch_model.safetensors", shapes, "BF16")
    write_header_only(root / "text_encoder_3" / "model.safetensors", T5_XXL, "BF16")
    for folder, params in (("text_encoder_2", 694_659_840), ("text_encoder", 123_650_304), ("vae", 83_653_863)):
        write_header_only(root / folder / "model.safetensors", {"weight": [params]}, "BF16")
    return root


def qwen_image_headers(root: Path) -> Path:
    """Qwen-Image's parameter counts (bf16 headers, no data): transformer 20.43 B, Qwen2.5-VL-7B
    8.29 B, VAE 0.127 B; the default LoRA targets with their real shapes (60 blocks of 3072)."""
    config = {"_class_name": "QwenImageTransformer2DModel", "num_layers": 60, "num_attention_heads": 24,
              "attention_head_dim": 128, "joint_attention_dim": 3584}
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    shapes = {f"transformer_blocks.{i}.attn.{p}.weight": [3072, 3072] for i in range(60)
              for p in ("to_q", "to_k", "to_v", "to_out.0")}
    shapes |= linear_rest(20_430_401_088 - sum(a * b for a, b in shapes.values()), 3072)
    write_header_only(root / "transformer" / "diffusion_pytorch_model.safetensors", shapes, "BF16")
    write_header_only(root / "text_encoder" / "model.safetensors",
                      text_encoder(8_292_166_656, "model.embed_tokens.weight", [152_064, 3584]), "BF16")
    write_header_only(root / "vae" / "model.safetensors", {"weight": [126_892_531]}, "BF16")
    return root


def zimage_headers(root: Path) -> Path:
    """Z-Image-Turbo's parameter counts (bf16 headers, no data): transformer 6.15 B (30 blocks +
    2 + 2 refiners of width 3840), Qwen3-4B 4.02 B, VAE 84 M; LoRA targets at their real shapes."""
    config = {"_class_name": "ZImageTransformer2DModel", "dim": 3840, "n_layers": 30, "n_refiner_layers": 2,
              "n_heads": 30, "cap_feat_dim": 2560}
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    blocks = [f"layers.{i}" for i in range(30)] + [f"{s}.{i}" for s in ("noise_refiner", "context_refiner")
                                                    for i in range(2)]
    shapes = {f"{b}.attention.{p}.weight": [3840, 3840] for b in blocks
              for p in ("to_q", "to_k", "to_v", "to_out.0")}
    shapes |= {f"{b}.feed_forward.{p}.weight": [10240, 3840] for b in blocks for p in ("w1", "w3")}
    shapes |= {f"{b}.feed_forward.w2.weight": [3840, 10240] for b in blocks}
    shapes |= linear_rest(6_154_908_736 - sum(a * b for a, b in shapes.values()), 3840)
    write_header_only(root / "transformer" / "diffusion_pytorch_model.safetensors", shapes, "BF16")
    write_header_only(root / "text_encoder" / "model.safetensors",
                      text_encoder(4_022_468_096, "model.embed_tokens.weight", [151_936, 2560]), "BF16")
    write_header_only(root / "vae" / "model.safetensors", {"weight": [83_819_683]}, "BF16")
    return root


# Wan 2.1 T2V: (width, feed-forward, blocks, heads, transformer parameters)
WAN21_SIZES = {"1.3B": (1536, 8960, 30, 12, 1_418_996_800), "14B": (5120, 13824, 40, 40, 14_288_491_584)}
UMT5_XXL_ENCODER, WAN_VAE = 5_680_910_336, 126_892_531


def wan21_headers(root: Path, size: str = "14B") -> Path:
    """Wan 2.1 T2V's parameter counts (fp32 headers, no data; our assumption for how the
    -Diffusers folders store them): the transformer with every block Linear at its real shape
    (blocks.N.*: the estimate counts the swapped blocks from them), UMT5-XXL's encoder, the VAE."""
    _wan_transformer(root / "transformer", size)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    for folder, params in (("text_encoder", UMT5_XXL_ENCODER), ("vae", WAN_VAE)):
        write_header_only(root / folder / "model.safetensors", {"weight": [params]})
    return root


def wan22_a14b_headers(root: Path) -> Path:
    """Wan 2.2 T2V A14B: Wan 2.1 14B's folder with a second expert of the same shapes."""
    wan21_headers(root, "14B")
    _wan_transformer(root / "transformer_2", "14B")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    return root


def _wan_transformer(folder: Path, size: str) -> None:
    width, ffn, blocks, heads, total = WAN21_SIZES[size]
    config = {"_class_name": "WanTransformer3DModel", "num_layers": blocks, "num_attention_heads": heads,
              "attention_head_dim": width // heads, "ffn_dim": ffn, "in_channels": 16, "text_dim": 4096}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {f"blocks.{i}.{attn}.{p}.weight": [width, width] for i in range(blocks)
              for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
    shapes |= {f"blocks.{i}.ffn.net.0.proj.weight": [ffn, width] for i in range(blocks)}
    shapes |= {f"blocks.{i}.ffn.net.2.weight": [width, ffn] for i in range(blocks)}
    shapes["condition_embedder.rest.weight"] = [total - sum(a * b for a, b in shapes.values())]
    write_header_only(folder / "diffusion_pytorch_model.safetensors", shapes)


def chroma_headers(root: Path) -> Path:
    """Chroma1-HD's parameter counts (bf16 headers, no data): transformer 8.90 B (Flux.1's blocks
    without their modulation linears, plus the approximator), T5-XXL 4.76 B, VAE 84 M; the LoRA
    targets with their real shapes."""
    config = {"_class_name": "ChromaTransformer2DModel", "num_layers": 19, "num_single_layers": 38,
              "num_attention_heads": 24, "attention_head_dim": 128}
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ChromaPipeline"}))
    shapes = {f"transformer_blocks.{i}.attn.{p}.weight": [3072, 3072] for i in range(19)
              for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    shapes |= {f"single_transformer_blocks.{i}.attn.{p}.weight": [3072, 3072] for i in range(38)
               for p in ("to_q", "to_k", "to_v")}
    shapes |= linear_rest(8_899_983_424 - sum(a * b for a, b in shapes.values()), 3072)
    write_header_only(root / "transformer" / "diffusion_pytorch_model.safetensors", shapes, "BF16")
    write_header_only(root / "text_encoder" / "model.safetensors", T5_XXL, "BF16")
    write_header_only(root / "vae" / "model.safetensors", {"weight": [83_819_683]}, "BF16")
    return root


def _flux2_headers(root: Path, pipeline: str, transformer_params: int, blocks: tuple[int, int], width: int,
                   encoder: dict[str, list[int]], **config) -> Path:
    config = {"_class_name": "Flux2Transformer2DModel", "num_layers": blocks[0], "num_single_layers": blocks[1],
              "num_attention_heads": width // 128, "attention_head_dim": 128, **config}
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    shapes = {f"transformer_blocks.{i}.attn.{p}.weight": [width, width] for i in range(blocks[0])
              for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    shapes |= {f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight": [9 * width, width]
               for i in range(blocks[1])}  # q, k, v and the 3x-wide gated MLP input (2 x 3 width)
    shapes |= linear_rest(transformer_params - sum(a * b for a, b in shapes.values()), width)
    write_header_only(root / "transformer" / "diffusion_pytorch_model.safetensors", shapes, "BF16")
    write_header_only(root / "text_encoder" / "model.safetensors", encoder, "BF16")
    write_header_only(root / "vae" / "model.safetensors", {"weight": [84_046_115]}, "BF16")
    return root


def flux2_klein_headers(root: Path) -> Path:
    """FLUX.2 klein 4B's parameter counts (bf16 headers, no data): transformer 3.88 B (5 double +
    20 single blocks of width 3072), Qwen3-4B 4.02 B, VAE 84 M; LoRA targets at their real shapes."""
    return _flux2_headers(root, "Flux2KleinPipeline", 3_875_544_576, (5, 20), 3072,
                          text_encoder(4_022_468_096, "model.embed_tokens.weight", [151_936, 2560]),
                          joint_attention_dim=7680, guidance_embeds=False)


def flux2_dev_headers(root: Path) -> Path:
    """FLUX.2 dev's parameter counts (bf16 headers, no data): transformer 32.2 B (8 double + 48
    single blocks of width 6144), Mistral-Small-3.1 24 B, VAE 84 M."""
    return _flux2_headers(root, "Flux2Pipeline", 32_223_281_152, (8, 48), 6144,
                          text_encoder(24_011_361_280, "model.language_model.embed_tokens.weight", [131_072, 5120]),
                          joint_attention_dim=15360, guidance_embeds=True)
