"""The dashboard over HTTP (Starlette's TestClient, in process) on the real Redis ledger: pages,
pagination, the job page from a job folder written as the trainer and the sample renderer write
it, files, cards, the token rules, and actions through the CLI's own functions."""

from __future__ import annotations

import html
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient

from bench.fill_ledger import fill_ledger
from lora_farm.errors import ConfigError, SpecError
from lora_farm.jobs.loader import load_spec_files
from lora_farm.ledger import transitions as tr
from lora_farm.settings import get_settings
from lora_farm.web.app import WebConfig, create_app
from lora_farm.web.serve import web_config
from lora_farm.workers.dispatch import publish_gpu
from lora_farm.workers.lifecycle import cancel

TOKEN = "t0ken-for-the-web-tests"


def client_for(ledger, token: str = TOKEN, guard_reads: bool = False,
               client: tuple[str, int] = ("127.0.0.1", 50000)) -> TestClient:
    return TestClient(create_app(ledger, get_settings(), WebConfig(token, guard_reads)),
                      client=client, follow_redirects=False)


def png(width: int = 4, height: int = 4) -> bytes:
    """A real (grey) PNG, written by hand: no Pillow on the farm side."""
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_job_folder(folder: Path, steps: int = 6) -> None:
    """events.jsonl, samples (2 prompts x steps 2 and 4), train.log and manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    events = [{"event": "progress", "step": s, "total_steps": steps, "loss": 1.0 / s, "lr": 1e-4 * s,
               "it_s": 2.5, "eta_s": 3.0, "peak_vram_mb": 512.0} for s in range(1, steps + 1)]
    events.append({"event": "eval", "step": 4, "eval_loss": 0.3})
    prompts = [{"index": i, "prompt": f"a red square {i}", "negative": "", "width": 64,
                "height": 64, "steps": 4, "guidance": 5.0, "seed": i} for i in range(2)]
    (folder / "samples").mkdir(exist_ok=True)
    (folder / "samples" / "prompts.json").write_text(json.dumps(prompts))
    for step in (2, 4):
        step_dir = folder / "samples" / f"step-{step:06d}"
        step_dir.mkdir(exist_ok=True)
        files = []
        for i in range(2):
            (step_dir / f"{i:02d}.png").write_bytes(png())
            files.append(f"samples/step-{step:06d}/{i:02d}.png")
        events.append({"event": "sample", "step": step, "files": files})
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (folder / "train.log").write_text("=== attempt 1 ===\nEpoch 1/1 | Step 6/6 | Loss 0.167\n")
    (folder / "web.safetensors").write_bytes(b"weights")
    (folder / "manifest.json").write_text(json.dumps({"files": [
        {"path": "web.safetensors", "size": 7, "sha256": "ab" * 32, "uri": "s3://b/web.safetensors"}]}))


def test_jobs_page_is_paginated_newest_first_and_filters(ledger):
    ids = fill_ledger(ledger, finished=55, running=3)
    client = client_for(ledger)
    first = client.get("/jobs")
    assert first.status_code == 200
    rows = re.findall(r'data-job="(\w+)"', first.text)
    assert rows == list(reversed(ids))[:50]  # newest first, 50 a page
    assert "page 1 of 2 (58 jobs)" in first.text and "55 succeeded" in first.text
    second = client.get("/jobs?page=2")
    assert re.findall(r'data-job="(\w+)"', second.text) == list(reversed(ids))[50:]
    running = client.get("/jobs/table?state=running")
    assert re.findall(r'data-job="(\w+)"', running.text) == list(reversed(ids[-3:]))
    assert "Step 85/250 34%" in running.text
    assert client.get("/jobs?batch=nope").text.count("data-job=") == 0
    assert "nightly" in client.get("/batches").text


def test_job_page_draws_curves_samples_log_artifacts_and_timeline(ledger, tmp_path):
    (job_id,) = fill_ledger(ledger, finished=0, running=1)
    folder = tmp_path / "job"
    write_job_folder(folder)
    ledger.update(job_id, {"job_dir": str(folder)})
    client = client_for(ledger)
    page = client.get(f"/jobs/{job_id[:6]}")  # a prefix, as the CLI takes
    assert page.status_code == 200
    loss = re.search(r'<polyline class="series s0" data-series="loss" data-points="(\d+)"', page.text)
    assert loss and loss.group(1) == "6"
    assert 'data-series="eval loss" data-points="1"' in page.text
    assert 'data-series="learning rate" data-points="6"' in page.text
    assert "2.50 it/s" in page.text
    images = re.findall(r'<img class="sample" src="([^"]+)"', page.text)
    assert len(images) == 4 and images[0].endswith("samples/step-000002/00.png")
    assert page.text.index("a red square 0") < page.text.index("a red square 1")  # rows = prompts
    assert client.get(images[0]).content == png()
    assert "Step 6/6 | Loss 0.167" in page.text  # the log
    assert "ab" * 32 in page.text and "web.safetensors?download=1" in page.text
    download = client.get(f"/jobs/{job_id}/files/web.safetensors?download=1")
    assert download.content == b"weights" and "attachment" in download.headers["content-disposition"]
    assert "submitted" in page.text and ">running<" in page.text  # the timeline
    assert client.get(f"/jobs/{job_id}/files/../../etc/passwd").status_code == 404
    live = client.get(f"/jobs/{job_id}/live")
    assert live.status_code == 200 and "<html" not in live.text and "data-points" in live.text
    assert client.get("/jobs/doesnotexist").status_code == 404


def test_cards_page_shows_memory_reservations_jobs_and_heartbeat(ledger):
    (job_id,) = fill_ledger(ledger, finished=0, running=1)  # holds 6 GB on gpu0
    publish_gpu(ledger, {"uuid": "gpu0", "name": "Declared 24GiB", "index": 0, "host": "node0",
                         "total_mb": 24576.0, "free_mb": 20000.0, "source": "declared"}, "w0@node0", 2)
    text = client_for(ledger).get("/cards").text
    assert "gpu0" in text and "24.0 GB" in text and "19.5 GB" in text and "6.0 GB" in text
    assert f'href="/jobs/{job_id}"' in text and "online" in text and "ago" in text


def test_actions_need_the_token_and_say_so(ledger):
    ids = fill_ledger(ledger, finished=1, running=1, tag="act")
    running = ids[-1]
    off = client_for(ledger, token="").post(f"/jobs/{running}/cancel", data={"token": "x"})
    assert off.status_code == 403 and "actions are off" in off.text
    client = client_for(ledger)
    refused = client.post(f"/jobs/{running}/cancel", data={"token": "wrong"})
    assert refused.status_code == 403 and "token is missing or wrong" in refused.text
    assert not ledger.cancel_requested(running)
    done = client.post(f"/jobs/{running}/cancel", headers={"X-Lorafarm-Token": TOKEN})
    assert done.status_code == 200 and "stopping" in done.text  # what `lorafarm cancel` says
    assert ledger.cancel_requested(running)
    again = client.post(f"/jobs/{ids[0]}/retry", data={"token": TOKEN})
    assert again.status_code == 409 and "only failed or cancelled jobs can be retried" in again.text


def test_retry_queues_a_cancelled_job_again(ledger):
    (job_id,) = fill_ledger(ledger, finished=0, running=1)
    tr.finish_cancelled(ledger, job_id, expect={tr.S.RUNNING})
    assert cancel(ledger, job_id) == "already cancelled"
    response = client_for(ledger).post(f"/jobs/{job_id}/retry", data={"token": TOKEN})
    assert response.status_code == 200 and "queued again (attempt 2)" in response.text
    assert ledger.get(job_id).state == "queued"


def test_submit_shows_the_cli_errors_and_queues_a_valid_spec(ledger, farm_env, tiny_llm,
                                                             text_dataset, tmp_path):
    bad = {"name": "bad one", "base_model": str(tmp_path / "missing"), "lora_rank": -4,
           "train_data_dir": str(text_dataset), "learning_rat": 1e-4}
    text = yaml.safe_dump(bad)
    client = client_for(ledger)
    refused = client.post("/submit", data={"yaml": text})
    assert refused.status_code == 403 and "token" in refused.text
    shown = client.post("/submit", data={"yaml": text, "token": TOKEN})
    assert shown.status_code == 422 and "nothing was queued" in shown.text
    cli_file = tmp_path / "pasted.yaml"
    cli_file.write_text(text)
    with pytest.raises(SpecError) as cli:
        load_spec_files([cli_file])
    page = html.unescape(shown.text)
    for problem in cli.value.problems:  # the CLI's very words, the file named as given
        assert "✗ " + str(problem).replace(str(cli_file), "pasted.yaml") in page
    assert "learning_rate" in shown.text  # the nearest valid key
    good = {"name": "web-llm", "task": "llm", "base_model": str(tiny_llm),
            "train_data_dir": str(text_dataset), "max_steps": 2, "max_seq_len": 32}
    upload = client.post("/submit", data={"token": TOKEN, "batch": "webtest"},
                         files={"file": ("web-llm.yaml", yaml.safe_dump(good), "application/x-yaml")})
    assert upload.status_code == 200 and "queued" in upload.text
    (record,) = ledger.list_jobs(batch="webtest")
    assert record.name == "web-llm" and record.state in ("queued", "scheduled")


def test_address_and_token_rules():
    assert web_config("127.0.0.1", "").token == ""
    with pytest.raises(ConfigError, match="refusing to listen on '0.0.0.0' without a token"):
        web_config("0.0.0.0", "")
    with pytest.raises(ConfigError, match="at least 16"):
        web_config("0.0.0.0", "short")
    assert web_config("0.0.0.0", TOKEN).guard_reads
    assert not web_config("::1", TOKEN).guard_reads


def test_reads_from_another_host_need_the_token(ledger):
    outside = client_for(ledger, guard_reads=True, client=("10.1.2.3", 40000))
    assert outside.get("/jobs").status_code == 303  # to /login
    assert outside.get("/jobs", headers={"X-Lorafarm-Token": TOKEN}).status_code == 200
    assert outside.post("/login", data={"token": "wrong"}).status_code == 403
    login = outside.post("/login", data={"token": TOKEN})
    assert login.status_code == 303 and outside.get("/jobs").status_code == 200  # the cookie
    local = client_for(ledger, guard_reads=True)
    assert local.get("/jobs").status_code == 200
    assert outside.get("/static/live.js").status_code == 200


def test_lorafarm_web_refuses_a_public_address_without_a_token():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LORAFARM_WEB_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "lora_farm", "web", "--host", "0.0.0.0"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "refusing to listen on '0.0.0.0' without a token" in " ".join(result.stderr.split())


def test_the_login_cookie_is_no_token_for_actions_and_a_dead_ledger_says_so(ledger):
    from lora_farm.ledger import Ledger
    from lora_farm.redis_conn import make_client
    from tests.fixtures_s3 import free_port

    (job_id,) = fill_ledger(ledger, finished=0, running=1)
    outside = client_for(ledger, guard_reads=True, client=("10.1.2.3", 40000))
    outside.post("/login", data={"token": TOKEN})
    refused = outside.post(f"/jobs/{job_id}/cancel", data={})  # the cookie alone
    assert refused.status_code == 403 and not ledger.cancel_requested(job_id)
    dead = Ledger(make_client(f"redis://127.0.0.1:{free_port()}/0"), ledger.keys.prefix)
    page = client_for(dead).get("/jobs")
    assert page.status_code == 503 and "the ledger does not answer" in page.text
