"""``histosynth synthesize``: synthetic vessel tiles into a run folder (the work:
:mod:`histosynth.workflows.synthesize`), and the result lines ``demo`` prints too."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    FiniteFloat,
    allow_untrained_option,
    batch_size_option,
    class_option,
    coco_options,
    count_option,
    device_option,
    harmonise_option,
    input_options,
    kv_compress_option,
    model_option,
    mpp_option,
    out_option,
    resume_option,
    seed_option,
    skip_missing_option,
    steps_option,
    tile_size_option,
    value_option,
    wait_option,
)
from histosynth.commands.to_workflow import run_arguments, settings_from
from histosynth.options import GUIDANCE_MAX
from histosynth.synthesis import defaults
from histosynth.workflows.synthesize.settings import DEFAULT_MASK_GUIDANCE

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.workflows.synthesize import SynthesizeResult

__all__ = ["fail_on_qc", "report_synthesis", "synthesize", "write_back"]


@click.command(context_settings=HELP_CONTEXT)
@input_options(reverse=True)
@coco_options("--slide-mpp")
@class_option(
    "Vessel class to synthesise (repeatable); 'Vessel' includes 'Vessel: …'.", required=True
)
@count_option(
    "Number of synthetic tiles (needed but with --shapes drawn, which makes one per sketch: "
    "then at most this many)."
)
@value_option(
    "--mode",
    type=click.Choice(["inpaint", "variation", "shape"]),
    default="inpaint",
    help="inpaint: real donor vessels into new tissue; variation: new tiles like "
    "real vessel tiles; shape: real donor vessels warped into target outlines (--shapes).",
)
@value_option(
    "--shapes",
    type=click.Choice(["drawn", "bank"]),
    help="--mode shape's target outlines: drawn = every polygon of --shape-class an "
    "annotator drew (one tile centred on each); bank = the project's real vessel outlines "
    "of --class, deformed (seeded), placed on real tissue.",
)
@value_option(
    "--shape-class",
    default="Vessel sketch",
    help="The class of the outlines an annotator draws for --shapes drawn.",
)
@value_option(
    "--inside-strength",
    type=FiniteFloat(0.0, 1.0),
    help="--mode shape: noise level τ regenerated inside the target outline beyond the seam "
    "band (repairs the warp's stretching) [0: the warped donor kept, as inpainting keeps "
    "its donor].",
)
@value_option(
    "--controlnet",
    metavar="NAME|FOLDER|none",
    help="--mode shape: a vessel-mask ControlNet (its name in the library "
    "$HISTOSYNTH_CONTROLNETS, or its folder) that conditions every denoising step on the "
    "target outline; the inside is then generated from the mask (--inside-strength: the "
    "engine's highest τ). 'none': without one [the engine's own when it ships one, with "
    "diffusion seams].",
)
@value_option(
    "--mask-guidance",
    type=float,
    help="With a ControlNet: the mask's classifier-free guidance scale s_mask ≥ 1 "
    f"(--guidance is the UNI rows' s_uni) [{DEFAULT_MASK_GUIDANCE:g}].",
)
@click.option(
    "--whole-tile",
    is_flag=True,
    help="With a ControlNet: generate the whole tile from noise, from the mask and the "
    "composite's encoder rows (new tissue and vessel; no seam). Needs an engine that "
    "serves τ = 1 (not the embedded default).",
)
@out_option("Run folder to write (created).")
@tile_size_option(
    "Tile side in px at --mpp [the model's: 1024 for pixcell-1024, 512 for default]."
)
@mpp_option()
@model_option(
    "Preset (pixcell-1024, pixcell-256, default, tiny = UNTRAINED) or a local folder "
    "[pixcell-1024 when its weights are installed, else default: the embedded "
    "histosynth-mini-512]."
)
@value_option(
    "--adapter",
    help="LoRA style adapter: its folder, or its name in the library ($HISTOSYNTH_ADAPTERS).",
)
@seed_option()
@steps_option(
    "Denoising steps of the full schedule [the engine's own: for PixCell inpaint "
    f"{defaults.INPAINT_STEPS}, variation {defaults.VARIATION_STEPS}; the embedded default's "
    "are on its model card]."
)
@value_option(
    "--guidance",
    type=FiniteFloat(1.0, GUIDANCE_MAX),
    help="Classifier-free guidance scale; 1 skips the unconditional pass [the engine's own: "
    f"for PixCell inpaint {defaults.INPAINT_GUIDANCE}, variation {defaults.VARIATION_GUIDANCE}].",
)
@value_option(
    "--strength",
    type=FiniteFloat(0.0, 1.0),
    help="Inpainting noise level τ: the fraction of the schedule regenerated [the engine's "
    f"own: {defaults.STRENGTH} for PixCell; the embedded default's is on its model card].",
)
@kv_compress_option("KV-compression ratio R for self-attention (1 = off).")
@batch_size_option("Tiles per model call [4 on CUDA, 1 on CPU].")
@device_option()
@resume_option()
@skip_missing_option()
@value_option(
    "--background",
    type=click.Choice(["auto", "real", "synthetic"]),
    default="auto",
    help="Inpainting backgrounds: real tiles of the slides, generated ones (conditioned on "
    "real tissue near the donor), or real with generated ones where a donor fits none.",
)
@harmonise_option(
    "How the seam is regenerated: partial diffusion with the engine, multiband "
    "(Laplacian-pyramid) blending without a model step (fast on a CPU), or not at all; "
    "auto = what the engine's evidence picks (its histosynth_engine.json: multiband for the "
    "embedded default), diffusion when a ControlNet steers the run or the engine records "
    "none, multiband for an UNTRAINED one. "
    "Beyond 4σ of the seam the tile is the composite in every mode."
)
@allow_untrained_option()
@click.option(
    "--strict-qc",
    is_flag=True,
    help="Exit with code 1 when a tile fails the content check (they are written either "
    "way, marked in the qc column, and never exported unless --include-qc-failed).",
)
@value_option(
    "--write-project",
    type=click.Choice(["none", "native", "paquo"]),
    default="none",
    help="Add the synthetic tiles to --project as new entries marked for review: native "
    "(edits project.qpproj; close the project in QuPath first) or paquo (needs QuPath).",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[auto|local|ADDRESS]",
    help="Render on a Ray cluster, one engine per worker: auto (the cluster of 'ray "
    "start'), local (a Ray instance on this machine) or the head's address. Needs "
    "pip install 'histosynth[ray]'.",
)
@value_option(
    "--workers",
    type=click.IntRange(1, 4096),
    help="Ray workers (actors), each loading the engine once [1].",
)
@value_option(
    "--gpus-per-worker",
    type=FiniteFloat(0.0, 64.0),
    help="GPUs each Ray worker holds [1 when the cluster has GPUs, else 0].",
)
@wait_option
@click.pass_context
def synthesize(
    ctx: click.Context,
    project: Path | None,
    write_project: str,
    strict_qc: bool,
    ray_address: str | None,
    workers: int | None,
    gpus_per_worker: float | None,
    wait_s: float,
    **options: Any,
) -> None:
    """Synthetic vessel tiles, masks, GeoJSON and index into a run folder.

    Every tile records its source slide, donor annotation, model, seed and parameters in
    RUN/index.csv; review_status starts as 'pending'.
    """
    from histosynth.workflows.synthesize import SynthesisSettings
    from histosynth.workflows.synthesize import synthesize as run_synthesize

    arguments = run_arguments(ctx, "synthesize", coco=True)
    coco, images = arguments.pop("coco"), arguments.pop("images")
    if coco is not None:  # each COCO image a slide, each annotation a vessel
        from histosynth.workflows.tile_runs import coco_slides

        sources, mpp = coco_slides(coco, images, arguments["slide_mpp_override"])
        arguments.update(sources=sources, slide_mpp_override=mpp)
    if write_project != "none" and project is None:
        raise click.UsageError("--write-project needs --project")
    if ray_address is None and (workers is not None or gpus_per_worker is not None):
        raise click.UsageError("--workers and --gpus-per-worker need --ray")
    ray = None
    if ray_address is not None:
        from histosynth.workflows.synthesize import RayOptions

        ray = RayOptions(ray_address, workers or 1, gpus_per_worker)
    result = run_synthesize(settings_from(SynthesisSettings, options), ray=ray, **arguments)
    report_synthesis(ctx, result)
    write_back(write_project, project, result.run_dir, wait_s=wait_s)
    fail_on_qc(strict_qc, result)


def fail_on_qc(strict: bool, result: SynthesizeResult) -> None:
    """``--strict-qc``: exit 1 when a tile of this call failed the content check."""
    if strict and result.qc_failed:
        raise click.exceptions.Exit(1)


def write_back(how: str, project: Path | None, run_dir: Path, *, wait_s: float = 0.0) -> None:
    """``--write-project``: add a finished run's tiles to the QuPath project and print
    what was added."""
    if how == "none":
        return
    if project is None:
        raise click.UsageError("--write-project needs --project")
    from histosynth.workflows.writeback import write_run_back

    click.echo(write_run_back(how, project, run_dir, wait_s=wait_s).summary())


def report_synthesis(ctx: click.Context, result: SynthesizeResult) -> None:
    """The result lines (always, also with ``-q``) and the notes on an UNTRAINED engine
    (not with ``-q``)."""
    click.echo(f"engine: {result.engine_description}")
    click.echo(
        f"{result.written} synthetic tile(s) written, {result.already_present} already "
        f"present, {len(result.skipped)} item(s) skipped (reasons in "
        f"{result.run_dir / 'run.json'})"
    )
    click.echo(f"run: {result.run_dir} (index: {result.run_dir / 'index.csv'})")
    if result.qc_failed:
        first = next(iter(result.qc_failed.items()))
        click.echo(
            f"warning: {len(result.qc_failed)} of the {result.written} tile(s) written FAILED "
            f"the content check (e.g. {first[0]}: {first[1]}); they are marked in the qc "
            "column and the gallery, and not exported unless --include-qc-failed",
            err=True,
        )
    if ctx.obj.get("quiet"):
        return
    if result.evidence_harmonise:
        click.echo(
            f"seams: {result.evidence_harmonise}, what this engine's evidence picks for "
            "--harmonise auto (its model card; docs/evidence.md); --harmonise diffusion "
            "regenerates them with the engine"
        )
    if not result.trained and result.model_painted:
        click.echo(
            "note: the engine is UNTRAINED; these tiles show the workflow, they are not "
            "histology. Install PixCell weights (histosynth models check) for real use."
        )
    elif not result.trained:
        click.echo(
            "note: the seams were harmonised without the (UNTRAINED) engine; for seams "
            "regenerated by diffusion install PixCell-1024 (histosynth models check)."
        )
