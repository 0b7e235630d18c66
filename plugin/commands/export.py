"""``histosynth export``: a reviewed run as an image-folder training dataset (the work:
:mod:`histosynth.workflows.export`)."""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.commands.options import HELP_CONTEXT, out_option, value_option
from histosynth.commands.progress import progress_for
from histosynth.workflows.export import IMAGE_FORMATS, export_training_set


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
    help="png: exact copies of the run's images; jpg: quality 95, smaller, lossy.",
)
@click.pass_context
def export(
    ctx: click.Context,
    run: Path,
    out: Path,
    include_pending: bool,
    include_qc_failed: bool,
    image_format: str,
) -> None:
    """Accepted (and with --include-pending, pending) tiles of RUN as an image-folder
    training dataset in OUT: train/<id>.png + train/metadata.csv, masks/<id>.png,
    README.md. Rejected tiles are never exported."""
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
