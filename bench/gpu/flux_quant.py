"""Part ``flux``: a Flux-sized transformer with each base quantization (it/s, peak), when the
model-family work has landed one. The farm has the Flux family but no base quantization yet
(no ``base_quantization`` field in the spec): the part records that and what it looked for, so
the suite's summary says so instead of a number it did not measure.
"""

from __future__ import annotations

import sys
from typing import Any

from bench.gpu.common import Context, part_main

QUANT_FIELDS = ("base_quantization", "quantize_base", "base_dtype")


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
    return {"skipped": f"quantization field(s) {fields} found but this part does not run them "
                       "yet: extend bench/gpu/flux_quant.py", "families": families}


if __name__ == "__main__":
    sys.exit(part_main(run))
