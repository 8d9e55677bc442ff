"""Chroma with torch: Flux.1's objective and BFL single-file layout without CLIP or guidance.

Captions go through the pipeline's own ``encode_prompt``: T5 with its attention mask, and a mask
that keeps every caption token and the first pad (Chroma's rule) for the transformer, extended over
the image tokens by the pipeline's own ``_prepare_attention_mask``. The mask is given as booleans,
so the padding is really left out of the attention, as Chroma's reference trainer and ComfyUI do:
diffusers 0.42.1's ``ChromaPipeline`` passes it as 0.0/1.0 floats, which scaled-dot-product
attention adds to the scores instead of masking (huggingface/diffusers#12116), so its own
inference still sees the padding. The transformer masks query x key, so a padded caption token
attends to nothing: on the CPU its row comes out finite and changes nothing (tests/test_chroma.py);
not checked on a GPU here, where older memory-efficient SDPA kernels gave NaN for such rows
(pytorch/pytorch#110213) -- a NaN loss would stop the job. Flow matching on 2x2-packed latents
with Flux's logit-normal sigmas and the scheduler config's shift; the LoRA loads through
``FluxLoraLoaderMixin`` (ChromaPipeline's), which reads the diffusers file and the BFL/kohya
single file (``flux_layout``: Chroma's blocks are Flux's, only their modulation linears are
pruned, so no file names them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lora_farm.trainers.families import join_encoded
from lora_farm.trainers.families.flux import FluxAdapter
from lora_farm.trainers.image_model import ImageModel

if TYPE_CHECKING:
    from lora_farm.trainers.image import ImageProgram


class ChromaAdapter(FluxAdapter):
    """Flux's sigmas, noising, LoRA loading and single file are shared; the conditioning is Chroma's."""

    def pipeline_class(self) -> Any:
        from diffusers import ChromaPipeline

        return ChromaPipeline

    def predict(self, program: ImageProgram, latents: torch.Tensor, batch: dict[str, Any],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow matching: x_t = (1 - t) x0 + t noise, the transformer predicts noise - x0."""
        model = program.model
        assert model is not None
        pipe, dtype, device = model.pipeline, program.dtype, program.device
        count, channels, height, width = latents.shape
        noise, sigmas, noisy = self.noised(model, latents, generator)
        prompt, mask, text_ids = program.encoded(list(batch["caption"]))
        packed = pipe._pack_latents(noisy, count, channels, height, width).to(dtype)
        image_ids = pipe._prepare_latent_image_ids(count, height // 2, width // 2, device, dtype)
        attention_mask = pipe._prepare_attention_mask(count, packed.shape[1], dtype, mask.bool())
        output = model.denoiser(hidden_states=packed, timestep=sigmas.to(dtype), encoder_hidden_states=prompt.to(dtype),
                                txt_ids=text_ids, img_ids=image_ids, attention_mask=attention_mask,
                                return_dict=False)[0]
        pixels = pipe.vae_scale_factor
        prediction = pipe._unpack_latents(output, height * pixels, width * pixels, pixels)
        return prediction, noise - latents

    def encode(self, model: ImageModel, captions: list[str],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(T5 sequence, text mask, text ids)``, padded to the card's T5 length (or the
        tokenizer's, where it is shorter) as the pipeline pads them."""
        length = min(self.card.text_encoders[0].max_length, model.tokenizers[0].model_max_length)
        with torch.no_grad():  # the text encoder stays frozen (the card trains the transformer only)
            prompt, text_ids, mask, *_ = model.pipeline.encode_prompt(
                prompt=captions, device=device, do_classifier_free_guidance=False, max_sequence_length=length)
        return prompt, mask, text_ids

    def collate(self, encoded: list[Any], device: torch.device) -> Any:
        """Every caption is padded to the same length: sequences and masks join along the
        batch; the text ids are per token, shared."""
        prompts, masks = join_encoded([item[:2] for item in encoded], device)
        return prompts, masks, encoded[0][2].to(device)
