"""Hostile input never gets in: each case is refused by `lorafarm validate` and `lorafarm submit`
with exit 1, a message naming the problem, no traceback, nothing queued, and the validation
itself answers within a second. The models and datasets are header-only fakes: validation reads
headers, configs and file lists, never weights or pixels."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_farm.cli import app
from lora_farm.errors import DatasetError, SpecError
from lora_farm.jobs.datasets import find_examples, load_examples
from lora_farm.jobs.loader import load_spec_file, load_spec_files
from lora_farm.ledger import NewJob
from lora_farm.settings import reload_settings
from tests.fake_headers import write_header_only

pytestmark = pytest.mark.timeout(120)  # a FIFO opened by mistake blocks: fail, do not hang

# "billion laughs": each level lists the one before ten times; `tags` expands to 10^10 values
BOMB = ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"{level}: &{level} [{', '.join([f'*{below}'] * 10)}]\n"
                  for below, level in zip("abcdefgh", "bcdefghi"))
        + f"tags: [{', '.join(['*i'] * 10)}]\n")


@pytest.fixture(autouse=True)
def output_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFARM_OUTPUT_ROOT", str(tmp_path / "output"))
    monkeypatch.delenv("LORAFARM_DATA_ROOTS", raising=False)
    reload_settings()
    yield
    reload_settings()


@pytest.fixture
def llm(tmp_path) -> Path:
    """A causal-LM folder as validation sees it: config.json and a safetensors header."""
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_header_only(folder / "model.safetensors", {"w": [64, 64]})
    return folder


@pytest.fixture
def sd(tmp_path) -> Path:
    """A diffusers folder as validation sees it."""
    folder = tmp_path / "sd"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    write_header_only(folder / "unet" / "diffusion_pytorch_model.safetensors", {"w": [8, 8]})
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    """Two images (validation checks they are files, the trainer decodes them) + metadata.csv."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"\x89PNG not decoded at validation")
    (folder / "metadata.csv").write_text("file_name,text\na.png,a red circle\nb.png,a blue square\n")
    return folder


@pytest.fixture
def texts(tmp_path) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "part1.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    return folder


def spec_file(tmp_path: Path, base: Path, data: Path, extra: str = "", name: str = "job") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"base_model: {base}\ntrain_data_dir: {data}\nmax_steps: 2\n{extra}")
    return path


def validation_seconds(spec: Path) -> float:
    """CPU seconds of one refused validation, as in `lorafarm validate` (a process without torch):
    CPU time, so other processes on a busy machine do not count; the heap earlier tests left here
    (torch, models) frozen, so the garbage collector does not rescan it while the YAML is built."""
    gc.collect()
    gc.freeze()
    try:
        started = time.process_time()
        with pytest.raises(SpecError):
            load_spec_files([spec])
        return time.process_time() - started
    finally:
        gc.unfreeze()


def refused(spec: Path, *expected: str, ledger=None) -> str:
    """Validate in-process (timed), then `validate` and `submit` through the CLI: exit 1, the
    expected words, no traceback, nothing queued. Returns the validate output."""
    assert validation_seconds(spec) < 1.0
    outputs = []
    for command in [["validate"]] + ([["submit"]] if ledger is not None else []):
        result = CliRunner().invoke(app, [*command, str(spec)], env={"COLUMNS": "400"})
        output = " ".join(result.output.split())
        assert result.exit_code == 1, output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in output and "nothing was queued" in output
        for words in expected:
            assert words in output, output
        outputs.append(output)
    if ledger is not None:
        assert ledger.list_jobs() == []
    return outputs[0]


# -- YAML ---------------------------------------------------------------------------------------


def test_alias_bomb_is_refused_before_it_expands(tmp_path, llm, texts, ledger):
    spec = spec_file(tmp_path, llm, texts, BOMB)
    assert len(spec.read_bytes()) < 1000
    refused(spec, "uses YAML aliases (*name) that expand to 1", "Fix: write the values out",
            ledger=ledger)


