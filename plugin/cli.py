"""The ``histosynth`` command line.

Exit codes: 0 success; 1 a user error, reported as one line on stderr (``--debug`` shows
the traceback); 2 a usage error (click's own).
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

import click

from histosynth import __version__

log = logging.getLogger("histosynth")


class _OneLineHandler(logging.Handler):
    """Warnings as ``histosynth: warning: …`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"histosynth: {record.levelname.lower()}: {record.getMessage()}", err=True)


def _setup_logging(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """Send histosynth's log records to stderr as one line each, for this invocation only
    (restored when the command ends, so in-process callers keep their own logging)."""
    root = logging.getLogger("histosynth")
    saved = (root.handlers[:], root.level, root.propagate)
    root.handlers[:] = [_OneLineHandler()]
    root.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING)
    root.propagate = False

    def restore() -> None:
        root.handlers[:], level, root.propagate = saved[0], saved[1], saved[2]
        root.setLevel(level)

    ctx.call_on_close(restore)


def _user_errors() -> tuple[type[Exception], ...]:
    from histosynth.integration.errors import InputError
    from histosynth.manifest import ManifestError

    errors: list[type[Exception]] = [InputError, ManifestError]
    try:
        from histosynth.synthesis.errors import EngineError
    except ImportError:  # engine not installed in this build
        pass
    else:
        errors.append(EngineError)
    return tuple(errors)


class HistosynthGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _user_errors() as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"histosynth: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("histosynth: interrupted; run again with --resume to continue", err=True)
            ctx.exit(130)


def _progress(ctx: click.Context, description: str):
    quiet = bool(ctx.obj and ctx.obj.get("quiet"))

    def wrap(items: Iterable, total: int) -> Iterable:
        from tqdm.auto import tqdm

        return tqdm(
            items,
            total=total,
            desc=description,
            unit="tile",
            disable=quiet,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    return wrap


@click.group(cls=HistosynthGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="histosynth")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or warnings.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """histosynth: synthetic blood-vessel tiles for QuPath and TIAToolbox projects."""
    ctx.ensure_object(dict)
    ctx.obj.update(quiet=quiet, debug=debug)
    _setup_logging(ctx, quiet, debug)


def _input_options(func):
    func = click.option(
        "--project",
        "-p",
        type=click.Path(path_type=Path),
        help="QuPath project: project.qpproj or its folder.",
    )(func)
    func = click.option(
        "--slide",
        "-s",
        type=click.Path(path_type=Path),
        help="A slide any TIAToolbox reader opens (with --annotations).",
    )(func)
    func = click.option(
        "--annotations",
        "-a",
        type=click.Path(path_type=Path),
        help="GeoJSON annotations of --slide (QuPath 0.2–0.7 or plain).",
    )(func)
    func = click.option(
        "--slide-mpp",
        type=float,
        default=None,
        help="µm/px of slides that carry no resolution metadata.",
    )(func)
    return func


@main.command()
@_input_options
@click.option(
    "--class",
    "classes",
    multiple=True,
    required=True,
    help="Annotation class to extract (repeatable); 'Vessel' includes 'Vessel: …'.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="Dataset folder to write (created).",
)
@click.option(
    "--tile-size",
    type=click.IntRange(16, 16384),
    default=1024,
    show_default=True,
    help="Tile width and height in px at --mpp.",
)
@click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=0.5,
    show_default=True,
    help="Target resolution in µm/px (0.5 = 20×).",
)
@click.option(
    "--min-area",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Skip vessels smaller than this, in µm².",
)
@click.option(
    "--max-area",
    type=click.FloatRange(min=0),
    default=None,
    help="Skip vessels larger than this, in µm².",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option(
    "--skip-missing",
    is_flag=True,
    help="Skip project entries whose image cannot be found instead of stopping.",
)
@click.pass_context
def extract(
    ctx: click.Context,
    project,
    slide,
    annotations,
    slide_mpp,
    classes,
    out,
    tile_size,
    mpp,
    min_area,
    max_area,
    resume,
    skip_missing,
) -> None:
    """Real vessel tiles, masks and per-tile GeoJSON into a dataset.

    One tile per vessel of the chosen classes, centred on it, at --mpp. Give a QuPath
    project (vessels from paquo or P/annotations/<entryID>.geojson) or a slide with a
    GeoJSON file.
    """
    from histosynth.workflows import extract as run_extract

    if (project is None) == (slide is None):
        raise click.UsageError("give either --project or --slide (with --annotations)")
    if slide is not None and annotations is None:
        raise click.UsageError("--slide needs --annotations")
    result = run_extract(
        classes=classes,
        out=out,
        project=project,
        slide=slide,
        annotations=annotations,
        tile_size=tile_size,
        mpp=mpp,
        slide_mpp_override=slide_mpp,
        min_area_um2=min_area,
        max_area_um2=math.inf if max_area is None else max_area,
        resume=resume,
        skip_missing=skip_missing,
        progress=_progress(ctx, "extract"),
        command=shlex.join(["histosynth", *sys.argv[1:]]),
    )
    if not ctx.obj.get("quiet"):
        click.echo(
            f"{result.written} tile(s) written, {result.already_present} already present, "
            f"{len(result.skipped)} vessel(s) skipped (reasons in {result.run_dir / 'run.json'})"
        )
        click.echo(f"dataset: {result.run_dir}")


@main.group()
def models() -> None:
    """Model presets and where their weights are (offline: nothing is downloaded)."""


@models.command("list")
def models_list() -> None:
    """Every preset, its tile size and scale, and whether its weights were found."""
    from histosynth.synthesis.engine import format_models_report

    click.echo(format_models_report(None))


@models.command("check")
@click.argument("preset", required=False, default="pixcell-1024")
@click.pass_context
def models_check(ctx: click.Context, preset: str) -> None:
    """Where each component of PRESET was found, or every place looked and how to provide it.

    Exits 1 when a component is missing.
    """
    from histosynth.synthesis.engine import check_preset, format_models_report

    click.echo(format_models_report(preset))
    if not check_preset(preset):
        ctx.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
