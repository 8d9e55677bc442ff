"""Wan 2.1 text-to-video through the family registry on a tiny offline model and PyAV clips: it
learns, resumes exactly from a checkpoint, exports both files (each reloaded through diffusers'
own loaders to the trained output), buckets and samples clips as the spec says, and runs with
the memory levers (fp8 base, swapped blocks, checkpointing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import ImageSequence

from lora_farm import demo
from lora_farm.jobs.clips import ClipError, FrameRule, sample_frames
from lora_farm.jobs.inspect import inspect_base_model
from lora_farm.jobs.spec import VideoJobSpec
from lora_farm.protocol import ExitCode
from lora_farm.trainers.video import VideoProgram
from lora_farm.trainers.quantize import FORCE_ON_CPU_ENV
from tests.family_checks import (CPU, PROMPTS, Stopping, check_diffusers_reload, check_exact_resume, check_learns,
                                 check_single_file_reload, exported, load_pipeline, read_safetensors)
from tests.fake_headers import write_header_only
from tests.test_families import validate
from tests.test_image_trainer import ready, run_trainer, train

pytestmark = pytest.mark.slow
FRAMES = 9  # 4k+1: 3 latent frames
BUCKET = "64x48"  # width x height: latents 8 x 6, 4 x 3 patches


class StoppingVideoProgram(Stopping, VideoProgram):
    pass


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    return demo.build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Four captioned clips of 12 frames at 64 x 48: three .mp4 files and a folder of PNG frames."""
    return demo.write_clip_dataset(tmp_path_factory.mktemp("clips") / "clips", frame_folder=True)


def make_video_program(tmp_path: Path, base: Path, data: Path, **fields) -> VideoProgram:
    settings = {"name": "clips", "num_frames": FRAMES, "buckets": [BUCKET], "lora_rank": 4, "batch_size": 2,
                "num_workers": 0, "seed": 7, **fields}
    return VideoProgram(VideoJobSpec(base_model=base, train_data_dir=data, **settings), tmp_path / "job",
                        CPU, torch.float32)


@pytest.fixture(scope="module")
def trained_wan(tmp_path_factory, tiny_wan, clips):
    """rank 4, alpha 8 on the card's targets; trained 3 steps with cached latents, exported."""
    program = ready(make_video_program(tmp_path_factory.mktemp("trained-wan"), tiny_wan, clips, lora_alpha=8,
                                       cache_latents=True))
    train(program, steps=3)
    return program, exported(program)


def transformer_output(pipe, transformer) -> torch.Tensor:
    """The transformer's prediction on fixed 5D latents, captions through the pipeline."""
    latents = torch.randn((2, 16, 3, 6, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        prompt, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=32,
                                       device=CPU)
        return transformer(hidden_states=latents, timestep=torch.tensor([300.0, 800.0]),
                           encoder_hidden_states=prompt, return_dict=False)[0]


def fresh_pipeline(base: Path, lora: Path | None = None):
    return load_pipeline("WanPipeline", base, lora)


# -- the tiny model and the clips ---------------------------------------------------------------

def test_the_tiny_model_has_the_real_layout(tiny_wan):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLWan"
    assert pipe.vae_scale_factor_temporal == 4 and pipe.vae_scale_factor_spatial == 8
    pixels = torch.rand(1, 3, FRAMES, 48, 64) * 2 - 1
    assert pipe.vae.encode(pixels).latent_dist.mean.shape == (1, 16, 3, 6, 8)  # (9 - 1) / 4 + 1 frames
    assert pipe.scheduler.config.flow_shift == 3.0 and pipe.scheduler.config.prediction_type == "flow_prediction"


def test_clips_decode_with_their_frame_rule(clips):
    every = sample_frames(clips / "clip_00.mp4", FrameRule(12))
    strided = sample_frames(clips / "clip_00.mp4", FrameRule(4, stride=3))
    assert [f.pts for f in strided] == [every[i].pts for i in (0, 3, 6, 9)]
    halved = sample_frames(clips / "clip_00.mp4", FrameRule(6, fps=4))  # the clips run at 8 fps
    assert [f.pts for f in halved] == [every[i].pts for i in (0, 2, 4, 6, 8, 10)]
    folder = sample_frames(clips / "clip_03_frames", FrameRule(6, stride=2))
    assert len(folder) == 6 and (folder[0].width, folder[0].height) == (64, 48)
    with pytest.raises(ClipError, match="no frame rate"):
        sample_frames(clips / "clip_03_frames", FrameRule(6, fps=4))
    with pytest.raises(ClipError, match="too few frames for 7 frames every 2"):
        sample_frames(clips / "clip_00.mp4", FrameRule(7, stride=2))


@pytest.mark.parametrize("suffix", [".webm", ".mov", ".gif"])
def test_each_container_decodes_to_the_frames_written(tmp_path, suffix):
    images = demo.wan._clip_frames("square", "blue", "white", "left to right", (64, 48), 6)
    clip = demo.wan.write_clip(tmp_path / f"clip{suffix}", images)
    frames = sample_frames(clip, FrameRule(6))
    assert [(f.width, f.height) for f in frames] == [(64, 48)] * 6
    def pixels(image) -> torch.Tensor:
        return torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).float()

    for index in (0, 5):  # lossy codecs (GIF: a 256-colour palette): the nearest written frame is its own
        decoded = pixels(frames[index].to_image())
        errors = [(decoded - pixels(image)).abs().mean().item() for image in images]
        assert min(range(len(images)), key=errors.__getitem__) == index and errors[index] < 20, errors


