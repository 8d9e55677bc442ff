"""Loaded at start-up by every Python process of a traced run (``bench/trace_job.py`` puts this
folder first on ``PYTHONPATH``); does nothing unless ``LORAFARM_TRACE`` names a file.

It wraps, as their modules are imported, the spec validation entry points and every read of a job
record, so lora_farm itself carries no tracing code. One JSON line per call is appended to the
file: pid, process role, what was called, and the lora_farm function that called it.

- ``validate.full``: ``jobs.loader.load_spec_file`` (keys, paths, pydantic, the filesystem checks);
  ``validate.full.partial`` when called with ``check_files=False`` or ``check_output=False``
- ``validate.fs``: ``jobs.checks.check_spec`` (the filesystem checks alone: datasets, model)
- ``validate.model``: ``JobSpec.model_validate`` (pydantic only: a spec object built from data)
- ``read.record``: a whole job record read from Redis (HGETALL; HMGET of the listing fields)
- ``read.field``: one field of a job record (HGET, e.g. the runner's cancel poll each tick)
"""

from __future__ import annotations

import importlib.abc
import json
import os
import re
import sys

TRACE = os.environ.get("LORAFARM_TRACE")
PREFIX = os.environ.get("LORAFARM_KEY_PREFIX", "lorafarm")
JOB_KEY = re.compile(rf"^{re.escape(PREFIX)}:job:[0-9a-f]+$")
REDIS_READS = {"HGETALL": "read.record", "HMGET": "read.record", "HGET": "read.field"}


def _role() -> str:
    argv = " ".join(sys.argv)
    if "lora_farm.trainers" in argv or "lora_farm/trainers" in argv:
        return "trainer"
    if "celery" in argv:
        billiard = sys.modules.get("billiard")
        name = billiard.current_process().name if billiard else "MainProcess"
        return "worker (pool child: runner)" if name != "MainProcess" else "worker (main)"
    if "lora_farm" in argv:
        return "cli " + " ".join(sys.argv[1:2])
    return os.path.basename(sys.argv[0] or "python")


def _caller(depth: int = 3) -> str:
    """The innermost ``depth`` lora_farm functions outside the ledger's store, innermost first:
    ``ledger.transitions.apply < ledger.transitions.start < workers.runner.run_job``."""
    frame, chain = sys._getframe(3), []  # past _caller, record and the wrapper
    while frame is not None and len(chain) < depth:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/lora_farm/" in path and not path.endswith("ledger/store.py"):
            module = path.rsplit("/lora_farm/", 1)[1][:-3].replace("/", ".")
            chain.append(f"{module}.{frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(chain) or "?"


def record(kind: str, what: str) -> None:
    line = json.dumps({"pid": os.getpid(), "role": _role(), "kind": kind, "what": what,
                       "site": _caller()})
    with open(TRACE, "a", encoding="utf-8") as stream:
        stream.write(line + "\n")


def _wrap_function(module, name: str, kind: str) -> None:
    original = getattr(module, name, None)
    if original is None:
        return

    def traced(*args, **kwargs):
        flags = "".join(f" {key}={value}" for key, value in kwargs.items() if value is False)
        record(kind if not flags else kind + ".partial", f"{module.__name__.rsplit('.', 1)[1]}.{name}{flags}")
        return original(*args, **kwargs)

    setattr(module, name, traced)


def _patch_spec(module) -> None:
    original = module.JobSpec.model_validate.__func__

    def traced(cls, *args, **kwargs):
        record("validate.model", f"{cls.__name__}.model_validate")
        return original(cls, *args, **kwargs)

    module.JobSpec.model_validate = classmethod(traced)


def _patch_redis(module) -> None:
    def wrap(cls, name: str) -> None:
        original = getattr(cls, name)

        def traced(self, *args, **options):
            if len(args) > 1 and str(args[0]).upper() in REDIS_READS:
                key = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
                if JOB_KEY.match(key):
                    record(REDIS_READS[str(args[0]).upper()], f"{args[0]} {key.rsplit(':', 1)[1]}")
            return original(self, *args, **options)

        setattr(cls, name, traced)

    wrap(module.Redis, "execute_command")
    wrap(module.Pipeline, "pipeline_execute_command")
    wrap(module.Pipeline, "immediate_execute_command")


PATCHES = {
    "lora_farm.jobs.loader": lambda m: _wrap_function(m, "load_spec_file", "validate.full"),
    "lora_farm.jobs.checks": lambda m: _wrap_function(m, "check_spec", "validate.fs"),
    "lora_farm.jobs.spec": _patch_spec,
    "redis.client": _patch_redis,
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Lets the normal finders load a module, then patches it before anyone imports from it."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                exec_module = spec.loader.exec_module

                def patched_exec(module, exec_module=exec_module, name=name):
                    exec_module(module)
                    PATCHES[name](module)

                spec.loader.exec_module = patched_exec
                return spec
        return None


if TRACE:
    sys.meta_path.insert(0, _PatchAfterImport())
