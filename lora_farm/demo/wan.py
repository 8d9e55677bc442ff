"""A tiny Wan 2.1 text-to-video pipeline with random weights, and tiny clips, built offline.

The real layout at tiny widths: a ``WanTransformer3DModel`` (2 blocks of 2 heads x 16, 1x2x2
patches, self-attention, cross-attention to the caption, a feed-forward; rope axes 8+4+4 = the
head width), the Wan 3D causal ``AutoencoderKLWan`` (16 latent channels, 8x spatial and 4x
temporal downsampling, Wan 2.1's latents_mean/latents_std), a tiny ``UMT5EncoderModel`` with a
T5 tokenizer learned from the demo corpus, and the ``UniPCMultistepScheduler`` of Wan's
diffusers folders (flow prediction, flow_shift 3.0: the 480p shift).

The clips are coloured shapes moving across a background, encoded with PyAV (FFmpeg's MPEG-4
Part 2 encoder, in every PyAV wheel), captioned with what moves where, as ``metadata.csv`` or
sidecar ``.txt`` files; ``frame_folder=True`` writes one clip as a folder of PNG frames.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from lora_farm.demo.datasets import BACKGROUNDS, COLOURS, SHAPES, _draw_shape, write_captions
from lora_farm.demo.flux import t5_encoder, t5_tokenizer
from lora_farm.demo.vocab import save_pipeline

TEXT_HIDDEN = 32
SCHEDULER = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "num_train_timesteps": 1000,
             "flow_shift": 3.0}
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
CLIP_FPS = 8
CLIP_CODEC = "mpeg4"
# base_dim 8 (real: 96); the real dim_mult and temporal flags (Qwen-Image's VAE is Wan's too)
WAN_VAE_LAYOUT = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                  "temperal_downsample": [False, True, True]}


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**WAN_VAE_LAYOUT)  # Wan 2.1's latent statistics (the defaults)


def _transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                 in_channels=16, out_channels=16, text_dim=TEXT_HIDDEN, freq_dim=32,
                                 ffn_dim=64, num_layers=2, rope_max_seq_len=256)


def build_tiny_wan(path: Path, seed: int = 0, experts: bool = False) -> Path:
    """Save a tiny ``WanPipeline`` folder to ``path``; ``experts``: Wan 2.2 A14B's layout, a
    second transformer (the low-noise expert) and T2V's boundary_ratio 0.875."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer, TEXT_HIDDEN, umt5=True),
                       vae=_vae(), scheduler=UniPCMultistepScheduler(**SCHEDULER), transformer=_transformer(),
                       transformer_2=_transformer() if experts else None,
                       boundary_ratio=0.875 if experts else None)
    return save_pipeline(pipe, path)


# -- clips --------------------------------------------------------------------------------------

def _clip_frames(shape: str, colour: str, background: str, direction: str, size: tuple[int, int],
                 count: int) -> list:
    from PIL import Image, ImageDraw

    width, height = size
    side = min(width, height) // 3
    frames = []
    for index in range(count):
        progress = index / max(count - 1, 1)
        along = {"left to right": (progress, 0.5), "right to left": (1 - progress, 0.5),
                 "top to bottom": (0.5, progress), "bottom to top": (0.5, 1 - progress)}[direction]
        left = round(along[0] * (width - side))
        top = round(along[1] * (height - side))
        image = Image.new("RGB", size, BACKGROUNDS[background])
        _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + side, top + side), COLOURS[colour])
        frames.append(image)
    return frames


def write_clip(path: Path, frames: list, fps: int = CLIP_FPS) -> Path:
    """Encode PIL frames as a video file (MPEG-4 Part 2 in .mp4/.mov/.mkv, VP9 in .webm, GIF)."""
    import av

    codec = {".gif": "gif", ".webm": "libvpx-vp9"}.get(path.suffix, CLIP_CODEC)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if codec == CLIP_CODEC:
            stream.options = {"qscale": "2"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_clip_dataset(folder: Path, n: int = 4, frames: int = 12, size: tuple[int, int] = (64, 48),
                       captions: Literal["metadata", "sidecar"] = "metadata", frame_folder: bool = False,
                       seed: int = 0) -> Path:
    """``n`` captioned clips of ``frames`` frames at ``size`` (width, height); the last one a
    folder of PNG frames when ``frame_folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        shape, direction = SHAPES[index % len(SHAPES)], DIRECTIONS[index % len(DIRECTIONS)]
        colour, background = rng.choice(sorted(COLOURS)), rng.choice(sorted(BACKGROUNDS))
        caption = f"a {colour} {shape} moving {direction} on a {background} background"
        images = _clip_frames(shape, colour, background, direction, size, frames)
        if frame_folder and index == n - 1:
            name = f"clip_{index:02d}_frames"
            (folder / name).mkdir(exist_ok=True)
            for number, image in enumerate(images):
                image.save(folder / name / f"{number:04d}.png")
        else:
            name = f"clip_{index:02d}.mp4"
            write_clip(folder / name, images)
        rows.append((name, caption))
    return write_captions(folder, rows, captions)
