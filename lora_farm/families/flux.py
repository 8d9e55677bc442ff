"""Flux.1 dev and schnell (Black Forest Labs): a 12B rectified-flow transformer (19 double-stream
+ 38 single-stream blocks, width 3072), CLIP-L pooled + T5-XXL sequence conditioning, a 16-channel
VAE whose latents are packed 2x2 into tokens. dev is guidance-distilled (a guidance input);
schnell is timestep-distilled (no guidance, static shift, shorter T5 prompts)."""

from __future__ import annotations

from lora_farm.families.card import Family, TextEncoder, attention_width, file_has_guidance, names_tensor

TRANSFORMER = "FluxTransformer2DModel"
# diffusers' recommended Flux LoRA layers (train_dreambooth_lora_flux.py): attention of both
# streams and the double blocks' feed-forwards. Single blocks' q/k/v export as the fused linear1.
LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2")
FILE_BLOCK = "double_blocks.0.img_attn.qkv.weight"  # BFL's (and ComfyUI's, prefixed) layout
WIDTH = attention_width("num_layers", "num_single_layers")  # double + single blocks


def _card(name: str, title: str, guidance: bool, t5_length: int, sample_steps: int) -> Family:
    return Family(
        name=name, title=title, denoiser="transformer",
        components=("transformer", "vae", "text_encoder", "text_encoder_2"),
        text_encoders=(TextEncoder("text_encoder", "tokenizer", "clip", 77),
                       TextEncoder("text_encoder_2", "tokenizer_2", "t5", t5_length)),
        objective="flow", lora_targets=LORA_TARGETS,
        kohya_metadata={"ss_base_model_version": "flux1", "ss_v2": "False"},
        modelspec_architecture=f"{name.replace('flux', 'flux-1')}/lora",
        adapter="lora_farm.trainers.families.flux:FluxAdapter",
        matches_folder=lambda index, config, folders: (config.get("_class_name") == TRANSFORMER
                                                       and bool(config.get("guidance_embeds")) == guidance),
        matches_file=lambda header: names_tensor(header, FILE_BLOCK) and file_has_guidance(header) == guidance,
        loads_single_file=False,
        trains_text_encoders=False,
        # one 512 px sample (1024 latent tokens + 512 text tokens) through 57 blocks of width
        # 3072 keeps ~20 tensors of tokens x width per block in bf16: ~8 GB; checkpointing keeps
        # each block's input plus one block's recompute (~12%): ~3.8 GB at 1024 px. With the
        # weights read from the headers (transformer 23.8 GB + T5-XXL 9.5 GB in bf16) a 1024 px
        # bf16 rank-16 job estimates ~36 GiB, in line with the published anchor: Flux.1-dev LoRA
        # at 1024 px fits a 24 GB card only with an 8-bit base (ai-toolkit's qfloat8: 12 GB of
        # transformer + activations + LoRA). A derivation, not a measurement: calibration
        # corrects it from real peaks.
        activation_mb_512=8000.0, reference_width=3072.0 * 57, width=WIDTH, checkpointing_keeps=0.12,
        params=16.9e9, lora_params_per_rank=2.8e6,
        sample_steps=sample_steps, sample_guidance=3.5 if guidance else 0.0)


FLUX_DEV = _card("flux-dev", "Flux.1 dev", guidance=True, t5_length=512, sample_steps=28)
FLUX_SCHNELL = _card("flux-schnell", "Flux.1 schnell", guidance=False, t5_length=256, sample_steps=4)

CARDS = (FLUX_DEV, FLUX_SCHNELL)
