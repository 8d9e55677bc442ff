"""Part ``inventory``: the farm's NVML inventory against ``nvidia-smi -L``, and pinning: a trainer
started with the farm's ``pinned_env([uuid])`` sees exactly one device, with that UUID.

Dry run: the declared card, no ``nvidia-smi``; the pinned child sees ``CUDA_VISIBLE_DEVICES`` set
to the card's name and no CUDA device (what a CPU trainer on a declared card sees).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from bench.gpu.common import REPO, Context, part_main

_SMI_LINE = re.compile(r"^GPU (\d+): (.+?) \(UUID: (\S+)\)")
# what a trainer process sees of its devices, printed as JSON (torch's UUID lacks the GPU- prefix)
_CHILD = """
import json, os, torch
count = torch.cuda.device_count()
uuid = ("GPU-" + str(torch.cuda.get_device_properties(0).uuid)) if count else None
print(json.dumps({"device_count": count, "uuid": uuid,
                  "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


def nvidia_smi_cards() -> list[dict[str, Any]] | None:
    """``nvidia-smi -L`` as index, name, uuid; None where it is not installed."""
    if shutil.which("nvidia-smi") is None:
        return None
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    cards = []
    for line in listing.stdout.splitlines():
        found = _SMI_LINE.match(line.strip())
        if found:
            cards.append({"index": int(found[1]), "name": found[2], "uuid": found[3]})
    return cards


def pinned_view(uuid: str) -> dict[str, Any]:
    """What a process pinned to ``uuid`` by the farm sees."""
    from lora_farm.scheduler.gpus import pinned_env

    env = {**os.environ, **pinned_env([uuid]), "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                           text=True, timeout=120)
    if child.returncode != 0:
        raise RuntimeError(f"pinned child failed: {child.stderr[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> dict[str, Any]:
    from lora_farm.scheduler.gpus import read_gpus

    farm = [card.to_dict() for card in read_gpus()]
    smi = nvidia_smi_cards()
    farm_uuids = sorted(card["uuid"] for card in farm)
    smi_uuids = sorted(card["uuid"] for card in smi) if smi is not None else None
    pins = [{"card": uuid, **pinned_view(uuid)} for uuid in farm_uuids]
    expected_count = 1 if ctx.cuda else 0
    pins_ok = all(p["device_count"] == expected_count and p["cuda_visible_devices"] == p["card"]
                  and (not ctx.cuda or p["uuid"] == p["card"]) for p in pins)
    return {"farm_cards": [{k: c[k] for k in ("uuid", "name", "total_mb", "source")} for c in farm],
            "nvidia_smi_uuids": smi_uuids,
            "inventory_matches": smi_uuids == farm_uuids if smi_uuids is not None else None,
            "pinning": pins, "pinning_ok": pins_ok,
            "ok": pins_ok and (smi_uuids is None or smi_uuids == farm_uuids)}


if __name__ == "__main__":
    sys.exit(part_main(run))
