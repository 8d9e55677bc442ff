"""The Flux.2 LoRA single file in BFL's key layout with kohya's names (what ComfyUI, kohya-style
Flux.2 trainers and diffusers' ``_convert_kohya_flux2_lora_to_diffusers`` read):
``lora_unet_double_blocks_{i}_img_attn_qkv``, ``..._img_mlp_0``, ``lora_unet_single_blocks_{i}_linear1``.

As in Flux.1, a double block's q, k, v (``img_attn_qkv``; ``txt_attn_qkv`` for the text stream)
are one module in BFL's model and three in diffusers': their LoRA is fused exactly
(``fused.fuse``), and diffusers' converter recognises the block-diagonal up and splits it back.
Unlike Flux.1, diffusers keeps a single block's fused input (``attn.to_qkv_mlp_proj`` = BFL's
``linear1``) and output (``attn.to_out`` = ``linear2``) as BFL does, so those map one to one; the
modulation is shared by all blocks (no per-block ``mod_lin``). Modules outside the blocks carry
the names diffusers' converter reads (``img_in``, ``txt_in``, ``time_in_*``, ``final_layer_linear``).
"""

from __future__ import annotations

import torch

from lora_farm.trainers.families.fused import bfl_block_modules, fused_state_dict

# diffusers module (under transformer_blocks.{i}. / single_transformer_blocks.{i}.) -> BFL name
DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
          "img_mlp_0": ("ff.linear_in",), "img_mlp_2": ("ff.linear_out",),
          "txt_mlp_0": ("ff_context.linear_in",), "txt_mlp_2": ("ff_context.linear_out",)}
SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
OUTSIDE = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in_in_layer": "time_guidance_embed.timestep_embedder.linear_1",
           "time_in_out_layer": "time_guidance_embed.timestep_embedder.linear_2",
           "final_layer_linear": "proj_out"}


def bfl2_modules(transformer: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every BFL module name of a Flux.2 ``transformer`` -> the diffusers modules it fuses, in order."""
    return bfl_block_modules(transformer, DOUBLE, SINGLE, OUTSIDE)


def bfl2_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor],
                    alphas: dict[str, tuple[int, float]]) -> dict[str, torch.Tensor]:
    """peft's transformer LoRA (keys ``<module>.lora_A.weight``) -> the Flux.2 BFL single file."""
    return fused_state_dict(transformer, state, alphas, bfl2_modules(transformer), "Flux.2 BFL")
