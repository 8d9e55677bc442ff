"""The Flux LoRA single file in BFL's key layout (what ComfyUI, kohya sd-scripts and diffusers'
``_convert_kohya_flux_lora_to_diffusers`` read): ``lora_unet_double_blocks_{i}_img_attn_qkv``...

BFL fuses what diffusers keeps apart: a double block's q, k, v (``img_attn_qkv``, and
``txt_attn_qkv`` for the text stream) and a single block's q, k, v and MLP input (``linear1``).
A fused module's LoRA is exact (``fused.fuse``: stacked downs, a block-diagonal up, alpha x k);
diffusers' converter recognises the block-diagonal up and splits it back into the parts.

Modules outside the blocks (``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``,
``final_layer``; none is a default target) are written under BFL's names as ComfyUI reads them;
diffusers 0.42.1's converter names them without the ``transformer.`` prefix and its loader then
drops them, so only the blocks' LoRA survives a diffusers load of such a file.
"""

from __future__ import annotations

import torch

from lora_farm.trainers.families.fused import bfl_block_modules, fused_state_dict

# diffusers module (under transformer_blocks.{i}. / single_transformer_blocks.{i}.) -> BFL name
DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
          "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
          "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
          "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",)}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
          "modulation_lin": ("norm.linear",)}
OUTSIDE = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
           "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
           "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
           "final_layer_linear": "proj_out",
           "final_layer_adaLN_modulation_1": "norm_out.linear"}
SWAPPED = "final_layer_adaLN_modulation_1"  # BFL keeps (shift, scale) where diffusers has (scale, shift)


def bfl_modules(transformer: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every BFL module name of ``transformer`` -> the diffusers modules it fuses, in order."""
    return bfl_block_modules(transformer, DOUBLE, SINGLE, OUTSIDE)


def bfl_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor],
                   alphas: dict[str, tuple[int, float]]) -> dict[str, torch.Tensor]:
    """peft's transformer LoRA (keys ``<module>.lora_A.weight``) -> the BFL single file."""
    return fused_state_dict(transformer, state, alphas, bfl_modules(transformer), "BFL", {SWAPPED})
