"""``histosynth benchmark downstream``: does the synthetic data help a downstream model?

The seed's protocol (Tables 8–9): slide-level k-fold cross-validation of the real tiles
(``--split`` 70 / 15 / 15 by slide, :mod:`histosynth.integration.splits`), three arms per
fold trained from the same seed —

* ``source`` — the fold's real training tiles;
* ``augmented`` — the same, each tile freshly augmented every epoch (stain, geometry,
  brightness / contrast: :data:`~histosynth.synthesis.downstream.AUGMENTATION`);
* ``synthetic`` — ``augmented`` plus the synthetic tiles whose slides (vessel and
  background) are all training slides of the fold —

validated (best epoch) and tested on real tiles only. The real tiles are a tile set
folder or a COCO instance dataset (each image a tile, its mask the union of its
instances; its slide the provenance's ``slide_group`` / ``source_image``, else the image
file: :mod:`histosynth.integration.coco_read`). Segmentation (UNet++ by default,
``segmentation_models_pytorch``): IoU, sensitivity, specificity of vessel pixels.
Classification (EfficientNet-b1 by default, timm; invasive = a class name containing
"Invasive"): F1, sensitivity, specificity. Mean ± sd over folds.

``OUT`` holds ``benchmark.json`` (the settings; a resumed run must match them),
``splits.json`` (every fold's slides and tiles, and the synthetic tiles left out and
why), ``folds/fold-<k>-<arm>.json`` (one per finished fold and arm: ``--resume`` skips
them), ``results.csv`` / ``results.json`` (the table) and ``folds.png`` (per-fold scores).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histosynth import __version__
from histosynth.common.files import atomic_write_bytes, atomic_write_json
from histosynth.integration.dataset import utc_now
from histosynth.integration.errors import InputError
from histosynth.integration.images import read_mask, read_rgb
from histosynth.integration.splits import (
    LabelledTile,
    fold_tiles,
    leaks,
    read_labelled_tiles,
    slide_folds,
    slide_group,
    slide_stem,
    write_split_file,
)

log = logging.getLogger("histosynth")

__all__ = ["ARMS", "METRICS", "DownstreamResult", "DownstreamSettings", "run_downstream"]

ARMS = {
    "source": "Source",
    "augmented": "+ Augmentation",
    "synthetic": "+ Augmentation + Synthetic",
}
"""The three arms, in the seed's row order, with their row labels."""
METRICS = {
    "segmentation": ("iou", "sensitivity", "specificity"),
    "classification": ("f1", "sensitivity", "specificity"),
}
DEFAULT_ENCODER = {"segmentation": "efficientnet-b1", "classification": "efficientnet_b1"}
INVASIVE = "invasive"


