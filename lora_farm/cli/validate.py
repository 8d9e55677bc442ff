"""``lorafarm validate``: check job specs without queueing anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from lora_farm.cli.app import app, console, err_console
from lora_farm.errors import SpecError


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Job spec YAML files, or folders of them.",
                                       show_default=False),
    show_resolved: bool = typer.Option(False, "--show", help="Print each resolved spec."),
) -> None:
    """Validate job specs (schema, paths, datasets, base models); print every problem found."""
    from lora_farm.jobs.loader import expand_spec_paths, load_spec_files  # pydantic: not paid by `--help`

    try:
        files = expand_spec_paths(files)
        loaded = load_spec_files(files)
    except SpecError as error:
        for problem in error.problems:
            err_console.print(f"[red]✗[/] {escape(str(problem))}", highlight=False, markup=True, soft_wrap=True)
        count = len({p.file for p in error.problems})
        err_console.print(f"{len(error.problems)} problem(s) in {count} of {len(files)} file(s); "
                          "nothing was queued.", highlight=False)
        raise typer.Exit(1) from None
    for item in loaded:
        spec = item.spec
        console.print(f"[green]✓[/] {item.source}: {spec.task} job [bold]{spec.name}[/] "
                      f"({_model_of(spec)}rank {spec.lora_rank}, hash {spec.config_hash()})", highlight=False)
        for note in item.notes:
            console.print(f"  [yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
        if show_resolved:
            console.print_json(data=spec.to_yaml_dict())
    console.print(f"{len(loaded)} spec(s) valid.")


def _model_of(spec: Any) -> str:
    """``Flux.1 dev (flux-dev), `` for an image job: the family the registry recognised."""
    from lora_farm import families
    from lora_farm.jobs.inspect import inspect_base_model

    if spec.task == "llm":
        return ""
    card = families.by_name(inspect_base_model(spec.base_model).family)  # validated: it is known
    return f"{card.title} ({card.name}), "
