"""One batch with a job of every image family through the real farm: real Redis, real `celery
worker` processes on two declared CPU cards (2 slots each), the real trainers on tiny models.

Each job is estimated by the farm (no `vram_gb`): the registry's VRAM model of its family places
it. Every job must succeed, ship both exports (the diffusers file and the family's single file)
and a sample in its manifest, and have trained the family its base model was recognised as.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_farm import demo
from lora_farm.submit import submit_files
from tests.fixtures_farm import all_done, job_events, wait_until, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
DIFFUSERS_FILE = "diffusers/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """family -> a tiny base model of it, built once for the module."""
    root = tmp_path_factory.mktemp("family-models")
    return {"sd1": demo.build_tiny_sd(root / "sd1"),
            "sdxl": demo.build_tiny_sdxl(root / "sdxl"),
            "flux-dev": demo.build_tiny_flux(root / "flux-dev"),
            "sd35-medium": demo.build_tiny_sd3(root / "sd35-medium", medium=True),
            "qwen-image": demo.build_tiny_qwen_image(root / "qwen-image"),
            "z-image": demo.build_tiny_zimage(root / "z-image"),
            "chroma": demo.build_tiny_chroma(root / "chroma"),
            "flux2-klein": demo.build_tiny_flux2_klein(root / "flux2-klein")}


def test_a_batch_with_every_image_family_succeeds_on_declared_cards(
        farm_env, ledger, celery_workers, family_models, image_dataset, tmp_path):
    farm_env["LORAFARM_STALE_AFTER_SECONDS"] = "60"  # a loaded machine may stall a heartbeat
    # each family's own pipeline renders a sample from a prompt encoded with the cached captions
    specs = {family: write_spec(tmp_path, f"lora-{family}", model, image_dataset, "image",
                                lora_rank=4, cache_latents=False, cache_text_encoder_outputs=True,
                                sample_prompts=["a red circle"], sample_steps=2, sample_every_steps=2)
             for family, model in family_models.items()}
    celery_workers.start_all(["gpu0", "gpu1"], timeout=300)
    report = submit_files(list(specs.values()), ledger, batch="families")
    ids = [job.record.id for job in report.jobs]
    records = wait_until(lambda: all_done(ledger, ids), 800, "the batch to finish", celery_workers)

    assert [r.state for r in records] == ["succeeded"] * len(specs), [r.exit_reason for r in records]
    assert {r.gpu for r in records} == {"gpu0", "gpu1"}  # the batch spread over both cards
    for family, record in zip(specs, records):
        assert record.name == f"lora-{family}"
        manifest = json.loads((Path(record.job_dir) / "manifest.json").read_text())
        shipped = {entry["path"] for entry in manifest["files"]}
        assert {DIFFUSERS_FILE, f"{record.name}.safetensors", "samples/step-000002/00.png"} <= shipped, \
            (family, shipped)
        (summary,) = job_events(record, "summary")
        assert summary["family"] == family, (record.name, summary)


def test_a_video_job_and_an_image_job_succeed_on_declared_cards(
        farm_env, ledger, celery_workers, tmp_path, tmp_path_factory, image_dataset):
    """The farm never names a family or a medium: the Wan job is estimated, placed, run, shipped
    like the image job beside it, and its summary is the video program's."""
    farm_env["LORAFARM_STALE_AFTER_SECONDS"] = "60"
    root = tmp_path_factory.mktemp("video-farm")
    clips = demo.write_clip_dataset(root / "clips")
    specs = {"wan21": write_spec(tmp_path, "lora-wan", demo.build_tiny_wan(root / "wan"), clips, "video",
                                 lora_rank=4),
             "sd1": write_spec(tmp_path, "lora-sd", demo.build_tiny_sd(root / "sd1"), image_dataset, "image",
                               lora_rank=4)}
    celery_workers.start_all(["gpu0", "gpu1"], timeout=300)
    report = submit_files(list(specs.values()), ledger, batch="video-and-image")
    ids = [job.record.id for job in report.jobs]
    records = wait_until(lambda: all_done(ledger, ids), 600, "both jobs to finish", celery_workers)

    assert [r.state for r in records] == ["succeeded", "succeeded"], [r.exit_reason for r in records]
    for family, record in zip(specs, records):
        manifest = json.loads((Path(record.job_dir) / "manifest.json").read_text())
        shipped = {entry["path"] for entry in manifest["files"]}
        assert {DIFFUSERS_FILE, f"{record.name}.safetensors"} <= shipped, (family, shipped)
        (summary,) = job_events(record, "summary")
        assert summary["family"] == family, (record.name, summary)
    (video,) = job_events(records[0], "summary")
    assert video["cached_captions"] == 4 and video["buckets"] == ["64x48"]
