"""``histosynth adapters …``: the adapter library of LoRA style adapters (the work:
:mod:`histosynth.workflows.adapters`). Imports no model library."""

from __future__ import annotations

import json
from pathlib import Path

import click

from histosynth.commands.options import HELP_CONTEXT, path_option


@click.group(context_settings=HELP_CONTEXT)
def adapters() -> None:
    """The adapter library: LoRA style adapters for synthesize --adapter NAME."""


@adapters.command("list", context_settings=HELP_CONTEXT)
@click.option(
    "--json", "as_json", is_flag=True,
    help="A JSON list, one object per adapter (keys in docs/contracts.md).",
)
@path_option(
    "--library",
    help="Adapter library (default $HISTOSYNTH_ADAPTERS or ~/.local/share/histosynth/adapters).",
)
def adapters_list(as_json: bool, library: Path | None) -> None:
    """Every adapter in the library: name, base model, rank, tile size, when made, folder.

    Reads each adapter's histosynth_adapter.json only (no weights). An empty or missing
    library lists nothing (--json: []); an adapter folder whose metadata cannot be read
    is an error naming the file (exit 1).
    """
    from histosynth.workflows.adapters import adapter_records, adapter_table, library_folder

    records = adapter_records(library)
    if as_json:
        click.echo(json.dumps(records))  # ASCII: readable in any console encoding
        return
    click.echo(f"adapter library: {library_folder(library)}")
    click.echo(adapter_table(records))
