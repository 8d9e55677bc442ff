"""Job specs: the lora-scripts fields, YAML quirks, paths, errors that name file/field/value/fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_farm.cli import app
from lora_farm.errors import SpecError
from lora_farm.jobs.loader import load_resolved, load_spec_file, load_spec_files, write_resolved
from lora_farm.jobs.spec import ImageJobSpec, LlmJobSpec, parse_duration, spec_from_dict
from lora_farm.settings import reload_settings

SPECS = Path(__file__).parent / "specs"
REPO = Path(__file__).parent.parent
BROKEN = sorted((SPECS / "broken").glob("*.yaml"))


@pytest.fixture(autouse=True)
def output_root_is_repo_output(monkeypatch):
    monkeypatch.setenv("LORAFARM_OUTPUT_ROOT", str(REPO / "output"))
    monkeypatch.chdir(REPO)
    reload_settings()
    yield
    reload_settings()


def expected_field(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    match = re.match(r"# expect: (\S+)", first)
    assert match, f"{path} must start with '# expect: <field>'"
    return match.group(1)


def test_there_are_at_least_25_broken_specs():
    assert len(BROKEN) >= 25


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_each_broken_spec_fails_naming_its_field(path):
    field = expected_field(path)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert str(path) in result.output
    if field != "FILE":
        assert f"`{field}`" in result.output
    with pytest.raises(SpecError) as caught:
        load_spec_file(path)
    problem = caught.value.problems[0]
    assert problem.file == str(path)
    assert problem.field == ("" if field == "FILE" else field)
    assert problem.fix, f"{path}: the error must say how to fix it"


def test_all_problems_of_all_files_in_one_run_and_no_traceback():
    files = [str(p) for p in BROKEN] + [str(SPECS / "valid" / "llm.yaml")]
    run = subprocess.run([sys.executable, "-m", "lora_farm", "validate", *files],
                         capture_output=True, text=True, cwd=REPO, env=os.environ | {"COLUMNS": "300"})
    assert run.returncode == 1
    assert "Traceback" not in run.stderr + run.stdout
    for path in BROKEN:
        assert str(path) in run.stderr
    assert f"in {len(BROKEN)} of {len(files)} file(s)" in run.stderr


def test_valid_specs_validate():
    loaded = load_spec_files(sorted((SPECS / "valid").glob("*.yaml")))
    assert {item.spec.task for item in loaded} == {"image", "llm"}


def test_lora_scripts_config_submits_unchanged_with_yaml_1_1_float():
    item = load_spec_file(SPECS / "valid" / "lora_scripts.yaml")
    spec = item.spec
    assert isinstance(spec, ImageJobSpec)
    assert spec.learning_rate == pytest.approx(2e-4)
    assert (spec.lora_rank, spec.batch_size, spec.epochs, spec.save_steps) == (8, 2, 10, 100)
    assert spec.name == "lora_scripts"
    assert spec.train_data_dir == REPO / "tests/specs/data/images"
    assert spec.output_dir == REPO / "output"
    assert any("current directory" in note for note in item.notes), "validate must say it used the cwd"


def test_paths_resolve_beside_the_yaml_first(tmp_path):
    spec = load_spec_file(SPECS / "valid" / "llm.yaml").spec
    assert spec.base_model == SPECS / "models" / "llm"
    assert spec.base_model.is_absolute()


def test_home_and_env_vars_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEC_MODELS", str(SPECS / "models"))
    monkeypatch.setenv("HOME", str(SPECS / "data"))
    path = tmp_path / "envjob.yaml"
    path.write_text("base_model: $SPEC_MODELS/llm\ntrain_data_dir: ~/text.jsonl\n")
    spec = load_spec_file(path).spec
    assert spec.base_model == SPECS / "models" / "llm"
    assert spec.train_data_dir == SPECS / "data" / "text.jsonl"


def test_yaml_1_2_scalars(tmp_path):
    path = tmp_path / "quirks.yaml"
    path.write_text(f"base_model: {SPECS}/models/llm\ntrain_data_dir: {SPECS}/data/text.jsonl\n"
                    "learning_rate: 5e-5\ntags: [no, on, 1:30]\ntimeout: 1h30m\n")
    spec = load_spec_file(path).spec
    assert spec.learning_rate == pytest.approx(5e-5)
    assert spec.tags == ["no", "on", "1:30"]  # YAML 1.1 would give False, True, 90
    assert spec.timeout == 5400


def test_task_is_inferred_and_unclear_task_is_an_error(tmp_path):
    assert isinstance(load_spec_file(SPECS / "valid" / "llm.yaml").spec, LlmJobSpec)
    (tmp_path / "data").mkdir()
    path = tmp_path / "unclear.yaml"
    path.write_text("base_model: ./nothing\ntrain_data_dir: ./data\n")
    with pytest.raises(SpecError) as caught:
        load_spec_file(path)
    assert "task" in {problem.field for problem in caught.value.problems}


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(SpecError) as caught:
        load_spec_file(SPECS / "broken" / "unknown_key.yaml")
    assert "`lora_rank`" in caught.value.problems[0].fix


def test_config_hash_is_stable_over_order_and_formatting(tmp_path):
    base = f"base_model: {SPECS}/models/llm\ntrain_data_dir: {SPECS}/data/text.jsonl\n"
    one, two = tmp_path / "a" / "job.yaml", tmp_path / "b" / "job.yaml"
    one.parent.mkdir(), two.parent.mkdir()
    one.write_text(base + "lora_rank: 8\nlearning_rate: 0.0002\n")
    two.write_text("learning_rate: 2e-4   # same\nlora_rank: 8\n" + base)
    first, second = load_spec_file(one).spec, load_spec_file(two).spec
    assert first.config_hash() == second.config_hash()
    second.lora_rank = 16
    assert first.config_hash() != second.config_hash()


def test_resolved_spec_round_trips(tmp_path):
    spec = load_spec_file(SPECS / "valid" / "full_image.yaml").spec
    resolved = write_resolved(spec, tmp_path / "config.resolved.yaml")
    again = load_spec_file(resolved).spec
    assert again == spec
    assert again.config_hash() == spec.config_hash()


def test_a_resolved_spec_is_loaded_as_it_is_not_validated_again(tmp_path):
    """The trainer's load of a config.resolved.yaml: no filesystem checks (they ran at submit;
    the trainer reads every record itself before its first step), only that the data and model
    are still there."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(f"base_model: {SPECS}/models/llm\ntrain_data_dir: {data}\n")
    resolved = write_resolved(load_spec_file(path).spec, tmp_path / "config.resolved.yaml")
    data.write_text('{"title": "no text"}\n')  # full validation rejects it now; not asked again
    with pytest.raises(SpecError):
        load_spec_file(resolved)
    assert load_resolved(resolved).spec == load_spec_file(path, check_files=False).spec
    data.unlink()
    with pytest.raises(SpecError) as caught:
        load_resolved(resolved)
    problem = caught.value.problems[0]
    assert (problem.file, problem.field) == (str(resolved), "train_data_dir")
    assert str(data) in problem.message and problem.fix


