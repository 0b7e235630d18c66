"""``histosynth models``: the model presets and where their weights are (the work:
:mod:`histosynth.synthesis.model_report`)."""

from __future__ import annotations

import click

from histosynth.commands.options import HELP_CONTEXT


@click.group(context_settings=HELP_CONTEXT)
def models() -> None:
    """Model presets and where their weights are (offline: nothing is downloaded)."""


@models.command("list", context_settings=HELP_CONTEXT)
def models_list() -> None:
    """Every preset, its tile size and scale, and whether its weights were found."""
    from histosynth.synthesis.model_report import format_models_report

    click.echo(format_models_report(None))


@models.command("check", context_settings=HELP_CONTEXT)
@click.argument("preset", required=False, default="pixcell-1024")
@click.pass_context
def models_check(ctx: click.Context, preset: str) -> None:
    """Where each component of PRESET was found, or every place looked and how to provide it.

    Exits 1 when a component is missing.
    """
    from histosynth.synthesis.model_report import check_preset, format_models_report

    click.echo(format_models_report(preset))
    if not check_preset(preset):
        ctx.exit(1)
