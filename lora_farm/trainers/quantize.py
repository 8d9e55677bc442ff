"""``quantize_base``: the frozen base stored in 8-bit float or 4-bit NF4 with torchao, LoRA on top.

Why torchao: one PyTorch-native library gives both formats as tensor subclasses
(``Float8Tensor`` weight-only, ``NF4Tensor`` as QLoRA uses it), with no CUDA build of its own to
match; peft trains LoRA over them (``TorchaoLoraLinear`` for torchao's tensors, the plain LoRA
layer over NF4's ``F.linear``), and the same code runs on the CPU, where the tests exercise it.
bitsandbytes covers NF4 only through its own kernels; optimum-quanto has not been released
since 2025.

Only ``nn.Linear`` weights are quantized (they are ~99% of a transformer's parameters); norms,
embeddings, convolutions and biases stay 16-bit. Layers move to the device one at a time before
they are quantized, so the card never holds the whole 16-bit base.

On the CPU the base stays unquantized (the savings are a card's; CPU float8 matmuls are slow):
``LORAFARM_QUANTIZE_ON_CPU=1`` quantizes there too (the tests use it).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

FORCE_ON_CPU_ENV = "LORAFARM_QUANTIZE_ON_CPU"
NF4_BLOCK = 64  # weights per NF4 block (QLoRA's); its scales are quantized in blocks of up to 256

# peft warns that a LoRA over a torchao weight cannot be merged: lora-farm never merges
warnings.filterwarnings("ignore", message=r".*without `get_apply_tensor_subclass`")


@dataclass(frozen=True)
class Quantized:
    """What one module's quantization did."""

    layers: int  # nn.Linear layers quantized
    skipped: int  # nn.Linear layers left 16-bit (a shape the format cannot take)
    params: int  # weights quantized

    def describe(self, mode: str, name: str) -> str:
        return (f"{name}: {self.layers} linear layers ({self.params / 1e6:.1f}M weights) in {mode}"
                + (f", {self.skipped} left 16-bit (shape)" if self.skipped else ""))


def quantizes_on(device: torch.device) -> bool:
    """Whether ``quantize_base`` takes effect on ``device`` (CUDA; the CPU only when forced)."""
    return device.type == "cuda" or os.environ.get(FORCE_ON_CPU_ENV) == "1"


def quantize_linears(module: torch.nn.Module, mode: str, device: torch.device) -> Quantized:
    """Move ``module`` to ``device`` layer by layer, storing every ``nn.Linear`` weight in
    ``mode`` (fp8 | nf4). The module must be frozen and carry no LoRA yet."""
    layers = skipped = params = 0
    for child in list(module.modules()):
        if isinstance(child, torch.nn.Linear):
            child.to(device)
            if _quantize_linear(child, mode):
                layers, params = layers + 1, params + child.in_features * child.out_features
            else:
                skipped += 1
    module.to(device)  # what is not a linear layer (norms, embeddings, convolutions)
    return Quantized(layers, skipped, params)


def _quantize_linear(linear: torch.nn.Linear, mode: str) -> bool:
    if mode == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(linear, Float8WeightOnlyConfig())
        return True
    if mode == "nf4":
        return _to_nf4(linear)
    raise ValueError(f"`quantize_base` must be fp8 or nf4 here, got {mode!r}")


def _to_nf4(linear: torch.nn.Linear) -> bool:
    from torchao.quantization import to_nf4

    blocks, remainder = divmod(linear.weight.numel(), NF4_BLOCK)
    if remainder or blocks == 0:
        return False
    scaler_block = math.gcd(blocks, 256)  # QLoRA's 256 where the shape allows, else the largest fit
    weight = to_nf4(linear.weight.data.to(torch.bfloat16), NF4_BLOCK, scaler_block)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return True
