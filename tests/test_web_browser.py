"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven by
playwright) against a real farm: Redis, a real ``celery worker``, a tiny job, and ``lorafarm web``
as its own process. The pages' screenshots go to $TMPDIR/lorafarm-web-shots/, or with
``LORAFARM_SCREENSHOTS=1`` to docs/web-*.png, the README's (so a plain test run leaves the
checkout as it was).

Without /usr/bin/chromium these tests skip, except in CI (CI=true), where they fail: `.ci/run`
installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml

from bench.fill_ledger import fill_ledger
from lora_farm.submit import submit_files
from tests.fixtures_farm import REPO, wait_until, write_spec

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "docs" if os.environ.get("LORAFARM_SCREENSHOTS") == "1" else Path(
    tempfile.gettempdir()) / "lorafarm-web-shots"
TOKEN = "browser-test-token-0123456789"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI: /usr/bin/chromium is missing; `.ci/run` installs it (apt-get install chromium)")
        pytest.skip("no /usr/bin/chromium (apt-get install chromium); CI runs these tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        # the sandbox needs user namespaces that containers and root shells often lack
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    yield context.new_page()
    context.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def web(farm_env, tmp_path):
    """`lorafarm web` on a free port, as a user starts it; its URL."""
    port = free_port()
    log = open(tmp_path / "web.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "lora_farm", "web", "--port", str(port)],
                               env={**farm_env, "LORAFARM_WEB_TOKEN": TOKEN}, cwd=REPO,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url) or process.poll() is not None, 60, "lorafarm web to answer")
        assert process.poll() is None, (tmp_path / "web.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def shot(page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"web-{name}.png"), full_page=True)


def step_shown(page) -> int:
    text = page.locator("#progress").inner_text()
    return int(text.split("Step ", 1)[1].split("/", 1)[0]) if "Step " in text else 0


def test_a_job_appears_advances_draws_its_loss_and_is_cancelled_with_the_token(
        page, web, ledger, celery_workers, tiny_llm, text_dataset, tmp_path):
    celery_workers.start("gpu0", concurrency=1, timeout=300)
    page.goto(f"{web}/jobs")
    assert page.locator("tr[data-job]").count() == 0
    spec = write_spec(tmp_path, "web-llm", tiny_llm, text_dataset, "llm", max_steps=5000,
                      save_steps=5000)
    (job,) = submit_files([spec], ledger, batch="browser").jobs
    row = page.locator(f'tr[data-job="{job.record.id}"]')
    row.wait_for(timeout=20_000)  # no reload: the table refreshes itself
    page.locator(f'tr[data-job="{job.record.id}"] td.state', has_text="running").wait_for(timeout=240_000)

    page.goto(f"{web}/jobs/{job.record.id}")
    wait_until(lambda: step_shown(page) > 0, 240, "the first progress on the page", poll=1)
    first = step_shown(page)
    wait_until(lambda: step_shown(page) > first, 120, "the progress to advance", poll=1)
    points = page.locator('#loss-chart polyline[data-series="loss"]')
    wait_until(lambda: points.count() and int(points.get_attribute("data-points")) >= 2, 120,
               "two loss points on the chart", poll=1)
    shot(page, "job")
    page.goto(f"{web}/cards")
    page.get_by_text("web-llm").first.wait_for(timeout=10_000)  # the job on its card
    shot(page, "cards")
    page.goto(f"{web}/jobs")
    shot(page, "jobs")

    page.goto(f"{web}/jobs/{job.record.id}")
    page.click("#cancel")  # no token entered
    assert "token is missing or wrong" in page.locator("#message").inner_text()
    assert ledger.get(job.record.id).state == "running" and not ledger.cancel_requested(job.record.id)
    page.fill("#token", TOKEN)
    page.click("#cancel")
    assert "stopping" in page.locator("#message").inner_text()
    page.locator("#state", has_text="cancelled").wait_for(timeout=120_000)
    assert ledger.get(job.record.id).state == "cancelled"


def test_the_submit_form_shows_a_spec_error(page, web, ledger, farm_env, text_dataset, tmp_path):
    page.goto(f"{web}/submit")
    page.fill("#token", TOKEN)
    bad = {"name": "typo", "base_model": str(tmp_path / "no-such-model"),
           "train_data_dir": str(text_dataset), "lora_rnk": 8}
    page.fill("#yaml", yaml.safe_dump(bad))
    page.click("#submit")
    problems = page.locator("#problems").inner_text()
    assert "pasted.yaml: `lora_rnk`" in problems and "lora_rank" in problems  # the nearest key
    assert "nothing was queued" in problems and ledger.list_jobs() == []
    shot(page, "submit")


def test_the_sample_grid_shows_images(page, web, ledger, image_dataset, tmp_path):
    """Rows = prompts, columns = steps, from a job folder laid out as the samples contract says
    (the dataset's pictures stand for rendered samples)."""
    (job_id,) = fill_ledger(ledger, finished=1, running=0, tag="grid")
    folder = tmp_path / "job"
    pictures = sorted(image_dataset.glob("*.png"))
    prompts = [{"index": i, "prompt": p, "negative": "", "width": 64, "height": 64, "steps": 8,
                "guidance": 5.0, "seed": i} for i, p in enumerate(("a red circle", "a blue square"))]
    (folder / "samples").mkdir(parents=True)
    (folder / "samples" / "prompts.json").write_text(json.dumps(prompts))
    events = []
    for column, step in enumerate((50, 100, 150)):
        out = folder / "samples" / f"step-{step:06d}"
        out.mkdir()
        for i in range(2):
            shutil.copy(pictures[(column + 3 * i) % len(pictures)], out / f"{i:02d}.png")
        events.append({"event": "sample", "step": step,
                       "files": [f"samples/step-{step:06d}/{i:02d}.png" for i in range(2)]})
    events += [{"event": "progress", "step": s, "total_steps": 150, "loss": 0.5 / (1 + s / 30),
                "lr": 1e-4 * min(1.0, s / 20), "it_s": 3.2} for s in range(5, 151, 5)]
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    ledger.update(job_id, {"job_dir": str(folder)})
    page.goto(f"{web}/jobs/{job_id}")
    images = page.locator("#samples img.sample")
    assert images.count() == 6
    wait_until(lambda: all(images.nth(i).evaluate("img => img.naturalWidth") == 64 for i in range(6)),
               20, "the sample images to load")
    shot(page, "samples")


def _samples_merged() -> bool:
    from lora_farm.jobs.spec import JobSpec

    return "sample_prompts" in JobSpec.model_fields


@pytest.mark.skipif(not _samples_merged(), reason="the trainer renders no samples yet (spec has no "
                    "`sample_prompts`): rebase onto the samples work")
def test_a_real_image_job_shows_its_sample_grid_and_ships_it(page, web, ledger, celery_workers,
                                                            tiny_sd, image_dataset, tmp_path):
    celery_workers.start("gpu0", concurrency=1, timeout=300)
    prompts = ["a red circle", "a blue square"]
    spec = write_spec(tmp_path, "web-img", tiny_sd, image_dataset, "image", max_steps=2,
                      sample_prompts=prompts, sample_every_steps=1, sample_steps=2)
    (job,) = submit_files([spec], ledger, batch="browser").jobs
    page.goto(f"{web}/jobs/{job.record.id}")
    page.locator("#state", has_text="succeeded").wait_for(timeout=400_000)
    columns = page.locator("#samples thead th").count() - 1
    images = page.locator("#samples img.sample")
    assert columns >= 1 and images.count() == len(prompts) * columns
    for prompt in prompts:
        assert page.locator("#samples th.prompt", has_text=prompt).count() == 1
    wait_until(lambda: all(images.nth(i).evaluate("img => img.naturalWidth") > 0
                           for i in range(images.count())), 20, "the sample images to load")
    shipped = page.locator("#artifacts td a", has_text="samples/").count()
    assert shipped >= images.count()  # the grid is in the uploaded artifacts too
    shot(page, "samples-farm")
