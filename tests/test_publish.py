"""The finished adapter where lora-scripts users look: ``output_dir/<name>.safetensors`` (image) and
``output_dir/<name>/`` (llm), replaced whole by the job that finishes last."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from lora_farm.jobs.spec import ImageJobSpec, LlmJobSpec
from lora_farm.settings import reload_settings
from lora_farm.trainers.publish import PublishRefused, publish, published_path


def image_spec(tmp_path: Path, **fields) -> ImageJobSpec:
    return ImageJobSpec(name="style", base_model=tmp_path, train_data_dir=tmp_path,
                        output_dir=tmp_path / "out", **fields)


def llm_spec(tmp_path: Path) -> LlmJobSpec:
    return LlmJobSpec(name="facts", base_model=tmp_path, train_data_dir=tmp_path,
                      output_dir=tmp_path / "out")


def finished_image_job(job_dir: Path, payload: bytes) -> Path:
    job_dir.mkdir(parents=True)
    (job_dir / "style.safetensors").write_bytes(payload)
    return job_dir


def finished_llm_job(job_dir: Path, files: dict[str, bytes]) -> Path:
    (job_dir / "adapter").mkdir(parents=True)
    for name, payload in {"adapter_config.json": b"{}", **files}.items():
        (job_dir / "adapter" / name).write_bytes(payload)
    return job_dir


def hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_image_adapter_lands_beside_the_batches_and_the_later_job_wins(tmp_path):
    spec = image_spec(tmp_path)
    first = finished_image_job(tmp_path / "out" / "nightly-1" / "a1b2c3", b"first")
    second = finished_image_job(tmp_path / "out" / "nightly-2" / "d4e5f6", b"second")

    assert publish(spec, first) == tmp_path / "out" / "style.safetensors" == published_path(spec)
    assert (tmp_path / "out" / "style.safetensors").read_bytes() == b"first"
    publish(spec, second)
    assert (tmp_path / "out" / "style.safetensors").read_bytes() == b"second"
    assert stat.S_IMODE((tmp_path / "out" / "style.safetensors").stat().st_mode) == 0o644
    assert hidden_leftovers(tmp_path / "out") == []


def test_llm_adapter_folder_is_replaced_whole(tmp_path):
    spec = llm_spec(tmp_path)
    first = finished_llm_job(tmp_path / "out" / "b1" / "job1",
                             {"adapter_model.safetensors": b"one", "only-in-first.txt": b"x"})
    second = finished_llm_job(tmp_path / "out" / "b2" / "job2", {"adapter_model.safetensors": b"two"})
    publish(spec, first)
    assert publish(spec, second) == tmp_path / "out" / "facts"
    published = tmp_path / "out" / "facts"
    assert sorted(p.name for p in published.iterdir()) == ["adapter_config.json",
                                                           "adapter_model.safetensors"]
    assert (published / "adapter_model.safetensors").read_bytes() == b"two"
    assert hidden_leftovers(tmp_path / "out") == []


def test_a_folder_that_is_no_adapter_is_never_replaced(tmp_path):
    spec = llm_spec(tmp_path)
    batch_folder = tmp_path / "out" / "facts" / "job9"  # a batch that happens to share the name
    batch_folder.mkdir(parents=True)
    job = finished_llm_job(tmp_path / "out" / "b1" / "job1", {"adapter_model.safetensors": b"w"})
    with pytest.raises(PublishRefused, match="not an earlier adapter folder"):
        publish(spec, job)
    assert batch_folder.is_dir() and hidden_leftovers(tmp_path / "out") == []


def test_without_output_dir_the_adapter_goes_to_the_output_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFARM_OUTPUT_ROOT", str(tmp_path / "root"))
    reload_settings()
    try:
        spec = image_spec(tmp_path).model_copy(update={"output_dir": None})
        assert published_path(spec) == tmp_path / "root" / "style.safetensors"
    finally:
        monkeypatch.undo()
        reload_settings()
