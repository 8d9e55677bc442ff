"""Each image family's VRAM estimate at real sizes next to the published figure it is checked against.

    .venv/bin/python bench/estimate_table.py

The real sizes come from header-only safetensors folders (tests/fake_headers.py: the real
parameter counts and LoRA-target shapes, no data), read by the farm's own estimate
(lora_farm.scheduler.estimate) exactly as `lorafarm validate` reads a real base model. Every row:
1024 px (SD 1.5 also at 512 px, its anchor's size), rank 16, batch 1, bf16, with and without
gradient checkpointing.

Columns: bf16 with and without gradient checkpointing; then, checkpointed, each `quantize_base`
(fp8, nf4: the denoiser's and the T5/Qwen text encoders' linear weights at 1 / ~0.52 bytes),
fp8 with `cache_text_encoder_outputs` (the text encoders leave the card before the denoiser
loads), and what `quantize_base: auto` picks for a 24 GiB card (its usable share after the
policy's headroom) -- all computed by the estimate itself.
Prints figures only; the assertions on these estimates live in the family tests.

The second table: Wan 2.1 T2V 1.3B and 14B (video), 480p (832x480) and 720p (1280x720), 33 and
81 frames, rank 16, batch 1, bf16, from no lever to all of them (implemented, not derived):
gradient checkpointing, then `quantize_base: fp8` (the frozen transformer and UMT5 in fp8), then
`blocks_to_swap` (half the blocks on the host). Captions are cached (the video default), so the text encoder and the
transformer never share the card: the weights are the larger of the two plus the VAE.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_farm.jobs.spec import ImageJobSpec, VideoJobSpec  # noqa: E402
from lora_farm.scheduler.estimate import choose_quantization, estimate_vram  # noqa: E402
from lora_farm.scheduler.policy import Policy  # noqa: E402
from tests import fake_headers as fh  # noqa: E402

GIB = 1024.0
# family, how its real-sized folder is written, resolution, the published figure checked against
ROWS = [
    ("sd1", fh.sd15_headers, 512, "SD 1.5 LoRA at 512 px, fp16, batch 1, no checkpointing: ~6 GB all-in"),
    ("sd1", fh.sd15_headers, 1024, "(no anchor at 1024 px; 4x the 512 px activations)"),
    ("sdxl", fh.sdxl_headers, 1024, "SDXL LoRA at 1024 px, fp16, batch 1: ~18 GB"),
    ("flux-dev", fh.flux_dev_headers, 1024,
     "Flux.1-dev LoRA at 1024 px fits 24 GB only with an 8-bit base (ai-toolkit qfloat8)"),
    ("sd35-large", fh.sd35_large_headers, 1024,
     "SD3.5 Large LoRA fits 24 GB with a 4-bit NF4 base (huggingface.co/blog/sd3-5)"),
    ("qwen-image", fh.qwen_image_headers, 1024,
     "Qwen-Image-Edit LoRA at 1024 px: ~40 GB at batch 1 with an 8-bit base"),
    ("chroma", fh.chroma_headers, 1024,
     "Chroma LoRA at 1024 px on 24 GB cards with an 8-bit transformer (ai-toolkit qfloat8)"),
    ("flux2-klein", fh.flux2_klein_headers, 1024,
     "FLUX.2 klein 4B: a consumer-card model (~13 GB for inference, BFL's announcement)"),
    ("flux2-dev", fh.flux2_dev_headers, 1024,
     "FLUX.2 dev LoRA from 24 GB cards (quantized, text encoder cached) to H100/H200 (ai-toolkit guide)"),
    ("z-image", fh.zimage_headers, 1024,
     "Z-Image LoRA 8-bit base on 16 GB (ai-toolkit guide) to 32 GB (rank 128, batch 2)"),
]


CARD_24_GIB = 24 * 1024 * (1 - Policy().headroom)  # the default policy's headroom


def spec_for(folder: Path, resolution: int, **fields) -> ImageJobSpec:
    settings = dict(resolution=resolution, lora_rank=16, batch_size=1, mixed_precision="bf16",
                    gradient_checkpointing=True) | fields
    return ImageJobSpec(name="bench", base_model=folder, train_data_dir=folder,  # no data is read
                        **settings)


def row(family: str, folder: Path, resolution: int) -> list[str]:
    checkpointed = estimate_vram(spec_for(folder, resolution))
    totals = [estimate_vram(spec_for(folder, resolution, **fields)).total_mb for fields in (
        {}, {"gradient_checkpointing": False}, {"quantize_base": "fp8"}, {"quantize_base": "nf4"},
        {"quantize_base": "fp8", "cache_text_encoder_outputs": True})]
    parts = checkpointed.parts
    auto = choose_quantization(spec_for(folder, resolution, quantize_base="auto"), CARD_24_GIB)
    figures = [parts["frozen_weights"], parts["activations"], *totals]
    return [family, f"{resolution}", f"{parts['lora_params'] / GIB:.2f}"] + [f"{mb / GIB:.1f}" for mb in figures] + [auto]


HEADER = ["family", "px", "lora", "frozen", "act", "bf16 ckpt", "bf16 no-ckpt", "fp8 ckpt", "nf4 ckpt",
          "fp8+cached TE", "auto@24G"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built: dict[str, Path] = {}
        table, anchors = [], []
        for family, write, resolution, anchor in ROWS:
            if family not in built:
                built[family] = write(root / family)
            table.append(row(family, built[family], resolution))
            anchors.append(f"{family} @ {resolution} px: {anchor}")
    widths = [max(len(r[i]) for r in [HEADER] + table) for i in range(len(HEADER))]
    print("VRAM estimate in GiB (lora_farm.scheduler.estimate), rank 16, batch 1, bf16 weights;")
    print("lora / frozen / act: the parts with gradient checkpointing on (CUDA context 0.5 GiB not shown);")
    print("fp8 / nf4: quantize_base; cached TE: cache_text_encoder_outputs; auto@24G: what")
    print(f"quantize_base: auto picks for a 24 GiB card ({CARD_24_GIB / GIB:.1f} GiB usable)\n")
    for line in [HEADER] + table:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    print("\nchecked against:")
    for line in anchors:
        print("  " + line)


WAN_LEVERS = [("none", {}), ("ckpt", {"gradient_checkpointing": True}),
              ("ckpt+fp8", {"gradient_checkpointing": True, "quantize_base": "fp8"}),
              ("ckpt+fp8+swap", {"gradient_checkpointing": True, "quantize_base": "fp8", "blocks_to_swap": "half"})]
WAN_HEADER = ["model", "size", "frames", "lora", "act ckpt"] + [f"{name}" for name, _ in WAN_LEVERS] + ["host RAM"]
WAN_ANCHOR = ("Wan 14B video LoRA with musubi-tuner's fp8 base + block swap: 24 GB cards (users' reports: "
              "'24G VRAM is sufficient for video training', clips of at most 81 frames at 16 fps on an RTX 3090)")


def wan_estimate(folder: Path, bucket: str, frames: int, levers: dict):
    blocks = {"1.3B": 30, "14B": 40}[folder.name]
    levers = {k: blocks // 2 if v == "half" else v for k, v in levers.items()}
    spec = VideoJobSpec(name="bench", base_model=folder, train_data_dir=folder, buckets=[bucket],
                        num_frames=frames, lora_rank=16, batch_size=1, mixed_precision="bf16", **levers)
    return spec, estimate_vram(spec)


def wan_rows(root: Path) -> list[list[str]]:
    from lora_farm.scheduler.host_ram import estimate_host_ram

    table = []
    for size in ("1.3B", "14B"):
        folder = fh.wan21_headers(root / size, size)
        for bucket in ("832x480", "1280x720"):
            for frames in (33, 81):
                runs = [wan_estimate(folder, bucket, frames, levers) for _, levers in WAN_LEVERS]
                spec, checkpointed = runs[1]
                host = estimate_host_ram(runs[-1][0])
                table.append([f"Wan 2.1 {size}", bucket, str(frames), f"{checkpointed.parts['lora_params'] / GIB:.2f}",
                              f"{checkpointed.parts['activations'] / GIB:.1f}"]
                             + [f"{estimate.total_mb / GIB:.1f}" for _, estimate in runs] + [f"{host.total_mb / GIB:.1f}"])
    return table


def print_table(header: list[str], table: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header] + table) for i in range(len(header))]
    for line in [header] + table:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def main_video() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        table = wan_rows(Path(tmp))
    print("\nWan 2.1 T2V: VRAM estimate in GiB by memory lever (rank 16, batch 1, bf16, captions cached);")
    print("lora / act ckpt: parts with checkpointing; swap: half the blocks (15 of 30, 20 of 40) on the host;")
    print("host RAM: the estimate with every lever (the base as stored, loaded before casting)\n")
    print_table(WAN_HEADER, table)
    print(f"\nchecked against:\n  {WAN_ANCHOR}")


if __name__ == "__main__":
    main()
    main_video()
