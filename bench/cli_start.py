"""Start-up figures of the CLI (prints, never asserts).

    .venv/bin/python bench/cli_start.py [--runs 15]

1. `lorafarm --help` wall time, interpreter start included: median, min and max over the runs,
   and the median CPU time of the process (close to the wall time of an idle machine);
2. the same for `lorafarm status --help`;
3. what `import lora_farm.cli` costs by itself (``python -X importtime``, cumulative), and the
   five costliest modules it pulls in.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LORAFARM = Path(sys.executable).with_name("lorafarm")  # the console script pip installed


def run_times(command: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall times and CPU times (user + sys of the child) of ``runs`` runs: on a shared, busy
    machine the CPU time is close to what an idle one takes."""
    walls, cpus = [], []
    for _ in range(runs):
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(time.perf_counter() - start)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return walls, cpus


def import_costs() -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of every module `import lora_farm.cli` loads."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import lora_farm.cli"],
                          capture_output=True, text=True, check=True)
    costs = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            costs.append((int(parts[1]), parts[2].strip()))
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    for extra in ([], ["status"]):
        walls, cpus = run_times([str(LORAFARM), *extra, "--help"], args.runs)
        label = " ".join(["lorafarm", *extra, "--help"])
        print(f"`{label}` over {args.runs} runs: wall median {statistics.median(walls):.3f} s "
              f"(min {min(walls):.3f}, max {max(walls):.3f}); cpu median {statistics.median(cpus):.3f} s")
    costs = import_costs()
    total = next(us for us, name in costs if name == "lora_farm.cli")
    print(f"import lora_farm.cli: {total / 1e6:.3f} s cumulative (python -X importtime); costliest:")
    top = sorted((c for c in costs if c[1] != "lora_farm.cli" and "." not in c[1]), reverse=True)[:5]
    for us, name in top:
        print(f"  {name:<24} {us / 1e6:.3f} s")


if __name__ == "__main__":
    main()