def test_alias_bomb_in_a_real_process_says_so_without_a_traceback(tmp_path, llm, texts):
    spec = spec_file(tmp_path, llm, texts, BOMB)
    done = subprocess.run([sys.executable, "-m", "lora_farm", "validate", str(spec)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 1, done.stderr
    assert "uses YAML aliases" in done.stderr and "Traceback" not in done.stderr + done.stdout


def test_a_recursive_alias_is_refused(tmp_path, llm, texts):
    refused(spec_file(tmp_path, llm, texts, "tags: &t [a, *t]\n"), "holds a recursive alias")


def test_a_huge_value_is_shown_cut_short(tmp_path, llm, texts):
    """The original hang: the message built repr() of the whole value before cutting it."""
    spec = spec_file(tmp_path, llm, texts, "task: [" + ", ".join(["x" * 1000] * 900) + "]\n")
    output = refused(spec, "`task` must be 'image', 'video' or 'llm', got ['xxx")
    assert len(output) < 2000


def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path, llm, texts, ledger):
    spec = spec_file(tmp_path, llm, texts, "lora_rank: 8\nseed: 1\nlora_rank: 64\n")
    refused(spec, "`lora_rank` is given twice in one mapping, on lines 4 and 6",
            "Fix: keep one of them", ledger=ledger)


def test_twenty_thousand_unknown_keys_print_a_short_list(tmp_path, llm, texts, ledger):
    spec = spec_file(tmp_path, llm, texts, "".join(f"key_{i}: {i}\n" for i in range(20_000)))
    output = refused(spec, "`key_0` is not a job spec key", "… and 19,990 more unknown keys",
                     ledger=ledger)
    assert len(output) < 3000 and "key_10`" not in output


# -- models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, words", [
    ({"w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]}},
     "tensor 'w' needs bytes 0 to 16,384 of the data, but the file holds only 12 bytes after its header"),
    ({"w": {"dtype": "F32", "shape": ["a", 3], "data_offsets": [0, 12]}},
     "tensor 'w' has the shape ['a', 3], not a list of whole numbers"),
    ({"w": {"dtype": "F99", "shape": [3], "data_offsets": [0, 12]}}, "tensor 'w' has the unknown dtype 'F99'"),
    ({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4]}},
     "needs 4,000,000 bytes but its data_offsets [0, 4] hold 4"),
    (["not", "a", "mapping"], "has no valid safetensors header (not a JSON object)"),
], ids=["truncated", "shape", "dtype", "offsets", "list"])
def test_a_forged_safetensors_header_is_refused_naming_file_and_tensor(tmp_path, llm, texts, ledger,
                                                                       header, words):
    raw = json.dumps(header).encode()
    (llm / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 12)
    refused(spec_file(tmp_path, llm, texts, "task: llm\n"), "`base_model`", str(llm / "model.safetensors"),
            words, ledger=ledger)


def test_a_single_file_of_no_released_layout_needs_its_config_folder(tmp_path, images, ledger):
    checkpoint = tmp_path / "custom.safetensors"
    prefix = "model.diffusion_model."
    write_header_only(checkpoint, {prefix + "input_blocks.0.0.weight": [8, 4, 3, 3],
                                   prefix + "middle_block.0.in_layers.2.weight": [32, 32, 3, 3],
                                   "first_stage_model.encoder.conv_in.weight": [8, 3, 3, 3],
                                   "cond_stage_model.transformer.embeddings.weight": [64, 16]})
    refused(spec_file(tmp_path, checkpoint, images), "`base_model_config` is required for the single-file",
            "is not the released sd1 one", "Fix: set `base_model_config`", ledger=ledger)


def test_a_single_file_with_a_unet_only_is_refused(tmp_path, sd, images, ledger):
    checkpoint = tmp_path / "unet-only.safetensors"
    write_header_only(checkpoint, {"model.diffusion_model.input_blocks.0.0.weight": [8, 4, 3, 3]})
    refused(spec_file(tmp_path, checkpoint, images, f"base_model_config: {sd}\n"),
            "`base_model` holds no VAE and no text encoder", "Fix: use a whole checkpoint", ledger=ledger)


