"""The ``histosynth`` command line.

Exit codes: 0 success; 1 a user error, reported as one line on stderr (``--debug`` shows
the traceback); 2 a usage error (click's own).

Size: one click group, its options and each command's argument checks (every check runs
before a heavy import); the commands' work is in the workflow modules they call.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import warnings
from pathlib import Path

import click

from histosynth import __version__
from histosynth.common.geometry import DEFAULT_MPP
from histosynth.options import (
    COUNT_MAX,
    GUIDANCE_MAX,
    MPP_MAX,
    SEED_MAX,
    STEPS_MAX,
    FiniteFloat,
    wait_option,
)
from histosynth.progress import progress_for
from histosynth.synthesis import defaults

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
    # the commands say in their own words when an engine is UNTRAINED
    warning_filters = warnings.filters[:]
    warnings.filterwarnings("ignore", message=".*UNTRAINED", category=UserWarning)

    def restore() -> None:
        root.handlers[:], level, root.propagate = saved[0], saved[1], saved[2]
        root.setLevel(level)
        warnings.filters[:] = warning_filters

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


@click.group(cls=HistosynthGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="histosynth")
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress bars, warnings or notes (results still)."
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """histosynth: synthetic blood-vessel tiles for QuPath and TIAToolbox projects."""
    ctx.ensure_object(dict)
    ctx.obj.update(quiet=quiet, debug=debug)
    _setup_logging(ctx, quiet, debug)


#: slides of the demo project (train, validation and test slides for the benchmark)
DEMO_SLIDES = 3

_mpp_option = click.option(
    "--mpp",
    type=FiniteFloat(min=0, min_open=True, max=MPP_MAX),
    default=DEFAULT_MPP,
    show_default=True,
    help="Target resolution in µm/px (0.5 = 20×).",
)
_resume_option = click.option(
    "--resume", is_flag=True, help="Continue an interrupted run in --out."
)
_allow_untrained_option = click.option(
    "--allow-untrained",
    is_flag=True,
    help="Let an UNTRAINED engine (tiny) paint pixels — variation, synthetic backgrounds, "
    "diffusion seams — to try the workflow; its tiles fail the content check.",
)
_strict_qc_option = click.option(
    "--strict-qc",
    is_flag=True,
    help="Exit with code 1 when a tile fails the content check (they are written either "
    "way, marked in the qc column, and never exported unless --include-qc-failed).",
)
_skip_missing_option = click.option(
    "--skip-missing",
    is_flag=True,
    help="Skip project entries whose image cannot be found instead of stopping.",
)


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
        type=FiniteFloat(min=0, min_open=True, max=MPP_MAX),
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
@_mpp_option
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
@_resume_option
@_skip_missing_option
@click.option(
    "--compress",
    is_flag=True,
    help="Smaller PNGs (zlib; ~35 % smaller, several times slower to write). Both lossless.",
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
    compress,
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
        png="small" if compress else "fast",
        progress=progress_for(ctx, "extract"),
        command=shlex.join(["histosynth", *sys.argv[1:]]),
    )
    click.echo(
        f"{result.written} tile(s) written, {result.already_present} already present, "
        f"{len(result.skipped)} vessel(s) skipped (reasons in {result.run_dir / 'run.json'})"
    )
    click.echo(f"dataset: {result.run_dir}")


@main.command()
@_input_options
@click.option(
    "--class",
    "classes",
    multiple=True,
    required=True,
    help="Vessel class to synthesise (repeatable); 'Vessel' includes 'Vessel: …'.",
)
@click.option(
    "--count",
    "-n",
    type=click.IntRange(1, COUNT_MAX),
    required=True,
    help="Number of synthetic tiles.",
)
@click.option(
    "--mode",
    type=click.Choice(["inpaint", "variation"]),
    default="inpaint",
    show_default=True,
    help="inpaint: real donor vessels into new tissue; variation: new tiles like "
    "real vessel tiles.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder to write (created).",
)
@click.option(
    "--tile-size",
    type=click.IntRange(64, 16384),
    default=None,
    help="Tile side in px at --mpp [the model's: 1024 for pixcell-1024, 512 for default].",
)
@_mpp_option
@click.option(
    "--model",
    default=None,
    help="Preset (pixcell-1024, pixcell-256, default, tiny = UNTRAINED) or a local folder "
    "[pixcell-1024 when its weights are installed, else default: the embedded "
    "histosynth-mini-512].",
)
@click.option(
    "--adapter",
    default=None,
    help="LoRA style adapter: its folder, or its name in the library ($HISTOSYNTH_ADAPTERS).",
)
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option(
    "--steps",
    type=click.IntRange(1, STEPS_MAX),
    default=None,
    help=f"Denoising steps [inpaint {defaults.INPAINT_STEPS}, variation "
    f"{defaults.VARIATION_STEPS}].",
)
@click.option(
    "--guidance",
    type=FiniteFloat(1.0, GUIDANCE_MAX),
    default=None,
    help=f"Classifier-free guidance scale [inpaint {defaults.INPAINT_GUIDANCE}, variation "
    f"{defaults.VARIATION_GUIDANCE}].",
)
@click.option(
    "--strength",
    type=FiniteFloat(0.0, 1.0),
    default=None,
    help="Inpainting noise level τ: the fraction of the schedule regenerated [the engine's "
    f"own: {defaults.STRENGTH} for PixCell; the embedded default's is on its model card].",
)
@click.option(
    "--kv-compress",
    type=click.IntRange(min=1),
    default=None,
    help="KV-compression ratio R for self-attention (1 = off).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Tiles per model call [4 on CUDA, 1 on CPU].",
)
@click.option("--device", default=None, help="cuda, cuda:1, cpu … [cuda when available].")
@_resume_option
@_skip_missing_option
@click.option(
    "--background",
    type=click.Choice(["auto", "real", "synthetic"]),
    default="auto",
    show_default=True,
    help="Inpainting backgrounds: real tiles of the slides, generated ones (conditioned on "
    "real tissue near the donor), or real with generated ones where a donor fits none.",
)
@click.option(
    "--harmonise",
    type=click.Choice(["auto", "diffusion", "multiband", "none"]),
    default="auto",
    show_default=True,
    help="How the seam is regenerated: partial diffusion with the engine, multiband "
    "(Laplacian-pyramid) blending without a model step (fast on a CPU), or not at all; "
    "auto = diffusion with a trained engine, multiband with an UNTRAINED one. "
    "Beyond 4σ of the seam the tile is the composite in every mode.",
)
@_allow_untrained_option
@_strict_qc_option
@click.option(
    "--write-project",
    type=click.Choice(["none", "native", "paquo"]),
    default="none",
    show_default=True,
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
@click.option(
    "--workers",
    type=click.IntRange(1, 4096),
    default=None,
    help="Ray workers (actors), each loading the engine once [1].",
)
@click.option(
    "--gpus-per-worker",
    type=FiniteFloat(0.0, 64.0),
    default=None,
    help="GPUs each Ray worker holds [1 when the cluster has GPUs, else 0].",
)
@wait_option
@click.pass_context
def synthesize(
    ctx: click.Context,
    project,
    slide,
    annotations,
    slide_mpp,
    classes,
    count,
    mode,
    out,
    tile_size,
    mpp,
    model,
    adapter,
    seed,
    steps,
    guidance,
    strength,
    kv_compress,
    batch_size,
    device,
    resume,
    skip_missing,
    background,
    harmonise,
    write_project,
    allow_untrained,
    strict_qc,
    ray_address,
    workers,
    gpus_per_worker,
    wait_s,
) -> None:
    """Synthetic vessel tiles, masks, GeoJSON and index into a run folder.

    Every tile records its source slide, donor annotation, model, seed and parameters in
    RUN/index.csv; review_status starts as 'pending'.
    """
    from histosynth.synthetic_tiles import SynthesisSettings
    from histosynth.synthetic_tiles import synthesize as run_synthesize

    if (project is None) == (slide is None):
        raise click.UsageError("give either --project or --slide (with --annotations)")
    if slide is not None and annotations is None:
        raise click.UsageError("--slide needs --annotations")
    if write_project != "none" and project is None:
        raise click.UsageError("--write-project needs --project")
    if ray_address is None and (workers is not None or gpus_per_worker is not None):
        raise click.UsageError("--workers and --gpus-per-worker need --ray")
    ray = None
    if ray_address is not None:
        from histosynth.scale_out import RayOptions

        ray = RayOptions(ray_address, workers or 1, gpus_per_worker)
    settings = SynthesisSettings(
        classes=classes,
        count=count,
        mode=mode,
        tile_size=tile_size,
        mpp=mpp,
        model=model,
        adapter=adapter,
        seed=seed,
        steps=steps,
        guidance=guidance,
        strength=strength,
        kv_compress=kv_compress,
        batch_size=batch_size,
        device=device,
        background=background,
        harmonise=harmonise,
        allow_untrained=allow_untrained,
    )
    result = run_synthesize(
        settings,
        out=out,
        project=project,
        slide=slide,
        annotations=annotations,
        slide_mpp_override=slide_mpp,
        resume=resume,
        skip_missing=skip_missing,
        progress=progress_for(ctx, "synthesize"),
        command=shlex.join(["histosynth", *sys.argv[1:]]),
        ray=ray,
    )
    _report_synthesis(ctx, result)
    _write_back(ctx, write_project, project, result.run_dir, wait_s=wait_s)
    _fail_on_qc(strict_qc, result)


def _fail_on_qc(strict: bool, result) -> None:
    """``--strict-qc``: exit 1 when a tile of this call failed the content check."""
    if strict and result.qc_failed:
        raise click.exceptions.Exit(1)


def _write_back(
    ctx: click.Context, how: str, project, run_dir: Path, *, wait_s: float = 0.0
) -> None:
    """Add a finished run's tiles to the QuPath project (``--write-project``)."""
    if how == "none":
        return
    if project is None:
        raise click.UsageError("--write-project needs --project")
    if how == "native":
        from histosynth.integration.qupath.writeback import write_run_to_project

        written = write_run_to_project(project, run_dir, wait_s=wait_s)
    else:
        from histosynth.integration.qupath.paquo_writer import write_run_with_paquo

        written = write_run_with_paquo(project, run_dir, wait_s=wait_s)
    click.echo(written.summary())


