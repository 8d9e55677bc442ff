"""Video LoRA (the families whose card has ``media="video"``: Wan) with diffusers + peft: the
image program with clips for images, captions encoded once, and the memory levers.

What differs from ``ImageProgram``: the data (``video_data``: clips decoded with PyAV, bucketed,
``pixel_values`` of (3, frames, H, W)); the text encoder, which encodes every distinct caption
once in ``load``, before the transformer comes to the card, and then leaves it
(``cache_text_encoder_outputs``, on by default for video); the frozen transformer and the text
encoder stored in fp8 (``quantize_base: fp8``: diffusers' layerwise casting, the LoRA kept out of
it) and its last
``blocks_to_swap`` blocks kept on the host (diffusers' group offloading, leaf by leaf). Latent
caching, the loop, the LoRA and both exports are the image program's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_farm.errors import DatasetError
from lora_farm.jobs.clips import VIDEO_SUFFIXES, FrameRule
from lora_farm.jobs.datasets import find_examples
from lora_farm.jobs.spec import VideoJobSpec
from lora_farm.trainers import image_samples
from lora_farm.trainers.image import ImageProgram
from lora_farm.trainers.video_data import VideoDataset, bucketed_epoch_order, checked_clips

FP8 = "float8_e4m3fn"


class VideoProgram(ImageProgram):
    """Train a LoRA on a video model's transformer."""

    spec: VideoJobSpec

    def __init__(self, spec: VideoJobSpec, job_dir: Path, device: torch.device, dtype: torch.dtype):
        super().__init__(spec, job_dir, device, dtype)
        self._mode = "none"  # quantize_base as it takes effect here
        self.dataset: VideoDataset | None = None  # type: ignore[assignment]

    # -- data -------------------------------------------------------------------------------

    def check_data(self) -> None:
        """Every clip exists, decodes as far as its sample reaches, and has a caption."""
        spec = self.spec
        examples = find_examples(spec.train_data_dir, spec.metadata_path, spec.caption_extension, media="video")
        if not examples:
            raise DatasetError(f"{spec.train_data_dir}: no training clips found (no metadata.csv rows, no "
                               f"{'/'.join(VIDEO_SUFFIXES)} files or folders of frames). Fix: add clips and captions.")
        rule = FrameRule.of_spec(spec)
        clips, problems = checked_clips(examples, rule, spec.frame_sizes)
        if problems:
            raise DatasetError(f"{len(problems)} problem(s) in the training clips under "
                               f"{spec.metadata_path or spec.train_data_dir}:\n  " + "\n  ".join(problems[:20]))
        self.dataset = VideoDataset(clips, rule, spec.center_crop, spec.seed)

    def _order_of(self, epoch: int) -> list[list[tuple[int, bool, int]]]:
        assert self.dataset is not None
        buckets = [clip.bucket for clip in self.dataset.clips]
        return bucketed_epoch_order(buckets, self.spec.batch_size, self.spec.seed, epoch, self.spec.random_flip)

    # -- placement: what goes to the card, in which form --------------------------------------

    def _pick_denoiser(self) -> None:
        if self.spec.expert is not None:
            self._select_expert(self.spec.expert)

    def _select_expert(self, expert: str) -> None:
        """A two-expert model trains the one the spec names; every expert stays frozen, the
        other one on the host."""
        assert self.model is not None
        folders = self.model.card.experts
        for folder in folders.values():
            getattr(self.model.pipeline, folder).requires_grad_(False)
        self.model.denoiser = getattr(self.model.pipeline, folders[expert])
        self.notes.append(f"expert: {expert} ({folders[expert]})")

    def quantization(self) -> str:
        """``quantize_base: fp8`` is diffusers' layerwise casting here (validation refuses nf4)."""
        self._mode = super().quantization()
        return self._mode

    def _encoders_to_device(self, mode: str) -> None:
        assert self.model is not None
        if mode == "fp8":
            self._text_encoder_in_fp8()
        for encoder in self.model.text_encoders:
            encoder.to(self.device)
        self.model.vae.to(self.device)

    def _denoiser_to_device(self, mode: str) -> None:
        """The transformer waits on the host for its LoRA (``load`` below)."""

    def load(self) -> None:
        """The LoRA added on the host; the captions encoded while the transformer is still
        there (the text encoder and the transformer never share the card); then the
        transformer goes to the card in the form the levers say."""
        super().load()
        assert self.model is not None
        denoiser = self.model.denoiser
        if self._mode == "fp8":
            self._store_in_fp8(denoiser)
        swapped = self._swapped_blocks(denoiser)
        for name, child in denoiser.named_children():
            if name != "blocks":
                child.to(self.device)
        for block in denoiser.blocks[:len(denoiser.blocks) - len(swapped)]:
            block.to(self.device)
        for param in denoiser.parameters(recurse=False):
            param.data = param.data.to(self.device)
        if swapped:
            self._swap(swapped)

    def _store_in_fp8(self, denoiser: Any) -> None:
        """diffusers' layerwise casting: each frozen layer's weight stored in fp8 and cast to the
        compute dtype for its forward. The LoRA layers (``lora_``) stay out: they train in fp32."""
        skip = tuple(getattr(denoiser, "_skip_layerwise_casting_patterns", None) or ()) + ("lora_",)
        denoiser.enable_layerwise_casting(storage_dtype=getattr(torch, FP8), compute_dtype=self.dtype,
                                          skip_modules_pattern=skip)
        self.notes.append("quantize_base fp8: the frozen transformer is stored in float8_e4m3fn")

    def _text_encoder_in_fp8(self) -> None:
        """The same casting for the text encoders' Linear layers; norms, embeddings and T5's
        feed-forward output (``wo``, whose weight dtype T5 casts its hidden states to) are kept."""
        from diffusers.hooks import apply_layerwise_casting

        assert self.model is not None
        for encoder in self.model.text_encoders:
            apply_layerwise_casting(encoder, storage_dtype=getattr(torch, FP8), compute_dtype=self.dtype,
                                    skip_modules_pattern=("norm", r"\.wo$"),
                                    skip_modules_classes=(torch.nn.Embedding,))
        self.notes.append("quantize_base fp8: the text encoder is stored in float8_e4m3fn")

    def _swapped_blocks(self, denoiser: Any) -> list[Any]:
        count = min(self.spec.blocks_to_swap, len(denoiser.blocks))
        return list(denoiser.blocks[len(denoiser.blocks) - count:]) if count else []

    def _swap(self, blocks: list[Any]) -> None:
        """Each swapped block's leaves stay on the host and come to the card for their forward
        (diffusers' group offloading); with gradient checkpointing the recompute before the
        backward brings them again. On the CPU nothing moves; the hooks run all the same."""
        from diffusers.hooks import apply_group_offloading

        host = torch.device("cpu")
        for block in blocks:
            apply_group_offloading(block, onload_device=self.device, offload_device=host,
                                   offload_type="leaf_level", use_stream=self.device.type == "cuda")
        self.notes.append(f"blocks_to_swap: the last {len(blocks)} transformer blocks stay on the host")

    # -- samples: short clips ------------------------------------------------------------------

    def sample_frames(self) -> int:
        """A few frames: at most the VAE's temporal step x 4 + 1 (17 for Wan), never more than trained."""
        assert self.model is not None
        return min(self.spec.num_frames, 4 * self.model.card.temporal_compression + 1)

    def sample_defaults(self) -> dict[str, Any]:
        width, height = self.spec.frame_sizes[0]
        return {**super().sample_defaults(), "width": width, "height": height}

    def render_sample(self, prompt: dict[str, Any]) -> Any:
        return image_samples.render(self, self.sample_pipeline(), prompt, num_frames=self.sample_frames())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cached_captions": len(self.caption_cache or {}),
                "buckets": sorted({f"{w}x{h}" for w, h in (c.bucket for c in self.dataset.clips)})
                if self.dataset else []}
