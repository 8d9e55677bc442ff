"""The typer app every command module registers on, and the error boundary of the CLI."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperGroup

from lora_farm import __version__
from lora_farm.errors import LoraFarmError


class _Argument(TyperArgument):
    """An argument shown as ``FILES...`` or ``[JOB]``, without typer's type label
    (``<list[Path]>``), which reads as a value to type."""

    def display_type_rich(self, ctx) -> None:
        return None

    def _rich_display_name(self) -> str:
        return (self.metavar or self.name.upper()) + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self) -> str:
        return self._rich_display_name() if self.required else f"[{self._rich_display_name()}]"


class _Group(TyperGroup):
    """The command group whose help names values as click does (``--batch BATCH``, ``FILES...``)
    instead of typer's ``<str>``; flags show no value."""

    def get_command(self, ctx, cmd_name: str):
        command = super().get_command(ctx, cmd_name)
        for param in getattr(command, "params", ()):
            if type(param) is TyperArgument:
                param.__class__ = _Argument
            elif param.metavar is None and not getattr(param, "is_flag", True):
                param.metavar = max(param.opts, key=len).lstrip("-").upper().replace("-", "_")
        return command


app = typer.Typer(
    cls=_Group,
    name="lorafarm",
    help="Train many LoRA adapters at once: validate YAML job specs, queue them, pack them onto "
         "GPUs, ship the weights.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flags show no `<bool>`, and no help panels to lay out
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


def refuse_blank_ids(value: str | list[str] | None) -> str | list[str] | None:
    """The callback of every job-id argument: an empty or blank id is refused, since as a prefix
    it would match any job (`lorafarm cancel ''` cancelled the only job of a ledger)."""
    if any(not job.strip() for job in ([value] if isinstance(value, str) else value or [])):
        fail("a job id must not be empty or blank. Fix: give a job id or a unique prefix of one; "
             "`lorafarm status` lists them.")
    return value


def main() -> None:
    try:
        app(prog_name="lorafarm")  # also under `python -m lora_farm`
    except LoraFarmError as error:
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
