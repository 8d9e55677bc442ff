"""The typer app every command module registers on, and the error boundary of the CLI."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from lora_farm import __version__
from lora_farm.errors import LoraFarmError

app = typer.Typer(
    name="lorafarm",
    help="Train many LoRA adapters at once: validate YAML job specs, queue them, pack them onto "
         "GPUs, ship the weights.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"lorafarm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """lora-farm: a multi-GPU batch LoRA training farm with a job queue."""


def fail(message: str, code: int = 1) -> None:
    """Print a user error (no traceback) and exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except LoraFarmError as error:
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
