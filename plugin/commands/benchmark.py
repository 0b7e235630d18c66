"""``histosynth benchmark downstream``: does the synthetic data help a downstream model?
(the work: :mod:`histosynth.workflows.benchmark`)."""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.commands.options import (
    HELP_CONTEXT,
    FiniteFloat,
    coco_options,
    device_option,
    out_option,
    resume_option,
    seed_option,
)
from histosynth.commands.progress import progress_for
from histosynth.workflows.benchmark import ARMS, METRICS, DownstreamSettings, run_downstream


def _split(text: str) -> tuple[float, float, float]:
    """``--split``: three comma-separated fractions (train, validation, test)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"three fractions like 0.70,0.15,0.15, not {text!r}") from None
    if len(values) != 3:
        raise click.BadParameter(f"three fractions like 0.70,0.15,0.15, not {text!r}")
    return values  # type: ignore[return-value]


@click.group(context_settings=HELP_CONTEXT)
def benchmark() -> None:
    """Benchmarks of what histosynth makes."""


@benchmark.command("downstream", context_settings=HELP_CONTEXT)
@click.option("--real", type=click.Path(path_type=Path),
              help="Real tiles: an export (histosynth export) or a dataset (histosynth "
              "extract); or give them with --coco.")
@coco_options(mpp=None)
@click.option("--synthetic", type=click.Path(path_type=Path), required=True,
              help="Synthetic tiles: an export or a run.")
@click.option("--task", type=click.Choice(list(METRICS)), default="segmentation",
              show_default=True, help="Vessel segmentation, or invasive-vs-clean classification.")
@click.option("--folds", type=click.IntRange(1, 100), default=10, show_default=True,
              help="Slide-level cross-validation folds.")
@click.option("--split", "split_text", default="0.70,0.15,0.15", show_default=True,
              help="Train, validation, test fractions of the slides.")
@click.option("--arch", default="unetplusplus", show_default=True,
              help="segmentation_models_pytorch architecture (segmentation).")
@click.option("--encoder", default=None,
              help="Encoder: smp's name (segmentation, e.g. efficientnet-b1 or "
              "tu-<timm name>) or timm's (classification) [efficientnet-b1].")
@click.option("--encoder-weights", default="none", show_default=True,
              help="A local weights file for the encoder, or none (from scratch); never "
              "downloaded.")
@click.option("--epochs", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--lr", type=FiniteFloat(0.0, 1.0, min_open=True), default=1e-3,
              show_default=True, help="AdamW learning rate.")
@seed_option()
@device_option("cuda, cpu … [cuda when available].")
@out_option("Folder of the splits, per-fold results and the table.", short=False)
@resume_option("Continue an interrupted benchmark in --out.")
@click.pass_context
def downstream(ctx: click.Context, real: Path | None, coco: Path | None, images: Path | None,
               synthetic: Path, task: str, folds: int,
               split_text: str, arch: str, encoder: str | None, encoder_weights: str,
               epochs: int, batch_size: int, lr: float, seed: int, device: str | None,
               out: Path, resume: bool) -> None:
    """Train a downstream model on real tiles, + augmentation, + augmentation + synthetic
    tiles, with slide-level k-fold cross-validation; print the table (mean ± sd)."""
    if (real is None) == (coco is None):
        raise click.UsageError("give the real tiles with --real or --coco (with --images)")
    if (coco is None) != (images is None):
        raise click.UsageError("--coco and --images go together")
    settings = DownstreamSettings(
        task=task, folds=folds, split=_split(split_text), arch=arch, encoder=encoder,
        encoder_weights=None if encoder_weights.lower() == "none" else encoder_weights,
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
    )
    result = run_downstream(real, synthetic, out, settings, coco=coco, images=images,
                            device=device, resume=resume,
                            progress=progress_for(ctx, "benchmark", unit="fold·arm"))
    counts = result.counts
    click.echo(
        f"{settings.task}: {counts['real']} real tile(s) from {counts['slides']} slide(s), "
        f"{counts['synthetic']} synthetic, {settings.folds} fold(s) × {len(ARMS)} arms"
    )
    click.echo(result.table())
    click.echo(f"results: {result.out_dir / 'results.csv'} (splits: "
               f"{result.out_dir / 'splits.json'}, per fold: {result.out_dir / 'folds.png'})")
