"""``histosynth export``: a reviewed run as an image-folder training dataset or a COCO
instance-segmentation dataset (the work: :mod:`histosynth.workflows.export`,
:mod:`histosynth.workflows.export_coco`)."""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.commands.options import HELP_CONTEXT, out_option, value_option
from histosynth.commands.progress import progress_for
from histosynth.workflows.export import IMAGE_FORMATS, export_training_set
from histosynth.workflows.export_coco import SPLITS, export_coco

FORMATS = ("imagefolder", "coco")


@click.command("export", context_settings=HELP_CONTEXT)
@click.argument("run", type=click.Path(path_type=Path, file_okay=False))
@out_option("Dataset folder to create (must not exist or be empty).")
@click.option("--include-pending", is_flag=True, help="Also export tiles not reviewed yet.")
@click.option(
    "--include-qc-failed",
    is_flag=True,
    help="Also export tiles that failed the content check (qc column: fail …).",
)
@value_option(
    "--image-format",
    type=click.Choice(IMAGE_FORMATS, case_sensitive=False),
    default="png",
    help="png: exact copies of the run's images; jpg: quality 95, smaller, lossy "
    "(imagefolder only).",
)
@value_option(
    "--format",
    "dataset_format",
    type=click.Choice(FORMATS, case_sensitive=False),
    default="imagefolder",
    help="imagefolder: train/ + metadata.csv + masks/; coco: images/ + annotations/*.json, "
    "one COCO annotation per vessel instance.",
)
@value_option(
    "--split",
    type=click.Choice(SPLITS, case_sensitive=False),
    default=None,
    help="coco only: slide (train/val/test by slide_group, the benchmark's leakage rules; "
    "the default) or none (one annotations/all.json).",
)
@click.pass_context
def export(
    ctx: click.Context,
    run: Path,
    out: Path,
    include_pending: bool,
    include_qc_failed: bool,
    image_format: str,
    dataset_format: str,
    split: str | None,
) -> None:
    """Accepted (and with --include-pending, pending) tiles of RUN as an image-folder
    training dataset in OUT: train/<id>.png + train/metadata.csv, masks/<id>.png,
    README.md; or, with --format coco, as COCO: images/<id>.png and
    annotations/{train,val,test}.json (RUN may be an extract dataset: its real tiles go in
    unless rejected). Rejected tiles are never exported."""
    if dataset_format.lower() == "coco":
        if image_format.lower() != "png":
            raise click.UsageError("--format coco copies the run's PNG images: drop --image-format")
        _export_coco(ctx, run, out, include_pending, include_qc_failed, split or "slide")
        return
    if split is not None:
        raise click.UsageError("--split goes with --format coco")
    result = export_training_set(
        run,
        out,
        include_pending=include_pending,
        image_format=image_format,
        progress=progress_for(ctx, "export"),
        include_qc_failed=include_qc_failed,
    )
    left_out = ", ".join(f"{n} {status}" for status, n in result.excluded.items()) or "none"
    click.echo(f"{result.count} tiles written to {result.out_dir} (left out: {left_out})")
    pending = result.excluded.get("pending", 0)
    if pending:
        click.echo(
            f"{pending} tile(s) are pending review and were left out: review them (QuPath's "
            "'Accept / Reject synthetic image', then `histosynth review sync`), or export "
            "them unreviewed with --include-pending"
        )


def _export_coco(
    ctx: click.Context,
    run: Path,
    out: Path,
    include_pending: bool,
    include_qc_failed: bool,
    split: str,
) -> None:
    result = export_coco(
        run,
        out,
        include_pending=include_pending,
        include_qc_failed=include_qc_failed,
        split=split.lower(),
        progress=progress_for(ctx, "export"),
    )
    files = ", ".join(f"{name}.json {n}" for name, n in result.by_split.items()) or "none"
    left_out = ", ".join(f"{n} {status}" for status, n in result.excluded.items()) or "none"
    click.echo(
        f"{result.images} images, {result.annotations} vessel instances written to "
        f"{result.out_dir} as COCO (annotations/: {files} images; left out: {left_out})"
    )
    if result.left_out:
        click.echo(
            f"{len(result.left_out)} synthetic tile(s) left out of the slide split: they use "
            "a validation or test slide (info.split_rule.left_out lists them)"
        )
    pending = result.excluded.get("pending", 0)
    if pending:
        click.echo(
            f"{pending} synthetic tile(s) are pending review and were left out: review "
            "them, or export them unreviewed with --include-pending"
        )