def _special(kind: str, path: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))  # the file stays after close
        server.close()
    elif kind == "folder":
        path.mkdir()
    return Path("/dev/zero") if kind == "device" else path


SPECIAL = {"device": "is a character device", "fifo": "is a FIFO (named pipe)",
           "socket": "is a socket", "folder": "is a folder"}


@pytest.mark.parametrize("kind", ["device", "fifo", "socket"])
def test_a_base_model_that_is_a_device_fifo_or_socket_is_named_so(tmp_path, images, ledger, kind):
    base = _special(kind, tmp_path / "m.safetensors")
    output = refused(spec_file(tmp_path, base, images, "task: image\n"), f"{base} {SPECIAL[kind]}",
                     ledger=ledger)
    assert "does not exist" not in output


@pytest.mark.parametrize("kind", ["device", "fifo", "socket", "folder"])
@pytest.mark.parametrize("field", ["metadata_path", "resume_from", "model_file", "data_file"])
def test_a_special_file_where_a_file_is_read_is_named_and_never_opened(tmp_path, sd, llm, images, texts,
                                                                       kind, field):
    if field == "data_file":  # a FIFO named part2.jsonl is not a data file: left out, never opened
        if _special(kind, texts / "part2.jsonl") != texts / "part2.jsonl":
            (texts / "part2.jsonl").symlink_to("/dev/zero")
        assert load_spec_file(spec_file(tmp_path, llm, texts)).spec.task == "llm"
        return
    if field == "model_file":  # a file of a model folder that validation reads the header of
        (sd / "vae").mkdir()
        target = _special(kind, sd / "vae" / "diffusion_pytorch_model.safetensors")
        if kind == "device":
            (sd / "vae" / "diffusion_pytorch_model.safetensors").symlink_to(target)
        refused(spec_file(tmp_path, sd, images), "`base_model`", SPECIAL[kind])
        return
    if field == "resume_from" and kind == "folder":
        return  # an adapter folder is a valid resume_from
    target = _special(kind, tmp_path / "special")
    refused(spec_file(tmp_path, sd, images, f"{field}: {target}\n"), f"`{field}`", SPECIAL[kind])


# -- datasets -------------------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path) -> Path:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"\x89PNG not yours")
    (outside / "secret.txt").write_text("a caption from outside")
    (outside / "secret.jsonl").write_text('{"text": "the worker can read this"}\n')
    return outside


def test_an_image_symlink_out_of_the_dataset_is_refused(tmp_path, sd, images, secret, ledger):
    (images / "c.png").symlink_to(secret / "secret.png")
    (images / "metadata.csv").write_text("file_name,text\na.png,a\nc.png,c\n")
    refused(spec_file(tmp_path, sd, images), "`metadata_path`", f"{images / 'c.png'} leads to "
            f"{secret / 'secret.png'}", "lie outside its folder", "LORAFARM_DATA_ROOTS", ledger=ledger)


def test_a_caption_symlink_out_of_the_dataset_is_refused(tmp_path, sd, images, secret):
    (images / "metadata.csv").unlink()
    (images / "a.txt").write_text("a red circle")
    (images / "b.txt").symlink_to(secret / "secret.txt")
    refused(spec_file(tmp_path, sd, images), "`train_data_dir`", f"{images / 'b.txt'} leads to")


def test_a_metadata_csv_symlinked_out_of_the_dataset_is_refused(tmp_path, sd, images, secret):
    (secret / "metadata.csv").write_text("file_name,text\na.png,a\n")
    (images / "metadata.csv").unlink()
    (images / "metadata.csv").symlink_to(secret / "metadata.csv")
    refused(spec_file(tmp_path, sd, images), f"{images / 'metadata.csv'} leads to")


