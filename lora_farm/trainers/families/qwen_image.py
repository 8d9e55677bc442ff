"""Qwen-Image with torch: the pipeline's own ``encode_prompt`` (Qwen2.5-VL's last hidden states
of the chat template, its system prefix dropped, with the padding mask), the 3D VAE on single
frames with its per-channel latents_mean/latents_std, 2x2 packing through the pipeline's static
helpers, and flow matching with Flux's logit-normal t and the scheduler's dynamic (exponential)
shift, as diffusers' train_dreambooth_lora_qwen_image.py and musubi-tuner sample it.

The single file is the layout ComfyUI and musubi-tuner exchange for Qwen-Image: diffusers'
module names under ``diffusion_model.`` with ``lora_A`` / ``lora_B`` and an ``alpha`` per module
(``diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight``). Qwen-Image has no fused
projections in either naming, so the file is the trained LoRA itself, key for key: ComfyUI maps
``diffusion_model.<module>`` to its weight directly, and diffusers' loader strips the prefix and
folds alpha/rank into the weights (``_convert_non_diffusers_qwen_lora_to_diffusers``). kohya's
flattened ``lora_unet_transformer_blocks_0_attn_to_q`` names (musubi's training output) load too,
but diffusers must rebuild the dots from a list of protected words; the dotted names need nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lora_farm.trainers.families.flux import FluxAdapter
from lora_farm.trainers.image_model import ImageModel

if TYPE_CHECKING:
    from lora_farm.trainers.image import ImageProgram

PREFIX = "diffusion_model."


class QwenImageAdapter(FluxAdapter):
    """Flux's timestep sampling (``sigmas``) and LoRA loading are shared; the rest is Qwen's."""

    def pipeline_class(self) -> Any:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    def sample_guidance(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """Qwen-Image guides by true CFG, which its pipeline applies only with a negative prompt."""
        return {"true_cfg_scale": prompt["guidance"], "negative_prompt": prompt["negative"] or " "}

    # -- latents: one frame of a video VAE ------------------------------------------------------

    def latent_distribution(self, vae: Any, pixels: torch.Tensor) -> Any:
        return vae.encode(pixels[:, :, None]).latent_dist  # (B, C, H, W) -> one frame (B, C, 1, H, W)

    def normalise(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Per-channel ``(z - mean) / std`` of the VAE config, the frame axis dropped."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        return ((latents - mean) / std)[:, :, 0]

    # -- the step -----------------------------------------------------------------------------

    def predict(self, program: ImageProgram, latents: torch.Tensor, batch: dict[str, Any],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow matching: x_t = (1 - t) x0 + t noise, the transformer predicts noise - x0."""
        model = program.model
        assert model is not None
        pipe, dtype = model.pipeline, program.dtype
        count, channels, height, width = latents.shape
        noise, sigmas, noisy = self.noised(model, latents, generator)
        prompt, mask = program.encoded(list(batch["caption"]))
        output = model.denoiser(hidden_states=pipe._pack_latents(noisy, count, channels, height, width).to(dtype),
                                timestep=sigmas.to(dtype), encoder_hidden_states=prompt.to(dtype),
                                encoder_hidden_states_mask=mask, img_shapes=[[(1, height // 2, width // 2)]] * count,
                                return_dict=False)[0]
        pixels = pipe.vae_scale_factor
        prediction = pipe._unpack_latents(output, height * pixels, width * pixels, pixels)[:, :, 0]
        return prediction, noise - latents

    def encode(self, model: ImageModel, captions: list[str],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden states, mask)``; the mask is None when no caption of the batch is padded."""
        with torch.no_grad():  # the text encoder stays frozen (the card trains the transformer only)
            return model.pipeline.encode_prompt(prompt=captions, device=device,
                                                max_sequence_length=self.card.text_encoders[0].max_length)

    def collate(self, encoded: list[tuple[torch.Tensor, torch.Tensor | None]],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each caption keeps its own length: pad to the longest with zeros and mask the padding,
        as ``encode_prompt`` does for a batch (no mask when nothing is padded)."""
        lengths = [hidden.shape[1] for hidden, _ in encoded]
        longest = max(lengths)
        if len(set(lengths)) == 1 and all(mask is None for _, mask in encoded):
            return torch.cat([hidden.to(device) for hidden, _ in encoded]), None
        hidden = torch.cat([F.pad(h, (0, 0, 0, longest - h.shape[1])).to(device) for h, _ in encoded])
        mask = torch.zeros(len(encoded), longest, dtype=torch.long, device=device)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        return hidden, mask

    # -- the single file ----------------------------------------------------------------------

    def kohya_state_dict(self, model: ImageModel, peft_states: dict[str, dict[str, torch.Tensor]],
                         alphas: dict[str, dict[str, tuple[int, float]]]) -> dict[str, torch.Tensor]:
        state, found = peft_states[self.card.denoiser], alphas[self.card.denoiser]
        tensors = {f"{PREFIX}{key}": value for key, value in state.items()}
        tensors |= {f"{PREFIX}{module}.alpha": torch.tensor(float(alpha)) for module, (_, alpha) in found.items()}
        return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}
