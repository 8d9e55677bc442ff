"""What the job page reads from a job folder: the sample grid (from events, else the folders),
the curves, the log tail, and files that cannot escape the folder."""

from __future__ import annotations

import json

from lora_farm.web.jobdir import file_in_job, log_tail, read_curves, sample_grid


def write_samples(folder, steps=(10, 20), count=2, suffix=".png"):
    for step in steps:
        out = folder / "samples" / f"step-{step:06d}"
        out.mkdir(parents=True)
        for i in range(count):
            (out / f"{i:02d}{suffix}").write_bytes(b"x")


def test_the_grid_comes_from_the_folders_when_no_sample_event_says_more(tmp_path):
    write_samples(tmp_path)
    (tmp_path / "samples" / "prompts.json").write_text(json.dumps(
        [{"index": 0, "prompt": "a cat"}, {"index": 1, "prompt": "a dog"}]))
    (tmp_path / "samples" / "step-000020" / "01.png").unlink()  # a missing render
    grid = sample_grid(tmp_path, [])
    assert grid.steps == [10, 20] and [p["prompt"] for p in grid.prompts] == ["a cat", "a dog"]
    assert grid.cells == [["samples/step-000010/00.png", "samples/step-000020/00.png"],
                          ["samples/step-000010/01.png", None]]


def test_events_name_the_files_and_llm_samples_are_text(tmp_path):
    write_samples(tmp_path, steps=(5,), count=1, suffix=".txt")
    events = [{"event": "sample", "step": 5, "files": ["samples/step-000005/00.txt"]}]
    grid = sample_grid(tmp_path, events)  # no prompts.json: one row per index seen
    assert grid.steps == [5] and grid.prompts == [{"index": 0, "prompt": "prompt 0"}]
    assert grid.cells == [["samples/step-000005/00.txt"]]
    assert not sample_grid(tmp_path / "nothing", [])


def test_curves_keep_the_last_value_of_a_step_and_skip_nan(tmp_path):
    events = [{"event": "progress", "step": 1, "loss": 2.0, "lr": 0.1, "it_s": 1.5},
              {"event": "progress", "step": 1, "loss": 1.0},  # a resumed attempt redoes step 1
              {"event": "progress", "step": 2, "loss": float("nan"), "it_s": 2.0},
              {"event": "eval", "step": 2, "eval_loss": 0.7}, {"event": "phase", "phase": "train"}]
    curves = read_curves(events)
    assert curves.loss == [(1, 1.0)] and curves.lr == [(1, 0.1)]
    assert curves.eval_loss == [(2, 0.7)] and curves.it_s == 2.0


def test_the_log_tail_starts_at_a_line_and_files_stay_inside_the_job(tmp_path):
    (tmp_path / "train.log").write_text("".join(f"line {i}\n" for i in range(10_000)))
    tail = log_tail(tmp_path, size=100)
    assert tail.startswith("line ") and tail.endswith("line 9999\n")
    assert log_tail(tmp_path / "none") == ""
    (tmp_path / "link").symlink_to("/etc/hostname")
    assert file_in_job(tmp_path, "link") is None
    assert file_in_job(tmp_path, "../" + tmp_path.name + "/train.log") == (tmp_path / "train.log").resolve()
    assert file_in_job(tmp_path, "../../etc/hostname") is None
