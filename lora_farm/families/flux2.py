"""Flux.2 (Black Forest Labs): a rectified-flow transformer of double-stream then single-stream
blocks whose modulation is shared (one set per stream, not per block), conditioned on stacked
hidden states of a language model (three of its layers, concatenated per token), with its own VAE
(``AutoencoderKLFlux2``: 32 channels, latents patched 2x2 into 128 channels and normalised by the
VAE's batch-norm statistics).

- klein (``Flux2KleinPipeline``; 4B and 9B): the 4B has 5 double + 20 single blocks of width
  3072; a Qwen3 text encoder (4B / 8B), no guidance input. Trained here.
- dev (``Flux2Pipeline``): 32B, 8 + 48 blocks of width 6144, guidance-distilled (a guidance
  input), a Mistral-Small-3.1 24B text encoder (``Mistral3ForConditionalGeneration``) whose
  tokenizer is a ``PixtralProcessor``. Recognised (folder and single file) and estimated, but
  refused at validation (``not_trained``): transformers 5.24 will not build a PixtralProcessor
  without torchvision, which lora-farm's lock does not hold, so neither the real Flux2Pipeline
  nor a tiny offline one (the test model every family needs) loads here. Tried: PyPI's
  torchvision 0.28.0 (the release for torch 2.13) is built against the CUDA torch and fails to
  load against the lock's CPU build (``operator torchvision::nms does not exist``); the matching
  CPU wheel is only on download.pytorch.org, out of reach here. klein's adapter already reads the
  guidance input from the config and a processor's tokenizer; torchvision in the lock (one build
  per host kind) and a tiny Mistral3 + Pixtral builder (31 text layers: the pipeline stacks layers
  10, 20, 30) are what remain.
"""

from __future__ import annotations

from typing import Any

from lora_farm.families.card import Family, TextEncoder, attention_width, file_has_guidance, names_tensor

TRANSFORMER = "Flux2Transformer2DModel"
# attention and feed-forwards of the double blocks, and each single block's fused input projection
# (q, k, v and the MLP in one Linear in diffusers as in BFL's file: ``linear1``). A single block's
# output projection (``single_transformer_blocks.N.attn.to_out``) shares its suffix with a double
# block's ``attn.to_out`` list, so only its full name targets it.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                "ff_context.linear_out", "attn.to_qkv_mlp_proj")
FILE_MODULATION = "single_stream_modulation.lin.weight"  # BFL's (and ComfyUI's, prefixed) Flux.2 layout
WIDTH = attention_width("num_layers", "num_single_layers")  # double + single blocks


def _is_dev(index: dict[str, Any], config: dict[str, Any]) -> bool:
    """dev's folder names ``Flux2Pipeline``, klein's a ``Flux2Klein*`` pipeline; any other (or
    none) is told by the guidance input only dev has."""
    pipeline = str(index.get("_class_name", ""))
    if pipeline == "Flux2Pipeline" or pipeline.startswith("Flux2Klein"):
        return pipeline == "Flux2Pipeline"
    return bool(config.get("guidance_embeds"))


def _card(name: str, title: str, guidance: bool, encoder: str, **rest: Any) -> Family:
    return Family(
        name=name, title=title, denoiser="transformer", components=("transformer", "vae", "text_encoder"),
        text_encoders=(TextEncoder("text_encoder", "tokenizer", encoder, 512),),  # the pipelines' default
        objective="flow", lora_targets=LORA_TARGETS,
        kohya_metadata={"ss_base_model_version": "flux2", "ss_v2": "False"},
        modelspec_architecture=f"{name}/lora",
        adapter="lora_farm.trainers.families.flux2:Flux2Adapter",
        matches_folder=lambda index, config, folders: (config.get("_class_name") == TRANSFORMER
                                                       and _is_dev(index, config) == guidance),
        matches_file=lambda header: names_tensor(header, FILE_MODULATION) and file_has_guidance(header) == guidance,
        loads_single_file=False, trains_text_encoders=False, **rest)


# one 512 px sample (1024 image tokens + 512 text tokens) keeps ~20 tensors of tokens x width per
# block in bf16, as Flux.1 (8 GB for 57 blocks of 3072): klein 4B's 25 blocks of 3072 ~3.5 GB, dev's
# 56 blocks of 6144 ~15.7 GB; checkpointing keeps ~12%. With the weights read from the headers, at
# 1024 px, rank 16, checkpointed: klein 4B (transformer 3.88 B + Qwen3-4B 4.02 B in bf16 = 14.9 GiB)
# estimates 17.2 GiB in bf16 (a 24 GB card), 10.2 GiB with an fp8 base; BFL's announcement puts
# klein 4B inference at ~13 GB, on consumer cards. dev (32.2 B + Mistral 24 B = 105 GiB in bf16)
# estimates 114 GiB in bf16 and 24.4 GiB with an NF4 base and cached text-encoder outputs; the
# published ai-toolkit FLUX.2 dev guide (runcomfy.com) trains it from 24 GB cards (quantized
# transformer, text encoder unloaded after caching) up to H100/H200. Derivations, not measurements:
# calibration corrects them from real peaks.
FLUX2_KLEIN = _card("flux2-klein", "Flux.2 klein", guidance=False, encoder="qwen",
                    activation_mb_512=3500.0, reference_width=3072.0 * 25, width=WIDTH,
                    checkpointing_keeps=0.12, params=7.9e9, lora_params_per_rank=1.2e6)
NOT_TRAINED_DEV = ("its Mistral3 text encoder's PixtralProcessor needs torchvision, which lora-farm does not "
                   "install, and no tiny offline Flux.2 dev exists to test its training on")
FLUX2_DEV = _card("flux2-dev", "Flux.2 dev", guidance=True, encoder="mistral",
                  not_trained=NOT_TRAINED_DEV,
                  activation_mb_512=15700.0, reference_width=6144.0 * 56, width=WIDTH,
                  checkpointing_keeps=0.12, params=56e9, lora_params_per_rank=5.5e6)

CARDS = (FLUX2_KLEIN, FLUX2_DEV)
