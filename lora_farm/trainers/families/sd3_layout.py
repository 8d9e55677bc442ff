"""The SD3 / SD3.5 LoRA single file in SAI's MMDiT key layout, as ComfyUI and kohya sd-scripts
(sd3 branch) write and read it: ``lora_unet_joint_blocks_{i}_x_block_attn_qkv``... ComfyUI maps
``lora_unet_<name>`` to ``diffusion_model.<name with dots>.weight`` of the SAI checkpoint.

SAI fuses what diffusers keeps apart: each stream's q, k, v (``x_block.attn.qkv``,
``context_block.attn.qkv``, and SD3.5 Medium's ``x_block.attn2.qkv``). A fused module's LoRA is
exact, as in ``fused``: ``down`` stacks the parts' A, ``up`` is the block-diagonal of their
B, ``alpha`` is k*alpha. SAI's last block keeps only the text stream's adaLN and qkv, and its
adaLN (like ``final_layer``'s) holds (shift, scale) where diffusers has (scale, shift): the up
rows are swapped back. diffusers 0.42.1 has no converter for this layout (its SD3 loader reads
only the diffusers keys); the tests check it against diffusers' own SAI->diffusers checkpoint
converter through ComfyUI's key rule.
"""

from __future__ import annotations

import torch

from lora_farm.trainers.families.fused import fused_state_dict

# diffusers module (under transformer_blocks.{i}.) -> SAI name (under joint_blocks_{i}_)
BLOCK = {"x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "x_block_attn_proj": ("attn.to_out.0",), "x_block_mlp_fc1": ("ff.net.0.proj",),
         "x_block_mlp_fc2": ("ff.net.2",), "x_block_adaLN_modulation_1": ("norm1.linear",),
         "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "context_block_adaLN_modulation_1": ("norm1_context.linear",)}
NOT_LAST = {"context_block_attn_proj": ("attn.to_add_out",), "context_block_mlp_fc1": ("ff_context.net.0.proj",),
            "context_block_mlp_fc2": ("ff_context.net.2",)}  # the last block's text stream ends at its qkv
DUAL = {"x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block_attn2_proj": ("attn2.to_out.0",)}
OUTSIDE = {"context_embedder": "context_embedder",
           "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
           "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
           "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
           "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear"}


def sai_modules(transformer: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every SAI module name of ``transformer`` (a Linear, without ``lora_unet_``) -> the
    diffusers modules it fuses, in order."""
    config = transformer.config
    last = config.num_layers - 1
    found: dict[str, tuple[str, ...]] = {}
    for i in range(config.num_layers):
        names = BLOCK | ({} if i == last else NOT_LAST) | (DUAL if i in config.dual_attention_layers else {})
        found |= {f"joint_blocks_{i}_{name}": tuple(f"transformer_blocks.{i}.{p}" for p in parts)
                  for name, parts in names.items()}
    return found | {name: (module,) for name, module in OUTSIDE.items()}


def swapped(transformer: torch.nn.Module) -> set[str]:
    """The modules whose SAI output halves are (shift, scale), diffusers' (scale, shift)."""
    return {f"joint_blocks_{transformer.config.num_layers - 1}_context_block_adaLN_modulation_1",
            "final_layer_adaLN_modulation_1"}


def sai_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor],
                   alphas: dict[str, tuple[int, float]]) -> dict[str, torch.Tensor]:
    """peft's transformer LoRA (keys ``<module>.lora_A.weight``) -> the SAI-layout single file."""
    return fused_state_dict(transformer, state, alphas, sai_modules(transformer), "SAI",
                            swapped(transformer))