@dataclass(frozen=True)
class DownstreamSettings:
    """What to train and how (checked when made). ``split``: train, validation, test
    fractions of the slides; ``encoder``: ``None`` = EfficientNet-b1 for the task;
    ``encoder_weights``: a local file, ``None`` = from scratch; ``lr`` AdamW's."""

    task: str = "segmentation"
    folds: int = 10
    split: tuple[float, float, float] = (0.70, 0.15, 0.15)
    arch: str = "unetplusplus"
    encoder: str | None = None
    encoder_weights: str | None = None
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in METRICS:
            raise InputError(
                f"--task must be one of {', '.join(METRICS)}, not {self.task!r}", item="--task"
            )
        for name, value, low in (("--folds", self.folds, 1), ("--epochs", self.epochs, 1),
                                 ("--batch-size", self.batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be a whole number ≥ {low}, not {value!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise InputError(f"the learning rate must be in (0, 1), not {self.lr!r}")
        object.__setattr__(self, "split", tuple(float(f) for f in self.split))

    @property
    def model_encoder(self) -> str:
        return self.encoder or DEFAULT_ENCODER[self.task]


@dataclass
class DownstreamResult:
    """The benchmark's table: per arm, per metric, the per-fold values."""

    out_dir: Path
    task: str
    per_fold: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, tuple[float, float]]]:
        """arm → metric → (mean, sd) over folds (sd 0 for one fold; nan folds left out)."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for arm, metrics in self.per_fold.items():
            out[arm] = {}
            for metric, values in metrics.items():
                kept = np.array([v for v in values if not math.isnan(v)], float)
                if not len(kept):
                    out[arm][metric] = (math.nan, math.nan)
                    continue
                sd = float(kept.std(ddof=1)) if len(kept) > 1 else 0.0
                out[arm][metric] = (float(kept.mean()), sd)
        return out

    def table(self) -> str:
        """The seed's layout: one row per arm, mean ± sd of each metric."""
        metrics = METRICS[self.task]
        names = {"iou": "IoU", "f1": "F1", "sensitivity": "Sensitivity",
                 "specificity": "Specificity"}
        lines = ["| Method | " + " | ".join(names[m] for m in metrics) + " |",
                 "|---|" + "---:|" * len(metrics)]
        for arm, scores in self.summary().items():
            cells = [f"{scores[m][0]:.4f} ± {scores[m][1]:.4f}" for m in metrics]
            lines.append(f"| {ARMS[arm]} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _label(tile: LabelledTile) -> int:
    return int(INVASIVE in tile.class_name.lower())


def coco_real_tiles(
    coco: str | Path, images: str | Path, need_masks: bool = True
) -> tuple[list[LabelledTile], dict[str, np.ndarray]]:
    """The tiles of a COCO dataset as real tiles (those its provenance marks rejected or
    failed by the content check left out; with ``need_masks`` also those it marks
    ``has_mask`` false: image-level labels), and their masks (tile id → uint8 0 / 255,
    the union of the image's instances; none: an empty mask).

    Raises:
        InputError: a COCO file or image that cannot be used, or no tile left.
    """
    from histosynth.integration.coco_read import image_mask, read_coco
    from histosynth.integration.content_check import qc_failed

    data = read_coco(coco, images)
    tiles, masks = [], {}
    for image in data.images:
        provenance = image.attributes
        if (
            provenance.get("review_status", "").lower() == "rejected"
            or qc_failed(provenance.get("qc"))
            or (need_masks and provenance.get("has_mask") == "false")
        ):
            continue
        group = provenance.get("slide_group") or slide_group(provenance) or slide_stem(
            str(image.path)
        )
        source = provenance.get("source_image")
        tiles.append(LabelledTile(
            id=image.tile_id, image=image.path, mask=None, class_name=image.class_name,
            synthesis_type=provenance.get("synthesis_type") or "extracted",
            slide_group=group, background_slide=slide_stem(source) if source else group,
        ))
        masks[image.tile_id] = image_mask(image)
    if not tiles:
        raise InputError("no tiles to use (all rejected or failed the content check)",
                         path=data.file)
    return tiles, masks


def _real_tiles(
    real: str | Path | None, coco: str | Path | None, images: str | Path | None,
    need_masks: bool,
) -> tuple[Path, Path | None, list[LabelledTile], dict[str, np.ndarray]]:
    """The real tiles of the tile set ``real`` or of the COCO file ``coco`` (its images in
    ``images``): the absolute file and images folder they came from, the tiles, and the
    masks that are not files (COCO's)."""
    if (real is None) == (coco is None) or (coco is None) != (images is None):
        raise InputError("give the real tiles as a tile set folder, or a COCO file with "
                         "its images folder")
    if coco is not None:
        coco, images = Path(coco).absolute(), Path(images).absolute()
        return (coco, images, *coco_real_tiles(coco, images, need_masks))
    real = Path(real).absolute()
    return real, None, read_labelled_tiles(real, need_masks=need_masks), {}


def _load(tiles: Iterable[LabelledTile], task: str, cache: dict,
          masks: dict[str, np.ndarray] | None = None) -> None:
    """Images (and masks) of ``tiles`` into ``cache`` (id → (image, target)); ``masks``:
    the masks of tiles that have no mask file (id → mask)."""
    shape = next((v[0].shape for v in cache.values()), None)
    for tile in tiles:
        if tile.id in cache:
            continue
        image = read_rgb(tile.image, f"tile {tile.id}")
        if shape is None:
            shape = image.shape
        if image.shape != shape:
            raise InputError(
                f"the tile is {image.shape[1]}×{image.shape[0]} px, the others "
                f"{shape[1]}×{shape[0]} px: the benchmark trains on tiles of one size",
                path=tile.image,
            )
        if task == "segmentation":
            if masks is not None and tile.id in masks:
                target = masks[tile.id] > 0
            else:
                target = read_mask(tile.mask, f"tile {tile.id}") > 0
            if target.shape != image.shape[:2]:
                raise InputError("the mask is not the size of its image",
                                 path=tile.mask or tile.image)
        else:
            target = np.int64(_label(tile))
        cache[tile.id] = (image, target)


def _arrays(tiles: list[LabelledTile], cache: dict) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([cache[t.id][0] for t in tiles]),
            np.stack([cache[t.id][1] for t in tiles]))


def _config(settings: DownstreamSettings, real: Path, synthetic: Path,
            images: Path | None = None) -> dict[str, Any]:
    """``benchmark.json``'s config (``images``: the folder of a COCO ``real``)."""
    config = {"real": str(real), "synthetic": str(synthetic), **asdict(settings),
              "split": list(settings.split)}
    if images is not None:
        config["real_images"] = str(images)
    return config


def _prepare_out(out: Path, config: dict[str, Any], resume: bool) -> None:
    settings_file = out / "benchmark.json"
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise InputError(
                "the output folder is not empty; use --resume to continue it, or a new --out",
                path=out,
            )
        if not settings_file.is_file():
            raise InputError("not a downstream benchmark folder (no benchmark.json)", path=out)
        before = json.loads(settings_file.read_text(encoding="utf-8")).get("config", {})
        changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
        if changed:
            raise InputError(
                f"cannot resume: the benchmark was started with other {', '.join(changed)}",
                path=settings_file,
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(settings_file, {"histosynth": __version__, "created_at": utc_now(),
                                      "config": config})


def run_downstream(
    real: str | Path | None,
    synthetic: str | Path,
    out: str | Path,
    settings: DownstreamSettings,
    *,
    coco: str | Path | None = None,
    images: str | Path | None = None,
    device: str | None = None,
    resume: bool = False,
    progress: Callable[[Iterable, int], Iterable] | None = None,
) -> DownstreamResult:
    """Run the three arms on every fold (module docstring) and write the table. The real
    tiles are the tile set ``real``, or the COCO file ``coco`` with its ``images`` folder.

    Raises:
        InputError: bad settings, a set without tiles or masks (segmentation), tiles of
            different sizes, fewer than 3 slides, a class missing (classification), a
            non-empty ``out`` without ``resume``, or one resumed with other settings.
    """
    import torch

    from histosynth.synthesis import downstream as ds
    from histosynth.synthesis.devices import resolve_device
    from histosynth.synthesis.errors import EngineError

    need_masks = settings.task == "segmentation"
    real, images, real_tiles, real_masks = _real_tiles(real, coco, images, need_masks)
    synthetic, out = Path(synthetic).absolute(), Path(out).absolute()
    left_out: list[tuple[str, str]] = []
    fake_tiles = [t for t in read_labelled_tiles(synthetic, need_masks=need_masks,
                                                 left_out=left_out)
                  if t.synthetic]
    if not fake_tiles:
        why = f" ({len(left_out)} left out, e.g. {left_out[0][0]}: {left_out[0][1]})" if (
            left_out) else ""
        raise InputError(f"the synthetic set holds no usable inpainting or variation tiles{why}",
                         path=synthetic)
    if settings.task == "classification":
        labels = {_label(t) for t in real_tiles}
        if labels != {0, 1}:
            missing = "invasive" if 1 not in labels else "clean"
            raise InputError(
                f"classification needs invasive and clean vessels; the real tiles have no "
                f"{missing} one (an invasive vessel's class name contains 'Invasive')",
                path=real,
            )
    folds = slide_folds({t.slide_group for t in real_tiles}, settings.folds, settings.split,
                        settings.seed)
    assigned = [fold_tiles(f, real_tiles, fake_tiles) for f in folds]
    for a in assigned:
        problems = leaks(a)
        if problems:  # by construction this cannot happen; never train on a leak
            raise RuntimeError(f"fold {a.fold.index} leaks: {'; '.join(problems)}")
    config = _config(settings, real, synthetic, images)
    _prepare_out(out, config, resume)
    write_split_file(out / "splits.json", assigned, settings.seed, left_out)
    torch_device = resolve_device(device)

    cache: dict[str, tuple[np.ndarray, Any]] = {}
    result = DownstreamResult(out, settings.task)
    metrics = METRICS[settings.task]
    result.per_fold = {arm: {m: [] for m in metrics} for arm in ARMS}
    jobs = [(a, arm) for a in assigned for arm in ARMS]
    for a, arm in progress(jobs, len(jobs)) if progress else jobs:
        record = out / "folds" / f"fold-{a.fold.index}-{arm}.json"
        if resume and record.is_file():
            scores = json.loads(record.read_text(encoding="utf-8"))["scores"]
        else:
            train = a.train_real + (a.train_synthetic if arm == "synthetic" else [])
            _load([*train, *a.val, *a.test], settings.task, cache, real_masks)
            if not a.train_real or not a.val or not a.test:
                raise InputError(
                    f"fold {a.fold.index} has no real tiles on one side (slides of train "
                    f"{len(a.train_real)}, validation {len(a.val)}, test {len(a.test)} "
                    "tiles); use fewer folds or more slides",
                    path=real,
                )
            torch.manual_seed(settings.seed + a.fold.index)
            try:
                if settings.task == "segmentation":
                    model = ds.build_segmenter(settings.arch, settings.model_encoder,
                                               settings.encoder_weights)
                else:
                    model = ds.build_classifier(settings.model_encoder, settings.encoder_weights)
                trained = ds.train_model(
                    model, settings.task, _arrays(train, cache), _arrays(a.val, cache),
                    epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                    device=torch_device, seed=settings.seed + a.fold.index,
                    augmented=arm != "source",
                )
            except EngineError as exc:
                raise InputError(str(exc)) from None
            images, truth = _arrays(a.test, cache)
            predicted = ds.predict(trained.model, settings.task, images,
                                   batch_size=settings.batch_size, device=torch_device)
            if settings.task == "segmentation":
                scores = ds.segmentation_scores(*ds.confusion(truth, predicted))
            else:
                scores = ds.classification_scores(*ds.confusion(truth == 1, predicted == 1))
            atomic_write_json(record, {
                "fold": a.fold.index, "arm": arm, "scores": scores,
                "train_tiles": {"real": len(a.train_real),
                                "synthetic": len(a.train_synthetic) if arm == "synthetic" else 0},
                "test_tiles": len(a.test), "best_epoch": trained.best_epoch,
                "train_loss": trained.train_loss, "val_loss": trained.val_loss,
            })
        for m in metrics:
            result.per_fold[arm][m].append(float(scores[m]))
    result.counts = {
        "real": len(real_tiles), "synthetic": len(fake_tiles), "folds": settings.folds,
        "slides": len({t.slide_group for t in real_tiles}),
        "synthetic_excluded_per_fold": [len(a.excluded) for a in assigned],
        "synthetic_left_out": len(left_out),
    }
    _write_results(result, config)
    return result


def _write_results(result: DownstreamResult, config: dict[str, Any]) -> None:
    out, metrics = result.out_dir, METRICS[result.task]
    summary = result.summary()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(["method", *[f"{m}_{s}" for m in metrics for s in ("mean", "sd")]])
    for arm, scores in summary.items():
        writer.writerow([ARMS[arm], *[f"{v:.6f}" for m in metrics for v in scores[m]]])
    atomic_write_bytes(out / "results.csv", buffer.getvalue().encode("utf-8"))
    atomic_write_json(out / "results.json", {
        "histosynth": __version__, "created_at": utc_now(), "config": config,
        "task": result.task, "counts": result.counts,
        "summary": {arm: {m: {"mean": v[0], "sd": v[1]} for m, v in s.items()}
                    for arm, s in summary.items()},
        "per_fold": result.per_fold,
    })
    _plot(result, out / "folds.png")


def _plot(result: DownstreamResult, path: Path) -> None:
    """Per-fold scores of each arm, one panel per metric (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = METRICS[result.task]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for offset, (arm, values) in enumerate(result.per_fold.items()):
            folds = np.arange(len(values[metric]))
            ax.plot(folds + 0.1 * (offset - 1), values[metric], "o", label=ARMS[arm])
        ax.set_title(metric)
        ax.set_xlabel("fold")
        ax.set_xticks(range(len(next(iter(result.per_fold.values()))[metric])))
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
