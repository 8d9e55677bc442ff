"""The ``lorafarm`` command. Each module below registers its verbs on the one app."""

from lora_farm.cli import farm, ship, train, validate  # noqa: F401  (registers commands)
from lora_farm.cli.app import app, main

__all__ = ["app", "main"]