def test_clips_go_to_the_nearest_bucket_and_batches_keep_to_one(tmp_path, tiny_wan):
    wide = demo.write_clip_dataset(tmp_path / "data", n=3, size=(96, 48), seed=1)
    tall = demo.write_clip_dataset(tmp_path / "tall", n=2, size=(48, 96), seed=2)
    for index, clip in enumerate(sorted(tall.glob("*.mp4"))):  # one dataset, two aspect ratios
        clip.rename(wide / f"tall_{index}.mp4")
    with open(wide / "metadata.csv", "a", encoding="utf-8") as stream:
        stream.write("tall_0.mp4,a tall clip\ntall_1.mp4,another tall clip\n")
    program = make_video_program(tmp_path, tiny_wan, wide, buckets=["64x32", "32x64"], batch_size=2)
    program.check_data()
    assert [clip.bucket for clip in program.dataset.clips] == [(64, 32)] * 3 + [(32, 64)] * 2
    order = program._order_of(0)
    assert sorted(len(batch) for batch in order) == [1, 2, 2]  # 3 wide: 2 + 1; 2 tall: 2
    for batch in order:
        assert len({program.dataset.clips[index].bucket for index, _, _ in batch}) == 1
    pixels = program.dataset[(3, False, 0)]["pixel_values"]
    assert pixels.shape == (3, FRAMES, 64, 32) and -1 <= pixels.min() and pixels.max() <= 1


# -- learning -------------------------------------------------------------------------------

def test_training_lowers_a_fixed_evaluation_loss(tmp_path, tiny_wan, clips):
    program = ready(make_video_program(tmp_path, tiny_wan, clips, lora_alpha=4, cache_latents=True))
    assert program.model.family == "wan21" and sorted(program.adapted) == ["transformer"]
    assert len(program.caption_cache) == 4 and program.model.text_encoders[0].device.type == "cpu"
    check_learns(program, program.model.denoiser, steps=30)


