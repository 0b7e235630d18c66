"""``histosynth cache build``: the feature cache of a dataset, a QuPath project or a slide
(the work: :mod:`histosynth.workflows.cache`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    batch_size_option,
    class_option,
    coco_options,
    dataset_option,
    device_option,
    input_options,
    model_option,
    mpp_option,
    out_option,
    resume_option,
    seed_option,
    skip_missing_option,
    tile_size_option,
    whole_number_option,
)
from histosynth.commands.to_workflow import run_arguments, settings_from

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.workflows.cache import CacheBuildResult


@click.group(context_settings=HELP_CONTEXT)
def cache() -> None:
    """Feature caches for training: VAE posteriors and encoder rows of tiles, in HDF5."""


@cache.command("build", context_settings=HELP_CONTEXT)
@dataset_option(
    "A histosynth dataset or run folder (index.csv); rejected tiles are left out."
)
@coco_options()
@input_options()
@class_option(
    "Vessel class (repeatable, with --project / --slide; with --coco: the categories of "
    "the masks [all]); 'Vessel' includes 'Vessel: …'."
)
@model_option(
    "Preset (pixcell-1024, pixcell-256, default, tiny = UNTRAINED) or a local engine folder.",
    required=True,
)
@out_option("Cache file to write (HDF5, e.g. vessels.h5).")
@tile_size_option(
    "Tile side in px at --mpp, a multiple of the encoder crop [a dataset's "
    "own, else the model's].",
    low=8,
)
@mpp_option("Resolution in µm/px [a dataset's own, else the model's].", default=None)
@whole_number_option(
    "--background-tiles",
    low=0,
    default=0,
    help="Also cache N tissue tiles without any annotation (for style adapters).",
)
@resume_option("Add to an existing cache (also after an interruption); its tiles are kept.")
@seed_option("Seed of the background tile choice.")
@batch_size_option("Tiles per model call and per commit to the file.", default=8)
@device_option()
@skip_missing_option()
@click.pass_context
def build(
    ctx: click.Context,
    dataset: Path | None,
    coco: Path | None,
    classes: tuple[str, ...],
    background_tiles: int,
    out: Path,
    **options: Any,
) -> None:
    """Encode tiles once into a cache file that training reads (histosynth train …).

    Give a dataset folder, a COCO dataset (--coco with --images: each image a tile), or a
    project / slide with --class: one tile per vessel, centred on it, plus
    --background-tiles tissue tiles. Per tile the file holds the VAE posterior (mean,
    std; float16), the encoder rows, the mask and the tile's provenance.
    """
    from histosynth.workflows.cache import CacheSettings, build_feature_cache

    arguments = run_arguments(ctx, "cache", dataset=True, coco=True, command=False)
    slides = dataset is None and coco is None
    if slides and not classes:
        raise click.UsageError("--project / --slide need --class")
    if dataset is not None and (classes or background_tiles):
        raise click.UsageError("--class and --background-tiles go with --project / --slide")
    if coco is not None and background_tiles:
        raise click.UsageError("--background-tiles goes with --project / --slide")
    settings = settings_from(
        CacheSettings, options, classes=classes, background_tiles=background_tiles
    )
    _report(build_feature_cache(settings, **arguments), out)


def _report(result: CacheBuildResult, out: Path) -> None:
    info = result.info
    click.echo(f"engine: {result.engine_description}")
    click.echo(
        f"{result.written} tile(s) cached ({result.vessels} vessel, {result.backgrounds} "
        f"background), {result.already_present} already present, {len(result.skipped)} "
        "vessel(s) skipped"
    )
    click.echo(
        f"cache: {out} ({info.count} samples, {info.tile_size} px at {info.mpp:g} µm/px, "
        f"{info.rows} rows of {info.dim}; content hash {info.content_hash[:16]})"
    )
    if not result.trained:
        click.echo("note: the engine is UNTRAINED; its features are for tests and the demo only.")
