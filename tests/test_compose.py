"""docker-compose.yml, its GPU override, the worker image and the systemd units, checked by structure.

No Docker engine runs here: these tests parse the files and check what `docker compose up` relies
on (services, volumes, healthchecks, one GPU per worker) and that every command they run is a real
`lorafarm` verb with real options.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import click
import pytest
import typer
import yaml

from lora_farm.cli import app

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "docker-compose.yml"
OVERRIDE = REPO / "deploy" / "compose.gpus.yml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def workers(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if name.startswith("worker-gpu")}


def cli_verbs() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands


def check_lorafarm_argv(argv: list[str]) -> None:
    """``lorafarm VERB --opt ...``: the verb exists and so does every option it passes."""
    assert argv[0].endswith("lorafarm"), argv
    verbs = cli_verbs()
    assert argv[1] in verbs, f"`lorafarm {argv[1]}` is not a command (have: {sorted(verbs)})"
    options = {opt for param in verbs[argv[1]].params for opt in param.opts}
    for part in argv[2:]:
        if part.startswith("--"):
            assert part.split("=")[0] in options, f"`lorafarm {argv[1]}` has no option {part}"


def test_base_services_volumes_and_persistence():
    compose = load(BASE)
    services = compose["services"]
    assert {"redis", "minio", "createbucket", "flower", "web", "worker-gpu0", "worker-gpu1"} <= set(services)
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert "minio-data:/data" in services["minio"]["volumes"]
    assert {"redis-data", "minio-data"} <= set(compose["volumes"])


def test_every_long_running_service_has_a_healthcheck():
    compose = load(BASE)
    for name, service in {**compose["services"], **load(OVERRIDE)["services"]}.items():
        if name == "createbucket":  # a one-shot job: `service_completed_successfully`
            assert service["restart"] == "no"
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    depends = compose["services"]["worker-gpu0"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["createbucket"]["condition"] == "service_completed_successfully"


def test_each_worker_reserves_exactly_one_distinct_gpu():
    all_workers = {**workers(load(BASE)), **workers(load(OVERRIDE))}
    assert sorted(all_workers) == [f"worker-gpu{i}" for i in range(8)]
    seen = set()
    for name, service in all_workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        (index,) = device["device_ids"]
        assert name == f"worker-gpu{index}" and service["hostname"].endswith(f"-gpu{index}")
        seen.add(index)
    assert len(seen) == 8


def test_override_workers_are_complete_like_the_base_ones():
    base = workers(load(BASE))["worker-gpu0"]
    for name, service in workers(load(OVERRIDE)).items():
        for key in ("build", "image", "command", "environment", "volumes", "stop_grace_period",
                    "depends_on", "healthcheck"):
            assert service.get(key) == base.get(key), f"{name}.{key} differs from worker-gpu0"


def test_commands_are_real_cli_verbs():
    services = {**load(BASE)["services"], **load(OVERRIDE)["services"]}
    checked = 0
    for name, service in services.items():
        command = service.get("command")
        if isinstance(command, list) and command[0] == "lorafarm":
            check_lorafarm_argv(command)
            checked += 1
    assert checked == 10  # flower, web + 8 workers
    for unit in (REPO / "deploy" / "systemd").glob("lorafarm-*.service"):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart=") and "lorafarm " in line:
                check_lorafarm_argv(shlex.split(line.removeprefix("ExecStart=")))
                checked += 1
    assert checked == 12


def test_healthchecks_and_image_use_modules_and_paths_that_exist():
    worker = workers(load(BASE))["worker-gpu0"]
    assert "lora_farm.workers.app" in worker["healthcheck"]["test"][1]
    importlib.import_module("lora_farm.workers.app")
    dockerfile = (REPO / worker["build"]["dockerfile"]).read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", dockerfile, re.M)
    assert "FROM ${CUDA_IMAGE}" in dockerfile
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists() or path == "README.md", f"COPY {path}: not in the repo"
    assert re.search(r"^USER \w+", dockerfile, re.M), "the worker must not run as root"


def test_secrets_come_from_the_env_file_and_it_documents_every_required_one():
    text = BASE.read_text() + OVERRIDE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"LORAFARM_REDIS_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "FLOWER_BASIC_AUTH", "LORAFARM_WEB_TOKEN"} <= required
    documented = set(re.findall(r"^#?\s*(\w+)=", (REPO / "deploy" / ".env.example").read_text(), re.M))
    assert required <= documented, f"missing in .env.example: {required - documented}"
    for name, service in load(BASE)["services"].items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if "SECRET" in key or "PASSWORD" in key:
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"


@pytest.mark.parametrize("unit", sorted((REPO / "deploy" / "systemd").glob("*.service")),
                         ids=lambda p: p.name)
def test_systemd_units_have_the_sections_systemd_needs(unit):
    text = unit.read_text()
    for section in ("[Unit]", "[Service]", "[Install]"):
        assert section in text
    assert "EnvironmentFile=/etc/lora-farm/lorafarm.env" in text
    assert "User=lorafarm" in text


def test_web_service_listens_beyond_loopback_only_with_its_token():
    from lora_farm.web.serve import web_config

    web = load(BASE)["services"]["web"]
    command = web["command"]
    host, port = command[command.index("--host") + 1], command[command.index("--port") + 1]
    assert web["environment"]["LORAFARM_WEB_TOKEN"].startswith("${LORAFARM_WEB_TOKEN:?")
    assert web["ports"] == [f"${{WEB_BIND:-127.0.0.1}}:{port}:{port}"]
    assert f"127.0.0.1:{port}/healthz" in web["healthcheck"]["test"][-1]
    assert web_config(host, "a-token-of-24-characters").guard_reads  # and without one it refuses:
    with pytest.raises(Exception, match="without a token"):
        web_config(host, "")
