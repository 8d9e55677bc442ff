"""``python -m lora_farm.trainers JOB_FILE [--job-dir DIR] [--events PATH]`` (see entry.py)."""

import sys

from lora_farm.trainers.entry import main

sys.exit(int(main()))
