"""``histosynth qupath …``: the QuPath menu scripts.

The group is registered on the main command line with ``main.add_command(qupath)``.
User errors are raised as :class:`~histosynth.integration.errors.InputError`, which the
main group reports as one line and exit code 1.
"""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.common.geometry import DEFAULT_MPP
from histosynth.options import COUNT_MAX, MPP_MAX, FiniteFloat, wait_option
from histosynth.qupath import MODES, SETTINGS_NAME, install_scripts


@click.group("qupath")
def qupath() -> None:
    """QuPath integration: menu scripts for a project."""


@qupath.command("install-scripts")
@click.argument("project", type=click.Path(path_type=Path))
@click.option(
    "--python",
    type=click.Path(path_type=Path),
    default=None,
    help="Python interpreter that runs histosynth [this one].",
)
@click.option(
    "--class",
    "classes",
    multiple=True,
    default=("Vessel",),
    show_default=True,
    help="Vessel class the scripts export and synthesise (repeatable); 'Vessel' includes "
    "'Vessel: …'.",
)
@click.option(
    "--count",
    "-n",
    type=click.IntRange(1, COUNT_MAX),
    default=16,
    show_default=True,
    help="Synthetic tiles per run.",
)
@click.option(
    "--model",
    default="auto",
    show_default=True,
    help="Preset (pixcell-1024, pixcell-256, default, tiny = UNTRAINED) or a local folder; "
    "auto = pixcell-1024 when its weights are installed, else the embedded default.",
)
@click.option("--mode", type=click.Choice(list(MODES)), default="inpaint", show_default=True)
@click.option(
    "--tile-size",
    type=click.IntRange(64, 16384),
    default=None,
    help="Tile side in px at --mpp [the model's].",
)
@click.option(
    "--mpp",
    type=FiniteFloat(min=0, min_open=True, max=MPP_MAX),
    default=DEFAULT_MPP,
    show_default=True,
    help="Target resolution in µm/px.",
)
@click.option(
    "--overwrite/--no-overwrite",
    default=True,
    show_default=True,
    help="Replace scripts and settings already in the project.",
)
def install_scripts_command(
    project: Path,
    python: Path | None,
    classes: tuple[str, ...],
    count: int,
    model: str,
    mode: str,
    tile_size: int,
    mpp: float,
    overwrite: bool,
) -> None:
    """Copy the histosynth menu scripts into PROJECT/scripts/histosynth/.

    PROJECT is a QuPath project: project.qpproj or its folder. QuPath then lists the scripts
    under Automate > Project scripts > histosynth. Their defaults go to
    histosynth_settings.json beside them (also listed there, to edit).
    """
    paths = install_scripts(
        project,
        python=python,
        classes=classes,
        count=count,
        model=model,
        mode=mode,
        tile_size=tile_size,
        mpp=mpp,
        overwrite=overwrite,
    )
    folder = paths[0].parent
    click.echo(f"scripts installed in {folder}")
    for path in paths:
        if path.name == SETTINGS_NAME:
            click.echo(f"  {path.name} (settings)")
        else:
            click.echo(f"  {path.name}  (menu: {path.stem.replace('_', ' ')})")
    click.echo("In QuPath: Automate > Project scripts > histosynth > Synthesize vessels")


@qupath.command("plan")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--project",
    "project",
    required=True,
    type=click.Path(path_type=Path),
    help="QuPath project (project.qpproj or its folder) the run's tiles go into.",
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
    from histosynth.integration.locks import project_lock
    from histosynth.integration.qupath import QuPathProject
    from histosynth.integration.qupath.plan import make_plan, write_entry_images, write_plan_json

    # planned under the project lock: not from a project a write-back is changing
    with project_lock(QuPathProject.locate(project), wait_s=wait_s):
        plan = make_plan(QuPathProject(project, use_paquo=False), run, run_name)
    write_entry_images(plan)
    path = write_plan_json(plan)
    click.echo(
        f"{len(plan.entries)} new entry(ies), {len(plan.skipped)} skipped, "
        f"run {plan.run_name!r}: {path}"
    )