def test_the_shift_is_the_schedulers_flow_shift(tmp_path, tiny_wan, clips):
    program = ready(make_video_program(tmp_path, tiny_wan, clips))
    got = program.adapter.sigmas(program.model, 256, torch.Generator().manual_seed(1))
    u = torch.rand(256, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(got, 3.0 * u / (1 + 2.0 * u))
    assert got.mean() > u.mean() + 0.15  # the shift moves t towards noise


def test_normalised_latents_invert_the_pipelines_decoding(tmp_path, tiny_wan, clips):
    """The adapter's (z - mean) / std is undone by the pipeline's ``latents / (1/std) + mean``."""
    program = ready(make_video_program(tmp_path, tiny_wan, clips))
    vae = program.model.vae
    z = torch.randn(2, 16, 3, 6, 8)
    shape = (1, 16, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(shape)
    decoded = program.adapter.normalise(vae, z) / std + torch.tensor(vae.config.latents_mean).view(shape)
    assert torch.allclose(decoded, z, atol=1e-5)


# -- samples: short clips -------------------------------------------------------------------

def test_samples_are_short_animated_clips_rendered_with_the_trained_lora(tmp_path, tiny_wan, clips):
    from PIL import Image

    from lora_farm.protocol import read_events
    from lora_farm.trainers.sampling import detached
    from tests.family_checks import run_runtime

    runtime = run_runtime(tiny_wan, clips, tmp_path / "wan", name="wan", max_steps=2,
                          program_class=StoppingVideoProgram, num_frames=FRAMES, buckets=[BUCKET],
                          sample_prompts=["a red ball rolling"], sample_steps=2)
    (event,) = [e for e in read_events(tmp_path / "wan" / "events.jsonl") if e["event"] == "sample"]
    assert event["step"] == 2 and event["files"] == ["samples/step-000002/00.webp"]
    clip = Image.open(tmp_path / "wan" / event["files"][0])
    assert clip.n_frames == FRAMES and clip.size == (64, 48) and clip.is_animated
    saved = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(clip)]
    program, prompt = runtime.program, json.loads((tmp_path / "wan" / "samples" / "prompts.json").read_text())[0]
    with detached(program, runtime.precision):
        program.model.denoiser.disable_adapters()
        without = [np.asarray(frame.convert("RGB")) for frame in program.render_sample(prompt)]
        program.model.denoiser.enable_adapters()
    assert any((a != b).any() for a, b in zip(saved, without)), "the clip was rendered without the LoRA"


# -- the memory levers ----------------------------------------------------------------------

def test_fp8_base_stores_the_frozen_transformer_in_8_bits_and_learns(tmp_path, tiny_wan, clips, monkeypatch):
    monkeypatch.setenv(FORCE_ON_CPU_ENV, "1")  # the CPU otherwise trains the base unquantized
    program = ready(make_video_program(tmp_path, tiny_wan, clips, quantize_base="fp8", cache_latents=True,
                                       lora_alpha=4))
    weights = {name: p.dtype for name, p in program.model.denoiser.named_parameters()}
    assert weights["blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert weights["blocks.0.attn1.to_q.lora_A.default.weight"] == torch.float32
    check_learns(program, program.model.denoiser, steps=30)


def test_fp8_text_encoder_encodes_the_captions_from_8_bit_weights(tmp_path, tiny_wan, clips, monkeypatch):
    monkeypatch.setenv(FORCE_ON_CPU_ENV, "1")
    plain = ready(make_video_program(tmp_path / "plain", tiny_wan, clips))
    fp8 = ready(make_video_program(tmp_path / "fp8", tiny_wan, clips, quantize_base="fp8"))
    weights = {name: p.dtype for name, p in fp8.model.text_encoders[0].named_parameters()}
    assert weights["encoder.block.0.layer.0.SelfAttention.q.weight"] == torch.float8_e4m3fn
    assert weights["shared.weight"] == torch.float32  # the embedding is kept
    for caption, states in plain.caption_cache.items():
        quantised = fp8.caption_cache[caption]
        quantised, states = quantised[0], states[0]  # each cached as its (1, tokens, width) batch
        assert torch.isfinite(quantised).all() and not torch.equal(quantised, states)
        assert torch.nn.functional.cosine_similarity(quantised.flatten(), states.flatten(), dim=0) > 0.95


def test_swapped_blocks_and_checkpointing_give_the_same_losses(tmp_path, tiny_wan, clips):
    """On the CPU nothing moves, but the offloading hooks run through forward, recompute and
    backward: the losses of 3 steps are those of the plain run."""
    plain = ready(make_video_program(tmp_path / "plain", tiny_wan, clips, cache_latents=True))
    swapped = ready(make_video_program(tmp_path / "swapped", tiny_wan, clips, cache_latents=True,
                                       blocks_to_swap=1, gradient_checkpointing=True))
    assert any("blocks_to_swap" in note for note in swapped.notes)
    assert torch.allclose(torch.tensor(train(swapped, 3)), torch.tensor(train(plain, 3)), atol=1e-5)


# -- resume through the runtime -------------------------------------------------------------

def test_resume_from_a_checkpoint_repeats_the_loss_curve(tmp_path, tiny_wan, clips):
    check_exact_resume(tiny_wan, clips, tmp_path, name="wan", stop_at=3, max_steps=6, cache_latents=True,
                       program_class=StoppingVideoProgram, num_frames=FRAMES, buckets=[BUCKET])


# -- exports --------------------------------------------------------------------------------

def test_diffusers_file_reloads_into_a_fresh_pipeline(trained_wan, tiny_wan):
    check_diffusers_reload(*trained_wan, tiny_wan, fresh_pipeline, transformer_output)


def test_single_file_is_wans_layout_and_loads_through_diffusers_converter(trained_wan, tiny_wan):
    program, files = trained_wan
    tensors, metadata = read_safetensors(files["kohya"])
    for module in ("blocks.1.self_attn.o", "blocks.0.cross_attn.k", "blocks.1.ffn.2"):
        key = f"diffusion_model.{module}"
        assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= set(tensors)
        assert tensors[f"{key}.alpha"].item() == 8 and tensors[f"{key}.lora_down.weight"].shape[0] == 4
    assert len(tensors) == 3 * 2 * 10  # 2 blocks x 10 modules, down + up + alpha
    pipe = check_single_file_reload(program, files, tiny_wan, fresh_pipeline, transformer_output, metadata,
                                    "wan2.1-t2v/lora", "wan21")
    loaded = {name for name, _ in pipe.transformer.named_parameters() if "lora_A" in name}
    assert len(loaded) == 2 * 10  # every module of the file, none dropped


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_resume_from_either_file_continues_the_trained_lora(tmp_path, trained_wan, tiny_wan, kind):
    program, files = trained_wan
    resumed = ready(make_video_program(tmp_path, tiny_wan, program.spec.train_data_dir, resume_from=files[kind]))
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    assert torch.allclose(transformer_output(resumed.model.pipeline, resumed.model.denoiser), expected, atol=1e-4)
    assert train(resumed, steps=1)


def test_entry_point_trains_a_video_job_and_publishes_both_files(tmp_path, tiny_wan, clips):
    spec_file = tmp_path / "wan.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "wan", "base_model": str(tiny_wan), "train_data_dir": str(clips), "num_frames": FRAMES,
        "buckets": [BUCKET], "lora_rank": 4, "batch_size": 2, "max_steps": 3, "save_steps": 2,
        "learning_rate": 1e-3, "num_workers": 0, "cache_latents": True, "gradient_checkpointing": True}))
    job_dir = tmp_path / "job"
    result = run_trainer(spec_file, job_dir)
    assert result.returncode == ExitCode.SUCCESS, result.stderr[-3000:]
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    summary = [e for e in events if e["event"] == "summary"][-1]
    assert summary["family"] == "wan21" and summary["cached_latents"] == 4 and summary["cached_captions"] == 4
    assert {e["kind"] for e in events if e["event"] == "artifact"} == {"kohya", "diffusers", "published"}