def _report_synthesis(ctx: click.Context, result) -> None:
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


@main.command()
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for the demo project (DIR/project) and run (DIR/run).",
)
@click.option(
    "--model",
    default=None,
    help="Preset or local folder [pixcell-1024 when installed, else default: the embedded "
    "histosynth-mini-512]; tiny is UNTRAINED.",
)
@click.option("--count", "-n", type=click.IntRange(1, COUNT_MAX), default=4, show_default=True)
@click.option(
    "--tile-size",
    type=click.IntRange(64, 4096),
    default=None,
    help="Tile side in px [the model's; 512 for tiny].",
)
@click.option("--steps", type=click.IntRange(1, STEPS_MAX), default=10, show_default=True)
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option(
    "--harmonise",
    type=click.Choice(["auto", "diffusion", "multiband", "none"]),
    default="auto",
    show_default=True,
    help="How seams are regenerated; auto = diffusion with a trained engine, multiband "
    "blending with an UNTRAINED one (whose diffusion seams are noise).",
)
@_allow_untrained_option
@click.pass_context
def demo(
    ctx: click.Context,
    out: Path,
    model: str | None,
    count: int,
    tile_size: int | None,
    steps: int,
    seed: int,
    harmonise: str,
    allow_untrained: bool,
) -> None:
    """Build a demo QuPath project (three pyramidal slides from real H&E shipped with
    TIAToolbox, vessel annotations) in DIR/project, synthesise vessels into DIR/run and add them to
    the project as entries marked for review.

    Running it again reuses the project and finishes (or keeps) the run; nothing is added
    twice.
    """
    from histosynth.integration.demodata import build_demo_project
    from histosynth.synthetic_tiles import SynthesisSettings
    from histosynth.synthetic_tiles import synthesize as run_synthesize

    if out.exists() and not out.is_dir():
        from histosynth.integration.errors import InputError

        raise InputError("the output folder is a file", path=out)
    from histosynth.synthesis.weights import check_model

    check_model(model)  # before anything is built: a bad model leaves no half-built demo
    project_file = out / "project" / "project.qpproj"
    if not project_file.exists():
        # three slides: enough for a slide-level train / validation / test split
        # (histosynth benchmark downstream) of the demo's own tiles
        project_file = build_demo_project(out / "project", slide=DEMO_SLIDES)
    quiet = ctx.obj.get("quiet")
    click.echo(f"demo project: {project_file}")
    if harmonise == "auto":
        from histosynth.synthesis.weights import PRESETS

        untrained = model in PRESETS and not PRESETS[model].trained
        if untrained and not quiet:
            click.echo(
                f"the {model} engine is UNTRAINED: seams are harmonised by multiband blending "
                "(--harmonise diffusion --allow-untrained shows what it makes of them)"
            )
    settings = SynthesisSettings(
        classes=("Vessel",),
        count=count,
        mode="inpaint",
        tile_size=tile_size or (512 if model == "tiny" else None),
        mpp=DEFAULT_MPP,
        model=model,
        seed=seed,
        steps=steps,
        harmonise=harmonise,
        allow_untrained=allow_untrained,
    )
    result = run_synthesize(
        settings,
        out=out / "run",
        project=project_file,
        resume=(out / "run" / "index.csv").exists(),
        progress=progress_for(ctx, "demo"),
        command=shlex.join(["histosynth", *sys.argv[1:]]),
    )
    _report_synthesis(ctx, result)
    _write_back(ctx, "native", project_file, out / "run")
    click.echo(f"open the project in QuPath: {project_file}")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--real",
    "real",
    type=click.Path(path_type=Path),
    required=True,
    help="The real tiles: a dataset written by 'histosynth extract' (or a run holding "
    "extracted rows).",
)
@click.option(
    "--features",
    default="default",
    show_default=True,
    help="Feature spaces, comma-separated: default (the embedded engine's encoder; "
    "offline, not comparable with published numbers), inception (FID's Inception-v3; "
    "needs torch-fidelity), clip (CLIP ViT-B/32: CLIP-FID), cmmd (CLIP ViT-L/14-336), "
    "uni2-h, virchow2, h-optimus-1 (pathology encoders), or tiny (tests). Weights are "
    "found offline: see 'histosynth models list'.",
)
@click.option("--per-class", is_flag=True, help="Also measure each vessel class on its own.")
@click.option(
    "--max-images",
    type=click.IntRange(2, COUNT_MAX),
    default=None,
    help="At most this many tiles per side (a seeded sample).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 1024),
    default=None,
    help="Tiles per feature-extractor call.",
)
@click.option("--device", default=None, help="cuda, cpu … [cpu].")
@click.pass_context
def evaluate(
    ctx: click.Context, run, real, features, per_class, max_images, batch_size, device
) -> None:
    """Fidelity of RUN's synthetic tiles against real vessel tiles: FID, KID,
    precision / recall, density / coverage, NND, CMMD and the cosine to each tile's
    source, in each feature space named; the table is printed and written to
    RUN/metrics.json."""
    from histosynth.evaluate import evaluate as run_evaluate

    result = run_evaluate(
        run,
        real,
        features=features,
        per_class=per_class,
        max_images=max_images,
        batch_size=batch_size,
        device=device,
        progress=progress_for(ctx, "evaluate", unit="batch"),
        command=shlex.join(["histosynth", *sys.argv[1:]]),
    )
    click.echo(
        f"{result.counts['synthetic']} synthetic tile(s) against "
        f"{result.counts['real']} real tile(s):"
    )
    click.echo(result.table())
    click.echo(f"metrics: {result.path}")


@main.group()
def models() -> None:
    """Model presets and where their weights are (offline: nothing is downloaded)."""


@models.command("list")
def models_list() -> None:
    """Every preset, its tile size and scale, and whether its weights were found."""
    from histosynth.synthesis.model_report import format_models_report

    click.echo(format_models_report(None))


@models.command("check")
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


def _register_subcommands() -> None:
    from histosynth.benchmark import benchmark
    from histosynth.cache import cache
    from histosynth.export import export
    from histosynth.qupath.cli import qupath
    from histosynth.review.cli import review
    from histosynth.train import train

    main.add_command(review)
    main.add_command(export)
    main.add_command(qupath)
    main.add_command(cache)
    main.add_command(train)
    main.add_command(benchmark)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
