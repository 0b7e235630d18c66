"""``histosynth demo``: a demo QuPath project and a run synthesised into it (the work:
:mod:`histosynth.workflows.demo` and :mod:`histosynth.workflows.synthesize`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    allow_untrained_option,
    count_option,
    harmonise_option,
    model_option,
    out_option,
    seed_option,
    steps_option,
    tile_size_option,
)
from histosynth.commands.progress import progress_for
from histosynth.commands.synthesize import report_synthesis, write_back
from histosynth.commands.to_workflow import command_line, settings_from
from histosynth.common.geometry import DEFAULT_MPP


@click.command(context_settings=HELP_CONTEXT)
@out_option("Folder for the demo project (DIR/project) and run (DIR/run).")
@model_option(
    "Preset or local folder [pixcell-1024 when installed, else default: the embedded "
    "histosynth-mini-512]; tiny is UNTRAINED."
)
@count_option(default=4)
@tile_size_option("Tile side in px [the model's; 512 for tiny].", high=4096)
@steps_option("Denoising steps of the full schedule [the engine's own].")
@seed_option()
@harmonise_option(
    "How seams are regenerated; auto = what the engine's evidence picks (multiband for "
    "the embedded default), diffusion for a trained engine that records none, multiband "
    "for an UNTRAINED one (whose diffusion seams are noise)."
)
@allow_untrained_option()
@click.pass_context
def demo(
    ctx: click.Context,
    out: Path,
    model: str | None,
    tile_size: int | None,
    harmonise: str,
    **options: Any,
) -> None:
    """Build a demo QuPath project (three pyramidal slides from real H&E shipped with
    TIAToolbox, vessel annotations) in DIR/project, synthesise vessels into DIR/run and add them to
    the project as entries marked for review.

    Running it again reuses the project and finishes (or keeps) the run; nothing is added
    twice.
    """
    from histosynth.workflows.demo import prepare_demo_project, untrained_preset
    from histosynth.workflows.synthesize import SynthesisSettings, synthesize

    project_file = prepare_demo_project(out, model)
    quiet = ctx.obj.get("quiet")
    click.echo(f"demo project: {project_file}")
    if harmonise == "auto" and untrained_preset(model) and not quiet:
        click.echo(
            f"the {model} engine is UNTRAINED: seams are harmonised by multiband blending "
            "(--harmonise diffusion --allow-untrained shows what it makes of them)"
        )
    settings = settings_from(
        SynthesisSettings,
        options,
        classes=("Vessel",),
        mode="inpaint",
        tile_size=tile_size or (512 if model == "tiny" else None),
        mpp=DEFAULT_MPP,
        model=model,
        harmonise=harmonise,
    )
    result = synthesize(
        settings,
        out=out / "run",
        project=project_file,
        resume=(out / "run" / "index.csv").exists(),
        progress=progress_for(ctx, "demo"),
        command=command_line(),
    )
    report_synthesis(ctx, result)
    write_back("native", project_file, out / "run")
    click.echo(f"open the project in QuPath: {project_file}")
