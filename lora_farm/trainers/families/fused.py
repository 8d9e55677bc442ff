"""Single files whose modules fuse several of diffusers' (q, k, v into one qkv): the LoRA of a
fused module, exactly.

``down`` stacks the parts' A (rank k*r) and ``up`` is the block-diagonal of the parts' B, so
``up @ down`` is the parts' deltas one under the other; a part without LoRA gets zero rows.
``alpha`` is k*alpha, so alpha/rank (the scale) is unchanged; parts trained with another scale (a
resumed LoRA) have it folded into their B. diffusers' converters recognise the block-diagonal up
and split it back into the parts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Part = tuple[torch.Tensor, torch.Tensor, float] | tuple[None, int, int]


def bfl_block_modules(transformer: torch.nn.Module, double: dict[str, tuple[str, ...]],
                      single: dict[str, tuple[str, ...]], outside: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """BFL's names (``double_blocks_N_*``, ``single_blocks_N_*``, the rest) of a Flux-line
    ``transformer`` -> the diffusers modules each fuses, in order (Flux.1 and Flux.2 alike)."""
    config = transformer.config
    found = {f"double_blocks_{i}_{name}": tuple(f"transformer_blocks.{i}.{p}" for p in parts)
             for i in range(config.num_layers) for name, parts in double.items()}
    found |= {f"single_blocks_{i}_{name}": tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
              for i in range(config.num_single_layers) for name, parts in single.items()}
    return found | {name: (module,) for name, module in outside.items()}


def fused_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor],
                     alphas: dict[str, tuple[int, float]], layout: dict[str, tuple[str, ...]],
                     layout_name: str, swapped: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """peft's LoRA (keys ``<module>.lora_A.weight``) -> ``lora_unet_<name>`` keys of ``layout``
    (single-file name -> the diffusers modules it fuses, in order). ``swapped``: names whose two
    output halves the file keeps in the other order ((shift, scale) where diffusers has (scale,
    shift))."""
    modules, swapped = dict(transformer.named_modules()), set(swapped)
    tensors: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for name, parts in layout.items():
        if not any(part in alphas for part in parts):
            continue
        down, up, alpha = fuse([lora_of(state, alphas, part, modules[part]) for part in parts])
        if name in swapped:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        key = f"lora_unet_{name}"
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(alpha)}
        covered.update(parts)
    missing = sorted(set(alphas) - covered)
    if missing:
        raise ValueError(f"LoRA modules with no place in the {layout_name} layout: {missing[:5]}")
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}


def lora_of(state: dict[str, torch.Tensor], alphas: dict[str, tuple[int, float]], module: str,
            layer: torch.nn.Module) -> Part:
    """``(A, B, scale)`` of a module with LoRA, else ``(None, in, out)`` (its base layer's sizes)."""
    if module not in alphas:
        base = getattr(layer, "base_layer", layer)
        return None, base.in_features, base.out_features
    rank, alpha = alphas[module]
    return state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"], alpha / rank


def fuse(parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, alpha)`` of one module whose output is the parts' outputs concatenated:
    ``alpha / rank * up @ down`` equals the parts' deltas stacked, exactly."""
    present = [(a, b, scale) for a, b, scale in parts if a is not None]
    first_a, _, scale = present[0]
    rank = first_a.shape[0]
    downs, ups = [], []
    for a, b, part_scale in parts:
        if a is None:  # no LoRA on this part: zero rows of the same rank (b, part_scale = in, out)
            a, b = torch.zeros(rank, first_a.shape[1]), torch.zeros(part_scale, rank)
            part_scale = scale
        downs.append(a.float())
        ups.append(b.float() * (part_scale / scale))
    down, up = torch.cat(downs), torch.block_diag(*ups)
    return down, up, scale * down.shape[0]