# -- validation: recognition and broken clips -------------------------------------------------

def write_video_spec(tmp_path: Path, base: Path, data: Path, **fields) -> Path:
    spec = tmp_path / "video.yaml"
    spec.write_text(yaml.safe_dump({"base_model": str(base), "train_data_dir": str(data), "num_frames": FRAMES,
                                    "vram_gb": 6, **fields}))
    return spec


def test_validate_recognises_the_folder_whatever_its_name_and_infers_the_task(tmp_path, tiny_wan, clips):
    misleading = tmp_path / "flux-dev"
    misleading.symlink_to(tiny_wan, target_is_directory=True)
    info = inspect_base_model(misleading)
    assert info.family == "wan21" and info.task == "video"
    code, output = validate(write_video_spec(tmp_path, misleading, clips))
    assert code == 0 and "Wan 2.1 T2V (wan21), rank" in output, output


def test_num_frames_must_fit_the_vae(tmp_path, tiny_wan, clips):
    code, output = validate(write_video_spec(tmp_path, tiny_wan, clips, num_frames=10))
    assert code == 1 and "num_frames" in output and "4k+1" in output and "use 9 or 13" in output, output


def test_broken_clips_are_refused_at_validation_each_named(tmp_path, tiny_wan, clips):
    """An undecodable clip, a clip with too few frames, a zero-byte file and a text file named
    .mp4: each named with what is wrong, no traceback, nothing queued."""
    data = tmp_path / "broken"
    data.mkdir()
    good = (clips / "clip_00.mp4").read_bytes()
    (data / "cut.mp4").write_bytes(good[: len(good) // 3][:48] + bytes(range(256)) * 8)
    frames = demo.wan._clip_frames("circle", "red", "white", "left to right", (64, 48), 4)
    demo.wan.write_clip(data / "short.mp4", frames)
    (data / "empty.mp4").write_bytes(b"")
    (data / "notes.mp4").write_text("this is not a video\n", encoding="utf-8")
    (data / "fine.mp4").write_bytes(good)
    for name in ("cut", "short", "empty", "notes", "fine"):
        (data / f"{name}.txt").write_text(f"a clip called {name}\n", encoding="utf-8")
    code, output = validate(write_video_spec(tmp_path, tiny_wan, data))
    assert code == 1 and "Traceback" not in output, output
    assert "has 4 problem(s)" in output, output
    for name, why in (("cut.mp4", "does not decode"), ("short.mp4", "too few frames for 9 frames"),
                      ("empty.mp4", "the file is empty"), ("notes.mp4", "does not decode")):
        assert f"{data / name}: {why}" in output, (name, output)
    assert "fine.mp4" not in output


def test_wan_single_files_are_recognised_and_refused_for_now(tmp_path, clips):
    shapes = {"blocks.0.self_attn.q.weight": [5120, 5120], "text_embedding.0.weight": [5120, 4096]}
    comfy = tmp_path / "model.safetensors"
    write_header_only(comfy, {f"model.diffusion_model.{k}": v for k, v in shapes.items()}, "BF16")
    assert inspect_base_model(comfy).family == "wan21"
    code, output = validate(write_video_spec(tmp_path, comfy, clips))
    assert code == 1 and "from its diffusers folder only" in output and "Fix:" in output, output


# -- the estimate at real sizes -------------------------------------------------------------

def wan_spec(base: Path, **fields) -> VideoJobSpec:
    settings = {"buckets": ["832x480"], "num_frames": 81, "lora_rank": 16, "mixed_precision": "bf16", **fields}
    return VideoJobSpec(name="wan", base_model=base, train_data_dir=base, **settings)


def test_the_estimate_knows_frames_resolution_and_every_memory_lever(tmp_path):
    from lora_farm.scheduler.estimate import estimate_vram
    from lora_farm.scheduler.host_ram import estimate_host_ram
    from tests.fake_headers import wan21_headers

    base = wan21_headers(tmp_path / "14B", "14B")
    plain = estimate_vram(wan_spec(base))
    checkpointed = estimate_vram(wan_spec(base, gradient_checkpointing=True))
    fp8 = estimate_vram(wan_spec(base, gradient_checkpointing=True, quantize_base="fp8"))
    swapped = estimate_vram(wan_spec(base, gradient_checkpointing=True, quantize_base="fp8", blocks_to_swap=20))
    gib = 1024
    assert 26 * gib < checkpointed.parts["frozen_weights"] < 27.5 * gib  # 14.29 B x 2 bytes (+ VAE)
    assert 12 * gib < checkpointed.parts["activations"] < 22 * gib  # 21 latent frames of 1,560 tokens
    assert plain.total_mb > checkpointed.total_mb > fp8.total_mb > swapped.total_mb
    assert abs(checkpointed.parts["frozen_weights"] - fp8.parts["frozen_weights"] - 14.29e9 / 2**20) < 0.1 * gib
    # UMT5-XXL in fp8 too (5.3 GiB) while it alone is on the card encoding the captions
    assert swapped.parts["frozen_weights"] >= 5.68e9 / 2**20
    uncached = estimate_vram(wan_spec(base, gradient_checkpointing=True, cache_text_encoder_outputs=False))
    assert uncached.parts["frozen_weights"] - checkpointed.parts["frozen_weights"] > 10 * gib
    short = estimate_vram(wan_spec(base, gradient_checkpointing=True, num_frames=33))
    wide = estimate_vram(wan_spec(base, gradient_checkpointing=True, buckets=["1280x720"]))
    assert short.parts["activations"] < checkpointed.parts["activations"] < wide.parts["activations"]
    host = estimate_host_ram(wan_spec(base, gradient_checkpointing=True, quantize_base="fp8", blocks_to_swap=20))
    assert host.parts["base_as_stored"] > (14.29e9 + 5.68e9) * 4 / 2**20  # fp32 files, read before casting


def test_wan_22_ti2v_and_image_to_video_folders_are_refused(tmp_path, clips):
    """TI2V-5B's per-token timesteps and the image-to-video transformer (36 input channels, an
    image embedding) are other steps: refused at validation, naming the supported families."""
    for name, index, config in (("ti2v", {"_class_name": "WanPipeline", "expand_timesteps": True}, {}),
                                ("i2v", {"_class_name": "WanImageToVideoPipeline"},
                                 {"in_channels": 36, "image_dim": 1280})):
        folder = tmp_path / name
        (folder / "transformer").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "transformer" / "config.json").write_text(
            json.dumps({"_class_name": "WanTransformer3DModel", **config}))
        code, output = validate(write_video_spec(tmp_path, folder, clips))
        assert code == 1 and f"does not train ({index['_class_name']})" in output, output
        assert "wan21 (Wan 2.1 T2V)" in output and "wan22 (Wan 2.2 T2V A14B)" in output, output


# -- host RAM at submit ---------------------------------------------------------------------------

def test_submit_refuses_a_job_no_host_has_the_ram_for_and_records_the_figure(
        farm_env, ledger, monkeypatch, tmp_path, tiny_wan, clips):
    from lora_farm.errors import NoCapacity
    from lora_farm.settings import reload_settings
    from lora_farm.submit import submit_files

    spec = write_video_spec(tmp_path, tiny_wan, clips, name="wan-ram", buckets=[BUCKET])
    monkeypatch.setenv("LORAFARM_HOST_RAM", "2GiB")  # below the trainer process alone (3 GiB)
    reload_settings()
    with pytest.raises(NoCapacity) as refused:
        submit_files([spec], ledger, batch="ram", send=lambda *args: None)
    message = str(refused.value)
    assert "wan-ram:" in message and "of host RAM" in message and "has 2.0 GB" in message, message
    assert ledger.queued_ids(10) == []  # nothing was submitted
    monkeypatch.setenv("LORAFARM_HOST_RAM", "16GiB")
    reload_settings()
    report = submit_files([spec], ledger, batch="ram", send=lambda *args: None)
    record = report.jobs[0].record
    assert 3 * 1024 < record.host_ram_mb < 4 * 1024  # 3 GiB process + the tiny model + 2 clips in flight


def test_video_fields_are_refused_each_by_its_name(tmp_path, tiny_wan, clips):
    code, output = validate(write_video_spec(tmp_path, tiny_wan, clips, frame_stride=2, fps=4, blocks_to_swap=1,
                                             buckets=["64x40"]))
    assert code == 1 and "Traceback" not in output, output
    assert "`fps` is 4 and `frame_stride` is set too" in output, output
    assert "`blocks_to_swap` is 1, which needs `gradient_checkpointing: true`" in output, output
    assert "`buckets` bucket '64x40': width and height must be multiples of 16" in output, output
    code, output = validate(write_video_spec(tmp_path, tiny_wan, clips, fps=1))  # 12 frames at 8 fps: 1.5 s
    assert code == 1 and "too few frames for 9 frames at 1 fps" in output and "raise `fps`" in output, output



# -- Wan 2.2 A14B: two experts ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_wan22(tmp_path_factory) -> Path:
    return demo.build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan22", experts=True)


def test_wan22_needs_an_expert_and_each_expert_has_its_range_of_t(tmp_path, tiny_wan22, clips):
    assert inspect_base_model(tiny_wan22).family == "wan22"
    code, output = validate(write_video_spec(tmp_path, tiny_wan22, clips))
    assert code == 1 and "`expert` is not set" in output and "high_noise or low_noise" in output, output
    code, output = validate(write_video_spec(tmp_path, tiny_wan22, clips, expert="low_noise"))
    assert code == 0 and "Wan 2.2 T2V A14B (wan22)" in output, output
    for expert, inside in (("high_noise", lambda s: s >= 0.875), ("low_noise", lambda s: s < 0.875)):
        program = ready(make_video_program(tmp_path / expert, tiny_wan22, clips, expert=expert))
        second = program.model.denoiser is program.model.pipeline.transformer_2
        assert second == (expert == "low_noise")
        sigmas = program.adapter.sigmas(program.model, 512, torch.Generator().manual_seed(3))
        assert inside(sigmas).all() and sigmas.max() - sigmas.min() > 0.05, expert


def test_wan22_low_noise_expert_trains_and_both_files_load_into_transformer_2(tmp_path, tiny_wan22, clips):
    program = ready(make_video_program(tmp_path, tiny_wan22, clips, expert="low_noise", lora_alpha=8,
                                       cache_latents=True))
    untouched = {n: p.clone() for n, p in program.model.pipeline.transformer.named_parameters()}
    check_learns(program, program.model.denoiser, steps=20)
    assert all(torch.equal(p, untouched[n]) for n, p in program.model.pipeline.transformer.named_parameters())
    files = exported(program)
    expected = transformer_output(program.model.pipeline, program.model.denoiser)
    tensors, metadata = read_safetensors(files["kohya"])
    assert metadata["ss_base_model_version"] == "wan22" and "diffusion_model.blocks.0.ffn.0.alpha" in tensors
    for kind in ("diffusers", "kohya"):
        pipe = fresh_pipeline(tiny_wan22)
        pipe.load_lora_weights(str(files[kind]), load_into_transformer_2=True)
        got = transformer_output(pipe, pipe.transformer_2)
        assert torch.allclose(got, expected, atol=1e-4), kind
        assert not any("lora_" in name for name, _ in pipe.transformer.named_parameters())
    resumed = ready(make_video_program(tmp_path / "resumed", tiny_wan22, clips, expert="low_noise",
                                       resume_from=files["kohya"]))
    got = transformer_output(resumed.model.pipeline, resumed.model.denoiser)
    assert torch.allclose(got, expected, atol=1e-4)


def test_wan22_estimates_one_expert_on_the_card_and_both_on_the_host(tmp_path):
    from lora_farm.scheduler.estimate import estimate_vram
    from lora_farm.scheduler.host_ram import estimate_host_ram
    from tests.fake_headers import wan21_headers, wan22_a14b_headers

    wan21 = wan_spec(wan21_headers(tmp_path / "wan21", "14B"), gradient_checkpointing=True)
    wan22 = wan_spec(wan22_a14b_headers(tmp_path / "wan22"), gradient_checkpointing=True, expert="low_noise")
    assert estimate_vram(wan22).total_mb == estimate_vram(wan21).total_mb
    extra = estimate_host_ram(wan22).total_mb - estimate_host_ram(wan21).total_mb
    assert abs(extra - 14.29e9 * 4 / 2**20) < 1024  # the other expert, read from its fp32 files


def test_calibration_tells_video_shapes_apart(tmp_path):
    from lora_farm.scheduler.calibration import shape_key
    from tests.fake_headers import wan21_headers

    base = wan21_headers(tmp_path / "14B", "14B")
    keys = {shape_key(wan_spec(base, **fields)) for fields in
            ({}, {"num_frames": 33}, {"buckets": ["1280x720"]}, {"quantize_base": "fp8"},
             {"gradient_checkpointing": True, "blocks_to_swap": 20}, {"cache_text_encoder_outputs": False})}
    assert len(keys) == 6  # a peak measured at one shape never corrects another
