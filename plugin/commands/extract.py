"""``histosynth extract``: real vessel tiles into a dataset (the work:
:mod:`histosynth.workflows.extract`)."""

from __future__ import annotations

import math
from typing import Any

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    FiniteFloat,
    class_option,
    input_options,
    mpp_option,
    out_option,
    resume_option,
    skip_missing_option,
    tile_size_option,
    value_option,
)
from histosynth.commands.to_workflow import run_arguments, settings_from


@click.command(context_settings=HELP_CONTEXT)
@input_options(reverse=True)
@class_option(
    "Annotation class to extract (repeatable); 'Vessel' includes 'Vessel: …'.", required=True
)
@out_option("Dataset folder to write (created).")
@tile_size_option("Tile width and height in px at --mpp.", low=16, default=1024)
@mpp_option()
@value_option(
    "--min-area",
    type=FiniteFloat(min=0),
    default=0.0,
    help="Skip vessels smaller than this, in µm².",
)
@value_option("--max-area", type=FiniteFloat(min=0), help="Skip vessels larger than this, in µm².")
@resume_option()
@skip_missing_option()
@click.option(
    "--compress",
    is_flag=True,
    help="Smaller PNGs (zlib; ~35 % smaller, several times slower to write). Both lossless.",
)
@click.pass_context
def extract(
    ctx: click.Context, min_area: float, max_area: float | None, compress: bool, **options: Any
) -> None:
    """Real vessel tiles, masks and per-tile GeoJSON into a dataset.

    One tile per vessel of the chosen classes, centred on it, at --mpp. Give a QuPath
    project (vessels from paquo or P/annotations/<entryID>.geojson) or a slide with a
    GeoJSON file.
    """
    from histosynth.workflows.extract import ExtractSettings
    from histosynth.workflows.extract import extract as run_extract

    arguments = run_arguments(ctx, "extract")
    settings = settings_from(
        ExtractSettings,
        options,
        min_area_um2=min_area,
        max_area_um2=math.inf if max_area is None else max_area,
        png="small" if compress else "fast",
    )
    result = run_extract(settings, **arguments)
    click.echo(
        f"{result.written} tile(s) written, {result.already_present} already present, "
        f"{len(result.skipped)} vessel(s) skipped (reasons in {result.run_dir / 'run.json'})"
    )
    click.echo(f"dataset: {result.run_dir}")
