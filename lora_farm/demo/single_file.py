"""Write a diffusers SD / SDXL folder as one original-layout (CompVis / A1111) ``.safetensors``.

A port of diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` and
``convert_diffusers_to_original_sdxl.py``, generalised from their hard-coded SD 1.5 / SDXL
block counts to any UNet / VAE config (the tiny models have fewer blocks). The layout is the
one ``from_single_file`` reads back (``diffusers.loaders.single_file_utils``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lora_farm.errors import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_PARTS = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
                       "to_out.0.": "proj_out."}
OPENCLIP_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                        "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def _load_component(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, state dict) of one pipeline component folder."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{folder} holds no .safetensors weights; save the pipeline with safe_serialization")
    state = {key: tensor for file in files for key, tensor in load_file(str(file)).items()}
    return json.loads((folder / "config.json").read_text(encoding="utf-8")), state


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """One diffusers UNet2DConditionModel key -> its ``model.diffusion_model`` name (no prefix)."""
    for old, new in UNET_TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old):]
    per_down = config["layers_per_block"] + 1  # resnets (+ attentions) and one downsampler
    up_has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    patterns = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda i, j, rest: f"input_blocks.{i * per_down + j + 1}.0.{_resnet(rest)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda i, j, rest: f"input_blocks.{i * per_down + j + 1}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.()(.*)",
         lambda i, _, rest: f"input_blocks.{(i + 1) * per_down}.0.op.{rest}"),
        (r"mid_block\.resnets\.(\d+)\.()(.*)",
         lambda j, _, rest: f"middle_block.{2 * j}.{_resnet(rest)}"),
        (r"mid_block\.attentions\.(\d+)\.()(.*)",
         lambda j, _, rest: f"middle_block.{2 * j + 1}.{rest}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda i, j, rest: f"output_blocks.{i * per_down + j}.0.{_resnet(rest)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda i, j, rest: f"output_blocks.{i * per_down + j}.1.{rest}"),
        # the upsampler rides in the block's last layer, after its resnet (and attention)
        (r"up_blocks\.(\d+)\.upsamplers\.0\.()(.*)",
         lambda i, _, rest: f"output_blocks.{i * per_down + per_down - 1}."
                            f"{2 if up_has_attention[i] else 1}.{rest}"),
    ]
    for pattern, build in patterns:
        match = re.fullmatch(pattern, key)
        if match:
            first, second, rest = match.groups()
            return build(int(first), int(second or 0), rest)
    raise ModelLoadError(f"UNet tensor `{key}` has no original-layout name; the converter knows "
                         "UNet2DConditionModel (SD 1.x / 2.x / SDXL) only")


def _resnet(rest: str) -> str:
    part, _, tail = rest.partition(".")
    return f"{UNET_RESNET_PARTS.get(part, part)}.{tail}"


def vae_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """One diffusers AutoencoderKL key -> its ``first_stage_model`` name (no prefix)."""
    top = len(config["up_block_types"]) - 1  # the original numbers decoder blocks bottom-up
    key = key.replace("conv_norm_out.", "norm_out.")
    rules = [  # (pattern, replacement) on the key's head; groups: side, block, layer
        (r"(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda s, i, j: f"{s}.down.{i}.block.{j}."),
        (r"(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.()", lambda s, i, _: f"{s}.down.{i}.downsample."),
        (r"(decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda s, i, j: f"{s}.up.{top - i}.block.{j}."),
        (r"(decoder)\.up_blocks\.(\d+)\.upsamplers\.0\.()", lambda s, i, _: f"{s}.up.{top - i}.upsample."),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.()", lambda s, j, _: f"{s}.mid.block_{j + 1}."),
    ]
    for pattern, build in rules:
        match = re.match(pattern, key)
        if match:
            side, first, second = match.groups()
            head = build(side, int(first), int(second or 0))
            return (head + key[match.end():]).replace("conv_shortcut.", "nin_shortcut.")
    match = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.", key)
    if match:
        rest = key[match.end():]
        for old, new in VAE_ATTENTION_PARTS.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
        return f"{match.group(1)}.mid.attn_1.{rest}"
    return key


def vae_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    converted = {}
    for key, tensor in state.items():
        new_key = vae_key_to_ldm(key, config)
        # the original mid attention uses 1x1 convolutions where diffusers uses linear layers
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        converted[new_key] = tensor
    return converted


def clip_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    """transformers CLIPTextModel keys, under ``text_model.`` as the original files have them."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": tensor
            for key, tensor in state.items() if not key.endswith("position_ids")}


def openclip_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    """CLIPTextModelWithProjection -> OpenCLIP layout (fused q/k/v ``in_proj``, transposed proj)."""
    import torch

    state = {key.removeprefix("text_model."): tensor for key, tensor in state.items()
             if not key.endswith("position_ids")}
    converted = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        # OpenCLIP multiplies by the projection (x @ P); a Linear stores P transposed
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    fused: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)", key)
        if not match:
            raise ModelLoadError(f"text_encoder_2 tensor `{key}` has no OpenCLIP name")
        layer, rest = match.groups()
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            fused.setdefault(f"transformer.resblocks.{layer}.attn.in_proj_{qkv.group(2)}", {})[
                qkv.group(1)] = tensor
            continue
        for old, new in OPENCLIP_LAYER_PARTS.items():
            rest = rest.replace(old, new)
        converted[f"transformer.resblocks.{layer}.{rest}"] = tensor
    for key, parts in fused.items():
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return converted


def _prefixed(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    return {prefix + key: tensor for key, tensor in state.items()}


def write_single_file_checkpoint(diffusers_dir: Path, out_file: Path) -> Path:
    """Write ``diffusers_dir`` (SD 1.x or SDXL pipeline folder) as one original-layout file.

    Load it back with ``StableDiffusionPipeline.from_single_file(out_file, config=diffusers_dir)``
    (``StableDiffusionXLPipeline`` for SDXL); the configs and tokenizers come from the folder.
    """
    from safetensors.torch import save_file

    diffusers_dir, out_file = Path(diffusers_dir), Path(out_file)
    if not (diffusers_dir / "unet" / "config.json").is_file():
        raise ModelLoadError(f"{diffusers_dir} is not a diffusers pipeline folder (no unet/config.json)")
    unet_config, unet = _load_component(diffusers_dir / "unet")
    vae_config, vae = _load_component(diffusers_dir / "vae")
    _, text = _load_component(diffusers_dir / "text_encoder")
    checkpoint = _prefixed(UNET_PREFIX, {unet_key_to_ldm(k, unet_config): v for k, v in unet.items()})
    checkpoint.update(_prefixed(VAE_PREFIX, vae_to_ldm(vae, vae_config)))
    if (diffusers_dir / "text_encoder_2").is_dir():
        _, text_2 = _load_component(diffusers_dir / "text_encoder_2")
        checkpoint.update(_prefixed(SDXL_TEXT_PREFIX, clip_to_ldm(text)))
        checkpoint.update(_prefixed(SDXL_TEXT2_PREFIX, openclip_to_ldm(text_2)))
    else:
        checkpoint.update(_prefixed(SD1_TEXT_PREFIX, clip_to_ldm(text)))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(out_file),
              metadata={"format": "pt", "converted_from": "diffusers"})
    return out_file
