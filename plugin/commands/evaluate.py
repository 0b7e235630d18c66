"""``histosynth evaluate``: fidelity metrics of a run against real tiles (the work:
:mod:`histosynth.workflows.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    batch_size_option,
    device_option,
    path_option,
    value_option,
)
from histosynth.commands.progress import progress_for
from histosynth.commands.to_workflow import command_line
from histosynth.options import COUNT_MAX


@click.command(context_settings=HELP_CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@path_option(
    "--real",
    "real",
    help="The real tiles: a dataset written by 'histosynth extract' (or a run holding "
    "extracted rows). Required, except for --mask-adherence with --segmenter.",
)
@value_option(
    "--features",
    default="default",
    help="Feature spaces, comma-separated: default (the embedded engine's encoder; "
    "offline, not comparable with published numbers), inception (FID's Inception-v3; "
    "needs torch-fidelity), clip (CLIP ViT-B/32: CLIP-FID), cmmd (CLIP ViT-L/14-336), "
    "uni2-h, virchow2, h-optimus-1 (pathology encoders), or tiny (tests). Weights are "
    "found offline: see 'histosynth models list'.",
)
@click.option("--per-class", is_flag=True, help="Also measure each vessel class on its own.")
@value_option(
    "--max-images",
    type=click.IntRange(2, COUNT_MAX),
    help="At most this many tiles per side (a seeded sample).",
)
@batch_size_option("Tiles per feature-extractor or segmenter call.", high=1024)
@device_option("cuda, cpu … [cpu; the segmenter: cuda when available].")
@click.option(
    "--mask-adherence",
    is_flag=True,
    help="Also measure whether each masked synthetic tile's pixels follow its mask: a "
    "segmenter trained on the --real tiles only segments it; IoU and boundary F1 (2 px) "
    "per synthesis type, per tile in RUN/adherence.json.",
)
@path_option(
    "--segmenter",
    help="A segmenter saved with --save-segmenter: used instead of training one "
    "(implies --mask-adherence).",
)
@path_option(
    "--save-segmenter",
    help="Write the segmenter trained for --mask-adherence to this file (implies it).",
)
@value_option(
    "--segmenter-arch",
    default="unetplusplus",
    help="segmentation_models_pytorch architecture of the segmenter (as the benchmark).",
)
@value_option(
    "--segmenter-encoder",
    default="efficientnet-b1",
    help="Its encoder (smp's name, e.g. tu-<timm name>), trained from scratch.",
)
@value_option(
    "--segmenter-epochs",
    type=click.IntRange(1, 10000),
    default=20,
    help="Its training epochs on the real tiles.",
)
@click.pass_context
def evaluate(
    ctx: click.Context,
    run: Path,
    real: Path,
    features: str,
    per_class: bool,
    max_images: int | None,
    batch_size: int | None,
    device: str | None,
    mask_adherence: bool,
    segmenter: Path | None,
    save_segmenter: Path | None,
    segmenter_arch: str,
    segmenter_encoder: str,
    segmenter_epochs: int,
) -> None:
    """Fidelity of RUN's synthetic tiles against real vessel tiles: FID, KID,
    precision / recall, density / coverage, NND, CMMD and the cosine to each tile's
    source, in each feature space named; the table is printed and written to
    RUN/metrics.json. With --mask-adherence, also how well each masked synthetic
    tile's segmented vessel follows its own mask."""
    from histosynth.workflows.adherence import adherence_settings
    from histosynth.workflows.evaluate import evaluate as run_evaluate

    adherence = None
    if mask_adherence or segmenter or save_segmenter:
        adherence = adherence_settings(
            segmenter, save_segmenter, arch=segmenter_arch, encoder=segmenter_encoder,
            epochs=segmenter_epochs, batch_size=batch_size or 8,
        )
    result = run_evaluate(
        run,
        real,
        features=features,
        per_class=per_class,
        max_images=max_images,
        batch_size=batch_size,
        device=device,
        progress=progress_for(ctx, "evaluate", unit="batch"),
        command=command_line(),
        adherence=adherence,
        adherence_progress=progress_for(ctx, "segmenter", unit="epoch"),
    )
    if result.path is not None:
        click.echo(
            f"{result.counts['synthetic']} synthetic tile(s) against "
            f"{result.counts['real']} real tile(s):"
        )
        click.echo(result.table())
        click.echo(f"metrics: {result.path}")
    if result.adherence is not None:
        click.echo(result.adherence.heading())
        click.echo(result.adherence.table())
        click.echo(f"adherence: {result.adherence.path}")
