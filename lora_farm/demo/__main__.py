"""``python -m lora_farm.demo ROOT [--steps-scale N]``: write the demo batch, print its specs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_farm.trainers.quiet import quiet_library_noise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_farm.demo",
                                     description="Build tiny offline models, datasets and job specs.")
    parser.add_argument("root", type=Path, help="folder for models/, data/ and jobs/")
    parser.add_argument("--steps-scale", type=int, default=1, help="multiply every job's steps")
    args = parser.parse_args(argv)
    quiet_library_noise()  # before the builders import the training stack
    from lora_farm.demo.batch import write_demo_batch

    for path in write_demo_batch(args.root, steps_scale=args.steps_scale):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
