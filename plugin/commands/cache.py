"""``histosynth cache build``: the feature cache of a dataset, a QuPath project or a slide
(the work: :mod:`histosynth.workflows.cache`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    class_option,
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
)
from histosynth.commands.progress import progress_for

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.workflows.cache import CacheBuildResult


@click.group(context_settings=HELP_CONTEXT)
def cache() -> None:
    """Feature caches for training: VAE posteriors and encoder rows of tiles, in HDF5."""


@cache.command("build", context_settings=HELP_CONTEXT)
@dataset_option(
    "A histosynth dataset or run folder (index.csv); rejected tiles are left out."
)
@input_options()
@class_option(
    "Vessel class (repeatable, with --project / --slide); 'Vessel' includes 'Vessel: …'."
)
@model_option(
    "Preset (pixcell-1024, pixcell-256, tiny = UNTRAINED) or a local engine folder.",
    required=True,
)
@out_option("Cache file to write (HDF5, e.g. vessels.h5).")
@tile_size_option(
    "Tile side in px at --mpp, a multiple of the encoder crop [a dataset's "
    "own, else the model's].",
    low=8,
)
@mpp_option("Resolution in µm/px [a dataset's own, else the model's].", default=None)
@click.option(
    "--background-tiles",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also cache N tissue tiles without any annotation (for style adapters).",
)
@resume_option("Add to an existing cache (also after an interruption); its tiles are kept.")
@seed_option("Seed of the background tile choice.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Tiles per model call and per commit to the file.",
)
@device_option()
@skip_missing_option()
@click.pass_context
def build(
    ctx: click.Context,
    dataset: Path | None,
    project: Path | None,
    slide: Path | None,
    annotations: Path | None,
    slide_mpp: float | None,
    classes: tuple[str, ...],
    model: str,
    out: Path,
    tile_size: int | None,
    mpp: float | None,
    background_tiles: int,
    resume: bool,
    seed: int,
    batch_size: int,
    device: str | None,
    skip_missing: bool,
) -> None:
    """Encode tiles once into a cache file that training reads (histosynth train …).

    Give a dataset folder, or a project / slide with --class: one tile per vessel,
    centred on it, plus --background-tiles tissue tiles. Per tile the file holds the VAE
    posterior (mean, std; float16), the encoder rows, the mask and the tile's provenance.
    """
    from histosynth.workflows.cache import CacheSettings, build_feature_cache

    if sum(x is not None for x in (dataset, project, slide)) != 1:
        raise click.UsageError("give one of --dataset, --project or --slide (with --annotations)")
    if slide is not None and annotations is None:
        raise click.UsageError("--slide needs --annotations")
    if dataset is None and not classes:
        raise click.UsageError("--project / --slide need --class")
    if dataset is not None and (classes or background_tiles):
        raise click.UsageError("--class and --background-tiles go with --project / --slide")
    settings = CacheSettings(
        model=model,
        classes=classes,
        tile_size=tile_size,
        mpp=mpp,
        background_tiles=background_tiles,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )
    result = build_feature_cache(
        settings,
        out=out,
        dataset=dataset,
        project=project,
        slide=slide,
        annotations=annotations,
        slide_mpp_override=slide_mpp,
        resume=resume,
        skip_missing=skip_missing,
        progress=progress_for(ctx, "cache"),
    )
    _report(result, out)


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
