"""Chroma (lodestones; Chroma1-HD / -Base): Flux.1-schnell's 19 double + 38 single blocks pruned to
8.9 B parameters, conditioned on T5-XXL alone (no CLIP, no pooled vector, no guidance input). The
per-block modulation layers are replaced by one small "distilled guidance" approximator that turns
the timestep into every block's shift / scale / gate, and the T5 padding is masked (all but the
first pad token) in the transformer's attention. Flux's 16-channel VAE, 2x2-packed latents."""

from __future__ import annotations

from lora_farm.families.card import Family, TextEncoder, names_tensor
from lora_farm.families.flux import LORA_TARGETS, WIDTH

TRANSFORMER = "ChromaTransformer2DModel"
# the approximator is Chroma's own (BFL's names: ``distilled_guidance_layer.in_proj``); a single
# file with it is Chroma, not the Flux.1-schnell it shares every block tensor with
FILE_APPROXIMATOR = "distilled_guidance_layer.in_proj.weight"


CHROMA = Family(
    name="chroma", title="Chroma", denoiser="transformer",
    components=("transformer", "vae", "text_encoder"),
    # the pipeline's default max_sequence_length (Chroma masks the padding beyond the first pad)
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "t5", 512),),
    # Flux's blocks without their (pruned) modulation linears: the same default targets
    objective="flow", lora_targets=LORA_TARGETS,
    kohya_metadata={"ss_base_model_version": "chroma", "ss_v2": "False"},
    modelspec_architecture="chroma/lora",
    adapter="lora_farm.trainers.families.chroma:ChromaAdapter",
    matches_folder=lambda index, config, folders: config.get("_class_name") == TRANSFORMER,
    matches_file=lambda header: names_tensor(header, FILE_APPROXIMATOR),
    loads_single_file=False,
    trains_text_encoders=False,
    # Flux.1's activations per sample (the same 57 blocks of width 3072 and token counts; no CLIP,
    # the modulation comes from the approximator): ~8 GB at 512 px, checkpointing keeps ~12%.
    # With the weights read from the headers (transformer 8.9 B + T5-XXL 4.76 B in bf16 = 25.4
    # GiB) a 1024 px bf16 rank-16 job estimates ~30 GiB: out of a 24 GB card in bf16, in line
    # with the published practice (ai-toolkit's Chroma example and guides train it on 24 GB
    # cards with the transformer in 8-bit, qfloat8). A derivation, not a measurement.
    activation_mb_512=8000.0, reference_width=3072.0 * 57, width=WIDTH, checkpointing_keeps=0.12,
    params=13.7e9, lora_params_per_rank=2.8e6)

CARDS = (CHROMA,)
