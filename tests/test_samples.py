"""Samples during training (image PNGs, LLM completions), kohya prompt files, the evaluation loss,
and that neither changes training; samples ship with the artifacts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from lora_farm import demo
from lora_farm.cli import app
from lora_farm.errors import DatasetError
from lora_farm.jobs.datasets import split_held_out
from lora_farm.jobs.prompts import parse_prompt_file, resolve_prompts
from lora_farm.jobs.spec import ImageJobSpec, LlmJobSpec, SamplePrompt
from lora_farm.protocol import ExitCode, read_events
from lora_farm.settings import reload_settings
from lora_farm.shipping import ship_job
from tests.family_checks import check_exact_resume, run_runtime

PROMPT_FILE = """# kohya's format: prompt, then options
a photo of a red circle --w 32 --h 48 --d 9 --ss euler_a

a photo of a blue square --n blurry, text --l 5.5
"""


def events_of(job_dir: Path, kind: str) -> list[dict]:
    return [event for event in read_events(job_dir / "events.jsonl") if event["event"] == kind]


def run_trainer(spec: dict, root: Path) -> Path:
    """The real trainer process on a spec; returns its job folder."""
    spec_file, job_dir = root / f"{spec['name']}.yaml", root / "job"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "LORAFARM_OUTPUT_ROOT": str(root / "out")}
    result = subprocess.run([sys.executable, "-m", "lora_farm.trainers", str(spec_file), "--job-dir",
                             str(job_dir)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == ExitCode.SUCCESS, result.stderr[-3000:]
    return job_dir


# -- prompts: kohya files, defaults ----------------------------------------------------------

def test_kohya_prompt_file_gives_each_line_its_options(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPT_FILE)
    prompts, problems = parse_prompt_file(path)
    assert problems == []
    assert prompts == [
        SamplePrompt(prompt="a photo of a red circle", width=32, height=48, seed=9),
        SamplePrompt(prompt="a photo of a blue square", negative_prompt="blurry, text", guidance_scale=5.5)]


def test_resolved_prompts_fill_every_default_with_fixed_seeds(tmp_path):
    spec = ImageJobSpec(name="s", base_model=tmp_path, train_data_dir=tmp_path, seed=40, sample_steps=3,
                        sample_prompts=["a cat", SamplePrompt(prompt="a dog", width=32, steps=9, seed=1)])
    resolved = resolve_prompts(spec, {"width": 64, "height": 64, "steps": 30, "guidance": 3.5})
    assert resolved == [
        {"index": 0, "prompt": "a cat", "negative": None, "width": 64, "height": 64, "steps": 3,
         "guidance": 3.5, "seed": 40},
        {"index": 1, "prompt": "a dog", "negative": None, "width": 32, "height": 64, "steps": 9,
         "guidance": 3.5, "seed": 1}]


@pytest.mark.parametrize("prompts", [[], [""], ["x"] * 65, [{"prompt": "x", "width": 30}]])
def test_bad_prompt_lists_are_refused(tmp_path, prompts):
    with pytest.raises(ValidationError, match="sample_prompts"):
        LlmJobSpec(name="s", base_model=tmp_path, train_data_dir=tmp_path, sample_prompts=prompts)


def test_lorafarm_validate_names_file_line_option_and_value_of_bad_prompt_lines(tmp_path, tiny_sd):
    data = demo.write_image_dataset(tmp_path / "images", captions="metadata")
    prompts = tmp_path / "prompts.txt"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "job", "task": "image", "base_model": str(tiny_sd),
                                    "train_data_dir": str(data), "sample_prompts": "prompts.txt"}))
    prompts.write_text(PROMPT_FILE)
    good = CliRunner().invoke(app, ["validate", str(spec)], env={"COLUMNS": "400"})
    assert good.exit_code == 0, good.output
    prompts.write_text("a red circle --w abc\n# fine\na cat --x 3\na dog --w 30\n--n only options\n")
    result = CliRunner().invoke(app, ["validate", str(spec)], env={"COLUMNS": "400"})
    assert result.exit_code == 1 and "Traceback" not in result.output
    output = " ".join(result.output.split())
    for expected in (f"{prompts} line 1: option `--w` 'abc'", f"{prompts} line 3: option `--x` '3' is not a "
                     "prompt option", f"{prompts} line 4: option `--w` '30'", "multiple of 8",
                     f"{prompts} line 5: has no prompt"):
        assert expected in output, output
    assert "`sample_prompts`" in output and "Fix:" in output


def test_new_fields_at_their_defaults_leave_config_hashes_alone(tmp_path):
    import hashlib

    spec = LlmJobSpec(name="s", base_model=tmp_path, train_data_dir=tmp_path)
    later = {"sample_prompts", "sample_every_steps", "sample_steps", "validation_split", "eval_every_steps",
             "sample_max_new_tokens", "host_ram_gb"}
    payload = spec.model_dump(mode="json", exclude={"batch", "base_model_id"} | later)
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert spec.config_hash() == hashlib.sha256(canonical.encode()).hexdigest()[:16]  # as before them
    assert LlmJobSpec(name="s", base_model=tmp_path, train_data_dir=tmp_path,
                      validation_split=0.1).config_hash() != spec.config_hash()


def test_held_out_examples_are_fixed_by_seed_and_apart_from_training():
    examples = list(range(10))
    train, held = split_held_out(examples, 0.2, seed=1, where=Path("data"))
    assert len(held) == 2 and sorted(train + held) == examples and not set(train) & set(held)
    assert split_held_out(examples, 0.2, seed=1, where=Path("data")) == (train, held)
    assert split_held_out(examples, 0.0, seed=1, where=Path("data")) == (examples, [])
    with pytest.raises(DatasetError, match="validation_split"):
        split_held_out([1, 2], 0.9, seed=1, where=Path("data"))


# -- SD through the real trainer process -------------------------------------------------------

@pytest.fixture(scope="module")
def sd_job(tmp_path_factory, tiny_sd) -> Path:
    """5 steps: samples every 2 steps (and at the end), evaluation every 3, a kohya prompt file."""
    root = tmp_path_factory.mktemp("sd-samples")
    data = demo.write_image_dataset(root / "images", captions="metadata")
    (root / "prompts.txt").write_text(PROMPT_FILE)
    return run_trainer({"name": "shapes", "task": "image", "base_model": str(tiny_sd),
                        "train_data_dir": str(data), "resolution": 64, "lora_rank": 4, "batch_size": 2,
                        "max_steps": 5, "save_steps": 4, "num_workers": 0, "learning_rate": 1e-2,
                        "sample_prompts": "prompts.txt", "sample_every_steps": 2, "sample_steps": 2,
                        "validation_split": 0.25, "eval_every_steps": 3}, root)


@pytest.mark.slow
def test_samples_are_written_at_their_steps_with_their_sizes(sd_job):
    samples = events_of(sd_job, "sample")
    assert [event["step"] for event in samples] == [2, 4, 5]
    for event in samples:
        step = f"step-{event['step']:06d}"
        assert event["files"] == [f"samples/{step}/00.png", f"samples/{step}/01.png"]
        assert event["seconds"] > 0
        sizes = [Image.open(sd_job / file).size for file in event["files"]]
        assert sizes == [(32, 48), (64, 64)]  # --w 32 --h 48; the job's resolution
    last = [np.asarray(Image.open(sd_job / file)) for file in samples[-1]["files"]]
    first = [np.asarray(Image.open(sd_job / file)) for file in samples[0]["files"]]
    assert any((a != b).any() for a, b in zip(first, last)), "the LoRA changed nothing between steps"


@pytest.mark.slow
def test_prompts_json_holds_what_was_rendered(sd_job):
    prompts = json.loads((sd_job / "samples" / "prompts.json").read_text())
    assert prompts == [
        {"index": 0, "prompt": "a photo of a red circle", "negative": None, "width": 32, "height": 48,
         "steps": 2, "guidance": 7.5, "seed": 9},
        {"index": 1, "prompt": "a photo of a blue square", "negative": "blurry, text", "width": 64,
         "height": 64, "steps": 2, "guidance": 5.5, "seed": 43}]  # SD's guidance; seed 42 + index


@pytest.mark.slow
def test_tensorboard_holds_each_sample_image(sd_job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(sd_job / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    board.Reload()
    assert {"samples/00", "samples/01"} <= set(board.Tags()["images"])
    images = board.Images("samples/00")
    assert [image.step for image in images] == [2, 4, 5]
    assert (images[0].width, images[0].height) == (32, 48)
    assert [event.step for event in board.Scalars("eval/loss")] == [3, 5]


@pytest.mark.slow
def test_eval_loss_lr_and_sample_time_are_reported(sd_job):
    evals = events_of(sd_job, "eval")
    assert [event["step"] for event in evals] == [3, 5]
    assert all(np.isfinite(event["eval_loss"]) and event["eval_loss"] > 0 for event in evals)
    assert all(event["lr"] == pytest.approx(1e-2) for event in events_of(sd_job, "progress"))
    summary = events_of(sd_job, "summary")[-1]
    assert (summary["examples"], summary["held_out"]) == (6, 2)  # 2 of 8 images held out
    assert {"sample", "eval", "train"} <= set(summary["phase_seconds"])


@pytest.mark.slow
def test_samples_are_in_the_manifest_and_uploaded(sd_job, s3_env, s3_server, tmp_path):
    job_dir = shutil.copytree(sd_job, tmp_path / "b1" / "job-7")
    result = ship_job(job_dir, "job-7", "b1", "shapes")
    manifest = json.loads((job_dir / "manifest.json").read_text())
    shipped = {entry["path"] for entry in manifest["files"]}
    rendered = {file for event in events_of(sd_job, "sample") for file in event["files"]}
    assert rendered | {"samples/prompts.json"} <= shipped and rendered <= set(result.uris)
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_env)["Contents"]}
    assert {f"farm/b1/job-7/{file}" for file in rendered} <= keys


# -- training does not notice ----------------------------------------------------------------

SAMPLING = {"sample_prompts": ["a photo of a red circle"], "sample_every_steps": 1, "sample_steps": 1,
            "validation_split": 0.25, "eval_every_steps": 1}


@pytest.mark.slow
def test_training_is_the_same_with_samples_and_evaluations(tmp_path, tiny_sd, image_dataset):
    plain = run_runtime(tiny_sd, image_dataset, tmp_path / "plain", name="plain", max_steps=3,
                        validation_split=0.25, eval_every_steps=100)
    watched = run_runtime(tiny_sd, image_dataset, tmp_path / "watched", name="watched", max_steps=3, **SAMPLING)
    assert len(events_of(tmp_path / "watched", "sample")) == 3 and len(events_of(tmp_path / "watched", "eval")) == 3
    assert watched.step_losses == plain.step_losses  # exactly: sampling forks every RNG


@pytest.mark.slow
def test_exact_resume_with_samples_on(tmp_path, tiny_sd, image_dataset):
    # evaluations only at the end: the stopping program counts every compute_loss call
    check_exact_resume(tiny_sd, image_dataset, tmp_path, name="resumed", stop_at=3, max_steps=5,
                       **{**SAMPLING, "sample_every_steps": 2, "eval_every_steps": 100})
    steps = [event["step"] for event in events_of(tmp_path / "interrupted", "sample")]
    assert steps == [2, 4, 5]  # stopped at 3, resumed: 4 and the end


# -- Flux: the family's own pipeline, the LoRA active -------------------------------------------

@pytest.mark.slow
def test_flux_samples_render_with_the_trained_lora(tmp_path, tiny_flux, image_dataset):
    from lora_farm.trainers import image_samples
    from lora_farm.trainers.sampling import detached

    # cached captions: the held-out images' are cached too (the evaluation loss reads them)
    runtime = run_runtime(tiny_flux, image_dataset, tmp_path / "flux", name="flux", max_steps=3,
                          sample_prompts=["a photo of a red circle", {"prompt": "a cat", "width": 32, "height": 32}],
                          sample_steps=2, cache_text_encoder_outputs=True, validation_split=0.25)
    assert [e["step"] for e in events_of(tmp_path / "flux", "eval")] == [3]
    (event,) = events_of(tmp_path / "flux", "sample")
    assert event["step"] == 3 and [Image.open(tmp_path / "flux" / f).size for f in event["files"]] == [(64, 64), (32, 32)]
    prompts = json.loads((tmp_path / "flux" / "samples" / "prompts.json").read_text())
    assert prompts[0]["guidance"] == 3.5  # Flux.1 dev's default guidance
    program = runtime.program
    saved = np.asarray(Image.open(tmp_path / "flux" / event["files"][0]))
    assert any("captions and 2 sample prompts encoded once" in note for note in program.notes)
    encoders = program.model.text_encoders
    for encoder in encoders:  # the sample prompts were encoded with the captions, before training
        encoder.forward = _never_called
    with detached(program, runtime.precision):
        again = np.asarray(program.render_sample(prompts[0]))
        program.model.denoiser.disable_adapters()
        without = np.asarray(program.render_sample(prompts[0]))
        program.model.denoiser.enable_adapters()
        with pytest.raises(LookupError, match="'a dog' was not encoded before the text encoders left"):
            program.render_sample({**prompts[0], "prompt": "a dog"})
        for encoder in encoders:
            del encoder.forward  # the class's forward: a pipeline that encodes the prompt itself
        live = np.asarray(image_samples.render(program, image_samples.build_pipeline(program), prompts[0]))
    assert (again == saved).all(), "a sample's seed fixes it"
    assert (without != saved).any(), "the sample was rendered without the LoRA"
    assert (live == saved).all(), "the recorded prompt encoding is the pipeline's own"


def _never_called(*args, **kwargs):
    raise AssertionError("a text encoder ran although the sample prompts were encoded with the captions")


# -- LLM: greedy completions -----------------------------------------------------------------

@pytest.mark.slow
def test_llm_completions_are_greedy_with_the_lora_and_evaluated(tmp_path, tiny_llm, text_dataset):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "question: what colour is the sky? answer:"
    job_dir = run_trainer({"name": "facts", "task": "llm", "base_model": str(tiny_llm),
                           "train_data_dir": str(text_dataset), "max_seq_len": 64, "lora_rank": 8,
                           "learning_rate": 5e-3, "max_steps": 4, "save_steps": 2, "num_workers": 0,
                           "sample_prompts": [prompt], "sample_max_new_tokens": 8,
                           "validation_split": 0.1}, tmp_path)
    samples = events_of(job_dir, "sample")
    assert [(e["step"], e["files"]) for e in samples] == [(2, ["samples/step-000002/00.txt"]),
                                                          (4, ["samples/step-000004/00.txt"])]
    assert [e["step"] for e in events_of(job_dir, "eval")] == [2, 4]
    assert json.loads((job_dir / "samples" / "prompts.json").read_text())[0]["max_new_tokens"] == 8
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm), job_dir / "adapter").eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                max_new_tokens=8, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    expected = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert (job_dir / "samples" / "step-000004" / "00.txt").read_text() == expected


@pytest.fixture(autouse=True)
def _fresh_settings():
    yield
    reload_settings()


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["encoders", "cached-captions"])
def test_a_failed_sample_round_is_reported_and_training_goes_on(cached, tmp_path, image_dataset):
    base = demo.build_tiny_zimage(tmp_path / "tiny-z-image")
    # 24 px passes validation (a multiple of 8) but Z-Image's pipeline wants multiples of 16;
    # with cached captions the prompt's encoding before training meets the refusal first
    runtime = run_runtime(base, image_dataset, tmp_path / "job", name="odd", max_steps=2,
                          sample_prompts=[{"prompt": "a red circle", "width": 24, "height": 24}], sample_steps=1,
                          cache_text_encoder_outputs=cached)
    (event,) = events_of(tmp_path / "job", "sample")
    assert event["step"] == 2 and event["files"] == [] and "divisible by 16" in event["error"]
    assert sorted(runtime.step_losses) == [1, 2] and events_of(tmp_path / "job", "summary")
