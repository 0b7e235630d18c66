"""``histosynth extract``: real vessel tiles into a dataset (the work:
:mod:`histosynth.workflows.extract`)."""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

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
)
from histosynth.commands.progress import progress_for


@click.command(context_settings=HELP_CONTEXT)
@input_options(reverse=True)
@class_option(
    "Annotation class to extract (repeatable); 'Vessel' includes 'Vessel: …'.", required=True
)
@out_option("Dataset folder to write (created).")
@tile_size_option("Tile width and height in px at --mpp.", low=16, default=1024)
@mpp_option()
@click.option(
    "--min-area",
    type=FiniteFloat(min=0),
    default=0.0,
    show_default=True,
    help="Skip vessels smaller than this, in µm².",
)
@click.option(
    "--max-area",
    type=FiniteFloat(min=0),
    default=None,
    help="Skip vessels larger than this, in µm².",
)
@resume_option()
@skip_missing_option()
@click.option(
    "--compress",
    is_flag=True,
    help="Smaller PNGs (zlib; ~35 % smaller, several times slower to write). Both lossless.",
)
@click.pass_context
def extract(
    ctx: click.Context,
    project: Path | None,
    slide: Path | None,
    annotations: Path | None,
    slide_mpp: float | None,
    classes: tuple[str, ...],
    out: Path,
    tile_size: int,
    mpp: float,
    min_area: float,
    max_area: float | None,
    resume: bool,
    skip_missing: bool,
    compress: bool,
) -> None:
    """Real vessel tiles, masks and per-tile GeoJSON into a dataset.

    One tile per vessel of the chosen classes, centred on it, at --mpp. Give a QuPath
    project (vessels from paquo or P/annotations/<entryID>.geojson) or a slide with a
    GeoJSON file.
    """
    from histosynth.workflows.extract import ExtractSettings
    from histosynth.workflows.extract import extract as run_extract

    if (project is None) == (slide is None):
        raise click.UsageError("give either --project or --slide (with --annotations)")
    if slide is not None and annotations is None:
        raise click.UsageError("--slide needs --annotations")
    settings = ExtractSettings(
        classes=classes,
        tile_size=tile_size,
        mpp=mpp,
        min_area_um2=min_area,
        max_area_um2=math.inf if max_area is None else max_area,
        png="small" if compress else "fast",
    )
    result = run_extract(
        settings,
        out=out,
        project=project,
        slide=slide,
        annotations=annotations,
        slide_mpp_override=slide_mpp,
        resume=resume,
        skip_missing=skip_missing,
        progress=progress_for(ctx, "extract"),
        command=shlex.join(["histosynth", *sys.argv[1:]]),
    )
    click.echo(
        f"{result.written} tile(s) written, {result.already_present} already present, "
        f"{len(result.skipped)} vessel(s) skipped (reasons in {result.run_dir / 'run.json'})"
    )
    click.echo(f"dataset: {result.run_dir}")
