"""Part ``flux``: a Flux-sized transformer with each base quantization (it/s, peak), when the
model-family work has landed one. It records whether the spec has a base quantization field
and that it did not measure one, so the summary says so instead of a number it did not measure.
"""

from __future__ import annotations

import sys
from typing import Any

from bench.gpu.common import Context, part_main

QUANT_FIELDS = ("quantize_base", "base_quantization")  # main's name (torchao fp8 / NF4) first


def run(ctx: Context) -> dict[str, Any]:
    from lora_farm.families import all_families
    from lora_farm.jobs.spec import ImageJobSpec

    fields = [name for name in QUANT_FIELDS if name in ImageJobSpec.model_fields]
    families = [card.name for card in all_families()]
    if not fields:
        return {"skipped": "no base quantization in this farm yet (looked for spec fields "
                           f"{', '.join(QUANT_FIELDS)}); Flux family present: "
                           f"{any('flux' in f for f in families)}",
                "families": families}
    return {"skipped": f"base quantization `{fields[0]}` is in the spec, but this part does not "
                       "run it yet: it needs a Flux-sized builder (12B parameters do not fit the "
                       "suite's 8 minutes to build and save; a full-width, fewer-block transformer "
                       "would) and torchao carried in .whl/ (bench/gpu/prepare.sh)",
            "families": families}


if __name__ == "__main__":
    sys.exit(part_main(run))
