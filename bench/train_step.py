"""Seconds per training step and the time of each phase, for an image and an LLM LoRA job.

    .venv/bin/python bench/train_step.py              # CPU: the tiny demo models (seconds)
    .venv/bin/python bench/train_step.py --only image --resolution 512   # tiny models, 512 px
    .venv/bin/python bench/train_step.py --only flux --resolution 128    # tiny Flux.1-dev
    .venv/bin/python bench/train_step.py --only zimage                   # tiny Z-Image
    .venv/bin/python bench/train_step.py --only sd3 --resolution 128     # tiny SD3.5 Medium
    .venv/bin/python bench/train_step.py --real       # GPU: SD 1.5-sized UNet, 512 px, batch 4,
                                                      # rank 16; a ~1.1B Llama (TinyLlama shape)

Real-sized models are built from their public configs with random weights (no hub here), saved
once under --workdir and reused. Steps run through the real runtime (events, checkpoints off);
the steady-state s/step comes from the progress events after the first one (warm-up excluded).
Prints figures only; nothing here is an assertion.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_farm.jobs.spec import spec_from_dict  # noqa: E402
from lora_farm.protocol import EventWriter, read_events  # noqa: E402


def build_real_sd(path: Path) -> Path:
    """An SD 1.5-shaped pipeline (UNet 860M, VAE, CLIP ViT-L text encoder), random fp16 weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_farm.demo.vocab import (
        CLIP_BOS,
        CLIP_EOS,
        clip_tokenizer,
        write_clip_vocab_files,
    )

    if (path / "model_index.json").exists():
        return path
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768, bos_token_id=tokenizer.convert_tokens_to_ids(CLIP_BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(CLIP_EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(CLIP_EOS)))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(torch.float16)
    pipe.save_pretrained(path)
    write_clip_vocab_files(path / "tokenizer")
    return path


def build_real_llm(path: Path) -> Path:
    """A TinyLlama-1.1B-shaped causal LM (22 layers, 2048 wide, GQA 32/4), random bf16 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_farm.demo.vocab import build_llm_tokenizer

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    tokenizer = build_llm_tokenizer()
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_long_texts(path: Path, n: int, sentences: int) -> Path:
    """``n`` jsonl records, each ``sentences`` demo sentences long (fills max_seq_len)."""
    from lora_farm.demo.datasets import _text_record

    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(_text_record(rng) for _ in range(sentences))})
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def job_specs(workdir: Path, real: bool, steps: int, resolution: int = 64) -> list[dict[str, Any]]:
    from lora_farm import demo

    common = {"max_steps": steps, "save_steps": 10 * steps, "seed": 0}
    if real:
        image_model, llm_model = build_real_sd(workdir / "sd15"), build_real_llm(workdir / "llama-1b")
        images = demo.write_image_dataset(workdir / "images-512", n=16, size=512)
        texts = write_long_texts(workdir / "texts.jsonl", 64, 40)
        image = {"resolution": 512, "batch_size": 4, "lora_rank": 16}
        llm = {"max_seq_len": 512, "batch_size": 4, "lora_rank": 16}
        flux_model = zimage_model = sd3_model = None  # real-sized ones need their own bench (no 8-bit base yet)
    else:
        image_model, llm_model = demo.build_tiny_sd(workdir / "tiny-sd"), demo.build_tiny_llm(workdir / "tiny-llm")
        images = demo.write_image_dataset(workdir / "images", n=8, size=resolution)
        texts = demo.write_text_dataset(workdir / "texts.jsonl", 32, "jsonl")
        image = {"resolution": resolution, "batch_size": 2, "lora_rank": 4}
        llm = {"max_seq_len": 64, "batch_size": 4, "lora_rank": 8}
        flux_model = demo.build_tiny_flux(workdir / "tiny-flux-dev")
        zimage_model = demo.build_tiny_zimage(workdir / "tiny-z-image")
        sd3_model = demo.build_tiny_sd3(workdir / "tiny-sd35-medium")
    flows = [{"name": f"bench-{name}", "task": "image", "base_model": str(model), "train_data_dir": str(images),
              **common, **image} for name, model in (("flux", flux_model), ("zimage", zimage_model),
                                                     ("sd3", sd3_model)) if model]
    return flows + [
        {"name": "bench-image", "task": "image", "base_model": str(image_model),
         "train_data_dir": str(images), **common, **image},
        {"name": "bench-llm", "task": "llm", "base_model": str(llm_model),
         "train_data_dir": str(texts), **common, **llm},
    ]


def bench_one(data: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one spec through the real runtime; return the figures."""
    from lora_farm.trainers.device import choose_device, choose_precision, device_label
    from lora_farm.trainers.entry import _program_class
    from lora_farm.trainers.runtime import Runtime

    spec = spec_from_dict(data)
    job_dir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=workdir))
    device = choose_device()
    precision = choose_precision(spec.mixed_precision, device)
    program = _program_class(spec.task)(spec, job_dir, device, precision.weight_dtype)
    events_path = job_dir / "events.jsonl"
    summary = Runtime(program, EventWriter(events_path), precision, out=io.StringIO(),
                      progress_interval=0.0).run()
    progress = [e for e in read_events(events_path) if e["event"] == "progress"]
    first, last = progress[0], progress[-1]
    steady = (last["time"] - first["time"]) / max(last["step"] - first["step"], 1)
    return {"job": spec.name, "device": device_label(device), "precision": precision.name,
            "steps": summary["steps"], "s_per_step": round(steady, 4),
            "it_s": round(1 / steady, 2) if steady > 0 else None,
            "phase_seconds": summary["phase_seconds"], "peak_vram_mb": summary["peak_vram_mb"],
            "trainable_params": summary.get("trainable_parameters"), "final_loss": summary["final_loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--real", action="store_true", help="real-sized models (needs a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (20 tiny, 30 real)")
    parser.add_argument("--resolution", type=int, default=64, help="image size of the tiny job (px)")
    parser.add_argument("--only", choices=["image", "flux", "zimage", "sd3", "llm"], help="bench one job only")
    parser.add_argument("--workdir", type=Path, default=None, help="models + runs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.real:
        import torch

        if not torch.cuda.is_available():
            parser.error("--real needs a CUDA GPU (the models are SD 1.5 / 1.1B Llama sized)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorafarm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (30 if args.real else 20)
    results = []
    for data in job_specs(workdir, args.real, steps, args.resolution):
        if args.only and data["name"] != f"bench-{args.only}":
            continue
        result = bench_one(data, workdir)
        results.append(result)
        print(f"{result['job']:<12} {result['device']} {result['precision']}: "
              f"{result['s_per_step']:.4f} s/step ({result['it_s']} it/s), "
              f"peak VRAM {result['peak_vram_mb']} MiB, phases {result['phase_seconds']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
