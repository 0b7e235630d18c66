"""``histosynth qupath …``: the QuPath menu scripts (the work: :mod:`histosynth.qupath`).

User errors are raised as :class:`~histosynth.integration.errors.InputError`, which the
main group reports as one line and exit code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    class_option,
    count_option,
    model_option,
    mpp_option,
    path_option,
    project_option,
    tile_size_option,
    value_option,
    wait_option,
)
from histosynth.integration.qupath.classes import (
    SKETCH_CLASS,
    add_project_classes,
    classes_file,
    histosynth_classes,
)
from histosynth.integration.qupath.project_classes import read_project_classes
from histosynth.qupath import MODES, SETTINGS_NAME, install_scripts, plan_for_scripts


@click.group("qupath", context_settings=HELP_CONTEXT)
def qupath() -> None:
    """QuPath integration: menu scripts for a project."""


@qupath.command("install-scripts", context_settings=HELP_CONTEXT)
@click.argument("project", type=click.Path(path_type=Path))
@path_option("--python", help="Python interpreter that runs histosynth [this one].")
@class_option(
    "Vessel class the scripts export and synthesise (repeatable); 'Vessel' includes "
    "'Vessel: …'.",
    default=("Vessel",),
)
@count_option("Synthetic tiles per run.", default=16)
@model_option(
    "Preset (pixcell-1024, pixcell-256, default, tiny = UNTRAINED) or a local folder; "
    "auto = pixcell-1024 when its weights are installed, else the embedded default.",
    default="auto",
)
@value_option("--mode", type=click.Choice(list(MODES)), default="inpaint")
@tile_size_option("Tile side in px at --mpp [the model's].")
@mpp_option("Target resolution in µm/px.")
@value_option(
    "--overwrite/--no-overwrite",
    default=True,
    help="Replace scripts and settings already in the project.",
)
@value_option(
    "--sketch-class/--no-sketch-class",
    default=True,
    help=f"Add the class {SKETCH_CLASS!r} (outlines for --mode shape) to the project's classes.",
)
def install_scripts_command(
    project: Path, overwrite: bool, sketch_class: bool, **settings: Any
) -> None:
    """Copy the histosynth menu scripts into PROJECT/scripts/histosynth/.

    PROJECT is a QuPath project: project.qpproj or its folder. QuPath then lists the scripts
    under Automate > Project scripts > histosynth. Their defaults go to
    histosynth_settings.json beside them (also listed there, to edit). The class
    'Vessel sketch' (cyan), whose outlines "Synthesize vessels" fills "into drawn shapes",
    is added to PROJECT/classifiers/classes.json unless the project has it (the old file
    kept as classes.json.backup; every other class kept as it is).
    """
    if sketch_class:  # a classes.json the project cannot read: refused before anything is written
        read_project_classes(classes_file(project))
    paths = install_scripts(project, overwrite=overwrite, **settings)
    folder = paths[0].parent
    click.echo(f"scripts installed in {folder}")
    for path in paths:
        if path.name == SETTINGS_NAME:
            click.echo(f"  {path.name} (settings)")
        else:
            click.echo(f"  {path.name}  (menu: {path.stem.replace('_', ' ')})")
    if sketch_class:
        update = add_project_classes(project, histosynth_classes())
        if update.added:
            click.echo(
                f"class {SKETCH_CLASS!r} added to {update.path}"
                + (f" (previous file: {update.backup.name})" if update.backup else "")
                + "; a project open in QuPath shows it once reopened"
            )
        else:
            click.echo(f"class {SKETCH_CLASS!r}: already in {update.path}")
    click.echo("In QuPath: Automate > Project scripts > histosynth > Synthesize vessels")


@qupath.command("plan", context_settings=HELP_CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@project_option(
    "QuPath project (project.qpproj or its folder) the run's tiles go into.",
    short=False,
    required=True,
)
@click.option("--run-name", default=None, help="histosynth.run of the entries [the run's name].")
@wait_option
def plan_command(run: Path, project: Path, run_name: str | None, wait_s: float) -> None:
    """Plan adding RUN's synthetic tiles to PROJECT, for the menu scripts.

    Checks every tile against the project, writes each tile's calibrated TIFF
    (RUN/images/<id>.tif) and RUN/qupath-plan.json: per new entry its image, name,
    description, metadata, tags and annotations, as the native write-back writes them.
    The project itself is not changed; the "Synthesize vessels" script applies the plan.
    """
    plan, path = plan_for_scripts(run, project, run_name=run_name, wait_s=wait_s)
    click.echo(
        f"{len(plan.entries)} new entry(ies), {len(plan.skipped)} skipped, "
        f"run {plan.run_name!r}: {path}"
    )