@pytest.mark.parametrize("file_name", ["../elsewhere/secret.png", "ABSOLUTE", "sub/../../elsewhere/secret.png"])
def test_a_metadata_file_name_leading_out_of_the_dataset_is_refused(tmp_path, sd, images, secret, ledger,
                                                                    file_name):
    file_name = str(secret / "secret.png") if file_name == "ABSOLUTE" else file_name
    (images / "metadata.csv").write_text(f"file_name,text\na.png,a\n{file_name},stolen\n")
    refused(spec_file(tmp_path, sd, images), "`metadata_path`", f"leads to {secret / 'secret.png'}",
            ledger=ledger)


def test_an_llm_data_file_symlinked_out_of_its_folder_is_refused(tmp_path, llm, texts, secret, ledger):
    (texts / "part2.jsonl").symlink_to(secret / "secret.jsonl")
    refused(spec_file(tmp_path, llm, texts), "`train_data_dir`", f"{texts / 'part2.jsonl'} leads to",
            "Fix: copy them into the dataset folder", ledger=ledger)


def test_symlinks_into_a_root_the_operator_allowed_are_accepted(tmp_path, sd, llm, images, texts, secret,
                                                                monkeypatch):
    (images / "c.png").symlink_to(secret / "secret.png")
    (images / "metadata.csv").write_text(f"file_name,text\na.png,a\nc.png,c\n{secret / 'secret.png'},s\n")
    (texts / "part2.jsonl").symlink_to(secret / "secret.jsonl")
    monkeypatch.setenv("LORAFARM_DATA_ROOTS", f"/nonexistent{os.pathsep}{secret}")
    reload_settings()
    for spec in (spec_file(tmp_path, sd, images, name="img"), spec_file(tmp_path, llm, texts, name="txt")):
        result = CliRunner().invoke(app, ["validate", str(spec)], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
    assert len(find_examples(images, None, ".txt")) == 3
    assert [e.response for e in load_examples(texts)][-1] == "the worker can read this"


def test_the_trainer_refuses_a_dataset_that_escaped_after_submit(tmp_path, llm, images, texts, secret):
    """The trainer lists the data with the same functions (``find_examples``, ``load_examples``)."""
    load_spec_file(spec_file(tmp_path, llm, texts))
    (texts / "part2.jsonl").symlink_to(secret / "secret.jsonl")
    (images / "metadata.csv").write_text("file_name,text\na.png,a\n../elsewhere/secret.png,s\n")
    for read in (lambda: load_examples(texts), lambda: find_examples(images, None, ".txt")):
        with pytest.raises(DatasetError, match="lie outside its folder"):
            read()


# -- job ids --------------------------------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["", "   ", "\t"], ids=["empty", "spaces", "tab"])
@pytest.mark.parametrize("command", [["cancel"], ["retry"], ["status"], ["logs"], ["artifacts"],
                                     ["fetch", "{id}", "out"], ["retry-upload"], ["cancel", "{real}", "{id}"]])
def test_an_empty_or_blank_job_id_is_refused_by_every_command(tmp_path, llm, texts, ledger, command, job_id):
    record = ledger.create_jobs([NewJob(load_spec_file(spec_file(tmp_path, llm, texts)).spec, "b", 0, 100)])[0].record
    args = [part.replace("{id}", job_id).replace("{real}", record.id) for part in command]
    args += [] if "{id}" in " ".join(command) else [job_id]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    assert "a job id must not be empty or blank" in result.output and "Traceback" not in result.output
    assert ledger.get(record.id).state == "queued"


def test_cancel_of_an_empty_id_in_a_real_process_cancels_nothing(farm_env, tmp_path, llm, texts, ledger):
    record = ledger.create_jobs([NewJob(load_spec_file(spec_file(tmp_path, llm, texts)).spec, "b", 0, 100)])[0].record
    done = subprocess.run([sys.executable, "-m", "lora_farm", "cancel", ""], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **farm_env, "COLUMNS": "300"})
    assert done.returncode == 1 and "a job id must not be empty" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and ledger.get(record.id).state == "queued"