def test_a_records_spec_data_is_written_as_the_spec_itself_would_be(tmp_path):
    spec = load_spec_file(SPECS / "valid" / "full_image.yaml").spec
    record_data = dict(sorted(spec.to_yaml_dict().items()))  # a ledger record keeps keys sorted
    from_spec = write_resolved(spec, tmp_path / "a.yaml").read_text()
    assert write_resolved(record_data, tmp_path / "b.yaml").read_text() == from_spec


def test_duplicate_names_in_one_submit_are_an_error(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.yaml").write_text(
            f"base_model: {SPECS}/models/llm\ntrain_data_dir: {SPECS}/data/text.jsonl\n")
    with pytest.raises(SpecError) as caught:
        load_spec_files([tmp_path / "x" / "same.yaml", tmp_path / "y" / "same.yaml"])
    assert caught.value.problems[0].field == "name"


@pytest.mark.parametrize("text,seconds", [("90m", 5400), ("6h", 21600), ("1h30m", 5400),
                                          ("2d", 172800), ("45s", 45), ("3600", 3600), (120, 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_spec_from_dict_requires_a_task():
    with pytest.raises(ValueError, match="task"):
        spec_from_dict({"name": "x"})


def test_resolved_spec_keeps_strings_that_look_like_numbers(tmp_path):
    path = tmp_path / "tricky.yaml"
    path.write_text(f"name: '1e5'\nbase_model: {SPECS}/models/llm\ntrain_data_dir: {SPECS}/data/text.jsonl\n"
                    "tags: ['1e3', 'true', '0x1f']\n")
    spec = load_spec_file(path).spec
    again = load_spec_file(write_resolved(spec, tmp_path / "out" / "config.resolved.yaml")).spec
    assert again.name == "1e5" and again.tags == ["1e3", "true", "0x1f"]
    assert again == spec


def test_trainer_side_load_skips_the_output_root_check(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(f"base_model: {SPECS}/models/llm\ntrain_data_dir: {SPECS}/data/text.jsonl\n"
                    f"output_dir: {REPO / 'output'}\n")
    elsewhere = tmp_path / "job_dir"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # a relative output root now points somewhere else
    os.environ["LORAFARM_OUTPUT_ROOT"] = "output"
    reload_settings()
    with pytest.raises(SpecError):
        load_spec_file(path)
    assert load_spec_file(path, check_output=False).spec.output_dir == REPO / "output"


def test_one_run_reports_disk_problems_behind_schema_errors(tmp_path):
    """A typo and three bad values no longer hide the missing dataset and the bad output_dir."""
    path = tmp_path / "many.yaml"
    path.write_text(f"base_model: {SPECS}/models/llm\ntrain_data_dir: ./no-such-data.jsonl\n"
                    "lora_rnak: 8\ntimeout: 1:30\nlora_rank: -4\nbatch_size: four\n"
                    "output_dir: /etc/lora\n")
    with pytest.raises(SpecError) as caught:
        load_spec_file(path)
    fields = [problem.field for problem in caught.value.problems]
    assert fields == ["lora_rnak", "timeout", "lora_rank", "batch_size", "output_dir",
                      "train_data_dir"]
    assert "no-such-data.jsonl" in str(caught.value) and "/etc/lora" in str(caught.value)


def test_a_failed_field_hides_only_the_checks_that_read_it(tmp_path):
    """Without a base model the dataset is still checked; a bad caption_extension does not turn
    into a false 'images without .txt captions' (its default) problem."""
    path = tmp_path / "partial.yaml"
    path.write_text(f"task: image\ntrain_data_dir: {SPECS}/data/sidecar\ncaption_extension: txt\n"
                    "output_dir: /etc/lora\n")
    with pytest.raises(SpecError) as caught:
        load_spec_file(path)
    assert [p.field for p in caught.value.problems] == ["base_model", "caption_extension",
                                                        "output_dir"]
    path.write_text(f"task: llm\ntrain_data_dir: {SPECS}/data/empty.jsonl\n")
    with pytest.raises(SpecError) as caught:
        load_spec_file(path)
    assert [p.field for p in caught.value.problems] == ["base_model", "train_data_dir"]


@pytest.mark.parametrize("value", ["meta-llama/Llama-3.1-8B", "stabilityai/sdxl-turbo", "a_b/c.d-1"])
def test_base_model_id_takes_hub_ids(value, tmp_path):
    path = tmp_path / "hub.yaml"
    path.write_text(f"base_model: {SPECS}/models/llm\ntrain_data_dir: {SPECS}/data/text.jsonl\n"
                    f"base_model_id: {value}\n")
    spec = load_spec_file(path).spec
    assert spec.base_model_id == spec.base_model_ref == value


@pytest.mark.parametrize("value", ["/models/llama", "./llama", "gpt2", "org/name/extra", "org/a--b",
                                   "org/-x", "~/m", "https://huggingface.co/org/m"])
def test_base_model_id_rejects_paths_and_odd_shapes(value, tmp_path):
    path = tmp_path / "hub.yaml"
    path.write_text(f"base_model: {SPECS}/models/llm\ntrain_data_dir: {SPECS}/data/text.jsonl\n"
                    f"base_model_id: '{value}'\n")
    with pytest.raises(SpecError) as caught:
        load_spec_file(path)
    (problem,) = caught.value.problems
    assert problem.field == "base_model_id" and repr(value) in problem.message
    assert "org/name" in problem.message and problem.fix


def test_without_base_model_id_adapters_name_the_folder_not_the_path():
    spec = load_spec_file(SPECS / "valid" / "llm.yaml").spec
    assert spec.base_model_id is None and spec.base_model_ref == "llm"


# -- single-file checkpoints: validation asks the trainer's rule ------------------------------

def _single_file_spec(tmp_path: Path, base_model: Path, **fields) -> Path:
    spec = tmp_path / "single.yaml"
    data = {"base_model": str(base_model), "train_data_dir": str(SPECS / "data" / "images"),
            "vram_gb": 6, **{k: str(v) for k, v in fields.items()}}
    spec.write_text("\n".join(f"{k}: {v}" for k, v in data.items()) + "\n")
    return spec


def test_single_file_without_config_is_refused_at_validation(tmp_path, tiny_sd_single_file):
    spec = _single_file_spec(tmp_path, tiny_sd_single_file)
    result = CliRunner().invoke(app, ["validate", str(spec)], env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    for expected in (str(spec), "`base_model_config` is required", str(tiny_sd_single_file), "Fix:"):
        assert expected in output


@pytest.mark.parametrize("config", ["tiny_sd", "tiny_sdxl", "nowhere"])
def test_single_file_config_folder_is_checked_like_the_trainer_does(tmp_path, request, tiny_sd_single_file,
                                                                    config):
    folder = tmp_path / "nowhere" if config == "nowhere" else request.getfixturevalue(config)
    spec = _single_file_spec(tmp_path, tiny_sd_single_file, base_model_config=folder)
    result = CliRunner().invoke(app, ["validate", str(spec)], env={"COLUMNS": "400"})
    if config == "tiny_sd":
        assert result.exit_code == 0, result.output
        return
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "`base_model_config`" in output and "Fix:" in output
    if config == "tiny_sdxl":
        assert "is a sdxl model but the checkpoint" in output
