"""``histosynth evaluate --mask-adherence``: do a run's synthetic pixels follow their masks?

A segmenter — the downstream benchmark's model (:mod:`histosynth.workflows.benchmark`:
UNet++ / EfficientNet-b1 by default, its training loop, its augmentation arm) — is trained
on the REAL tiles only (the ``extracted`` rows of ``--real``; a seeded 15 % of them held
out to pick the best epoch and to give the segmenter's own score on real tiles), or loaded
from a file saved earlier (``--segmenter``). It then segments every synthetic tile of the
run that carries a mask (any type but ``extracted``; ``mask_source`` not ``none``;
rejected rows left out), and each tile's segmented vessel is compared with the row's own
mask: IoU and boundary F1 at :data:`BOUNDARY_TOLERANCE_PX` px of the tile
(:mod:`histosynth.synthesis.metrics.adherence`). A row whose pixels do not follow its
mask — a shifted mask, a vessel drawn elsewhere — gets a low IoU, far below the rows
that do; the segmenter's score on real tiles is the ceiling to read them against.

Writes ``RUN/adherence.json`` atomically: the segmenter's config, the tolerance, the mean
± sd per synthesis type and each tile's numbers keyed by tile id (the review gallery
shows them on the tile's card).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histosynth import __version__
from histosynth.common.files import atomic_write_json
from histosynth.integration.dataset import INDEX_NAME, read_index, utc_now
from histosynth.integration.errors import InputError
from histosynth.integration.images import read_mask, read_rgb
from histosynth.integration.run_folder import has_mask, refuse_links_in, review_status
from histosynth.synthesis.metrics.adherence import BOUNDARY_TOLERANCE_PX, boundary_f1, mask_iou
from histosynth.workflows.benchmark import DownstreamSettings

__all__ = [
    "ADHERENCE_NAME",
    "AdherenceResult",
    "AdherenceSettings",
    "TileAdherence",
    "adherence_rows",
    "adherence_settings",
    "measure_adherence",
    "write_adherence",
]

ADHERENCE_NAME = "adherence.json"
VALIDATION_SHARE = 0.15
"""Share of the real tiles held out to pick the segmenter's best epoch."""
REAL_GROUP = "real (validation)"

Progress = Callable[[Iterable, int], Iterable]


@dataclass(frozen=True)
class AdherenceSettings:
    """How the segmenter is got: loaded from ``segmenter`` (a file of
    :func:`~histosynth.synthesis.downstream.saved.save_segmenter`), else trained on the
    real tiles with ``training`` (the benchmark's settings and defaults) and, with
    ``save_to``, saved there."""

    segmenter: Path | None = None
    save_to: Path | None = None
    training: DownstreamSettings = field(default_factory=DownstreamSettings)
    tolerance_px: float = BOUNDARY_TOLERANCE_PX


@dataclass(frozen=True)
class TileAdherence:
    """One tile's segmented vessel against its own mask."""

    id: str
    synthesis_type: str
    iou: float
    boundary_f1: float


@dataclass
class AdherenceResult:
    """Per-tile numbers, the segmenter's config and where they were written."""

    tiles: list[TileAdherence]
    segmenter: dict[str, Any]
    tolerance_px: float
    mpp: float | None = None
    path: Path | None = None
    segmenter_file: Path | None = None
    saved_to: Path | None = None

    def summary(self) -> dict[str, dict[str, Any]]:
        """synthesis type → tiles, mean and sd of IoU and boundary F1, the lowest-IoU
        tile; the segmenter's own score on real tiles first (as recorded when trained)."""
        out: dict[str, dict[str, Any]] = {}
        real = self.segmenter.get("validation")
        if isinstance(real, dict) and real.get("tiles"):
            out[REAL_GROUP] = dict(real)
        for kind in sorted({t.synthesis_type for t in self.tiles}):
            tiles = [t for t in self.tiles if t.synthesis_type == kind]
            out[kind] = {**_stats(tiles), "lowest": min(tiles, key=lambda t: t.iou).id}
        return out

    def table(self) -> str:
        """The summary in evaluate's table style (one row per synthesis type)."""
        tol = f"{self.tolerance_px:g} px"
        lines = [f"| synthesis type | tiles | IoU | ± | boundary F1 ({tol}) | ± | lowest IoU |",
                 "|---|---:|---:|---:|---:|---:|---|"]
        by_id = {t.id: t for t in self.tiles}
        for kind, s in self.summary().items():
            low = by_id.get(s.get("lowest", ""))
            lowest = f"{low.iou:.3f} ({low.id})" if low else ""
            lines.append(
                f"| {kind} | {s['tiles']} | {s['iou']:.3f} | {s['iou_sd']:.2f} | "
                f"{s['boundary_f1']:.3f} | {s['boundary_f1_sd']:.2f} | {lowest} |"
            )
        return "\n".join(lines)

    def heading(self) -> str:
        """One line: the segmenter, what it was trained on, the tolerance in px and µm."""
        cfg = self.segmenter
        source = (f"loaded from {self.segmenter_file}" if self.segmenter_file
                  else f"trained on {cfg.get('train_tiles', '?')} real tile(s)")
        if self.saved_to:
            source += f", saved to {self.saved_to}"
        um = f" = {self.tolerance_px * self.mpp:g} µm at {self.mpp:g} µm/px" if self.mpp else ""
        return (f"mask adherence: segmenter {cfg.get('arch')} / {cfg.get('encoder')} "
                f"({source}, {cfg.get('epochs', '?')} epochs); boundary F1 within "
                f"{self.tolerance_px:g} px{um}")


def _stats(tiles: list[TileAdherence]) -> dict[str, Any]:
    iou = np.array([t.iou for t in tiles], float)
    bf1 = np.array([t.boundary_f1 for t in tiles], float)

    def sd(values: np.ndarray) -> float:
        return float(values.std(ddof=1)) if len(values) > 1 else 0.0

    return {"tiles": len(tiles), "iou": float(iou.mean()), "iou_sd": sd(iou),
            "boundary_f1": float(bf1.mean()), "boundary_f1_sd": sd(bf1)}


def adherence_rows(run: Path) -> list[dict[str, str]]:
    """The run's synthetic rows with a mask (rejected ones left out); InputError when
    there are none."""
    rows = [r for r in read_index(run)
            if (r.get("synthesis_type") or "extracted") != "extracted" and has_mask(r)
            and r.get("mask_path") and review_status(r) != "rejected"]
    if not rows:
        raise InputError(
            "the run has no synthetic tiles with a mask to measure adherence on (variation "
            "rows carry none; rejected rows are left out)",
            path=run / INDEX_NAME,
        )
    return rows


def _mpp(rows: Iterable[dict[str, str]]) -> float | None:
    """The rows' µm/px when they all agree (else None)."""
    values = set()
    for row in rows:
        try:
            values.add(round(float(row.get("mpp") or "nan"), 6))
        except ValueError:
            return None
    if len(values) != 1:
        return None
    value = values.pop()
    return None if math.isnan(value) else value


def _load_pair(folder: Path, row: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    item = f"tile {row.get('id', '')}"
    image = read_rgb(folder / row["image_path"], item)
    mask = read_mask(folder / row["mask_path"], item) > 0
    if mask.shape != image.shape[:2]:
        raise InputError("the mask is not the size of its image", path=folder / row["mask_path"],
                         item=item)
    return image, mask


def _scores(truth: np.ndarray, predicted: np.ndarray, tolerance_px: float) -> tuple[float, float]:
    return mask_iou(truth, predicted), boundary_f1(truth, predicted, tolerance_px)


def _train(real: Path, settings: AdherenceSettings, device: Any,
           progress: Progress | None) -> tuple[Any, dict[str, Any]]:
    """The benchmark's segmenter trained on ``real``'s extracted tiles, and its config."""
    from histosynth.synthesis import downstream as ds
    from histosynth.synthesis.errors import EngineError

    rows = sorted((r for r in read_index(real) if r.get("synthesis_type") == "extracted"
                   and r.get("mask_path") and review_status(r) != "rejected"),
                  key=lambda r: r.get("id", ""))  # the index's order is the writers' race
    if len(rows) < 2:
        raise InputError(
            f"{len(rows)} real (extracted) tile(s) with a mask: the segmenter needs at least 2; "
            "make them with 'histosynth extract'", path=real / INDEX_NAME)
    pairs = [_load_pair(real, r) for r in rows]
    shapes = {p[0].shape for p in pairs}
    if len(shapes) > 1:
        raise InputError("the real tiles are of different sizes: the segmenter trains on one",
                         path=real / INDEX_NAME)
    images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    t = settings.training
    order = np.random.default_rng(t.seed).permutation(len(rows))
    n_val = max(1, round(VALIDATION_SHARE * len(rows)))
    val, train = order[:n_val], order[n_val:] if len(rows) > n_val else order
    import torch

    torch.manual_seed(t.seed)
    try:
        model = ds.build_segmenter(t.arch, t.model_encoder, t.encoder_weights)
        trained = ds.train_model(model, "segmentation", (images[train], masks[train]),
                                 (images[val], masks[val]), epochs=t.epochs,
                                 batch_size=t.batch_size, lr=t.lr, device=device, seed=t.seed,
                                 augmented=True, progress=progress)
        predicted = ds.predict(trained.model, "segmentation", images[val],
                               batch_size=t.batch_size, device=device)
    except EngineError as exc:
        raise InputError(str(exc)) from None
    scores = [_scores(m, p, settings.tolerance_px) for m, p in zip(masks[val], predicted,
                                                                    strict=True)]
    validation = _stats([TileAdherence("", REAL_GROUP, i, b) for i, b in scores])
    config = {
        "arch": t.arch, "encoder": t.model_encoder, "epochs": t.epochs, "lr": t.lr,
        "batch_size": t.batch_size, "seed": t.seed, "augmented": True,
        "best_epoch": trained.best_epoch, "tile_size": int(images.shape[1]),
        "mpp": _mpp(rows), "real": str(real), "train_tiles": len(train),
        "validation": validation, "histosynth": __version__, "created_at": utc_now(),
    }
    return trained.model, config


def _load(settings: AdherenceSettings) -> tuple[Any, dict[str, Any]]:
    from histosynth.synthesis.downstream.saved import load_segmenter
    from histosynth.synthesis.errors import EngineError

    assert settings.segmenter is not None
    try:
        return load_segmenter(settings.segmenter)
    except EngineError as exc:
        raise InputError(str(exc), item="--segmenter") from None


def _check_scale(run: Path, rows: list[dict[str, str]], config: dict[str, Any]) -> None:
    """The run's tiles must be at the segmenter's µm/px (when both are known)."""
    trained, tiles = config.get("mpp"), _mpp(rows)
    if trained and tiles and abs(trained - tiles) > 0.01 * trained:
        raise InputError(
            f"the run's tiles are at {tiles:g} µm/px, the segmenter was trained at "
            f"{trained:g} µm/px: extract the real tiles with the run's --mpp",
            path=run / INDEX_NAME)


def measure_adherence(
    run: Path,
    real: Path | None,
    settings: AdherenceSettings,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> tuple[AdherenceResult, Any]:
    """Train (or load) the segmenter and measure every masked synthetic tile of ``run``;
    returns the result and the model (nothing is written: :func:`write_adherence`).

    Raises:
        InputError: no masked synthetic row, neither ``real`` nor a segmenter file, a
            missing or corrupt segmenter file, too few real tiles, tiles at another µm/px
            than the segmenter's or not a multiple of 32 px, unreadable images or masks.
    """
    from histosynth.synthesis import downstream as ds
    from histosynth.synthesis.devices import resolve_device
    from histosynth.synthesis.errors import EngineError

    rows = adherence_rows(run)
    if settings.segmenter is None and real is None:
        raise InputError("--mask-adherence needs --real DIR (the real tiles to train the "
                         "segmenter on) or --segmenter FILE", item="--real")
    try:
        torch_device = resolve_device(device)
    except EngineError as exc:
        raise InputError(str(exc), item="--device") from None
    if settings.segmenter is not None:
        model, config = _load(settings)
    else:
        assert real is not None
        model, config = _train(real, settings, torch_device, progress)
    _check_scale(run, rows, config)
    batch = max(1, batch_size or settings.training.batch_size)
    tiles: list[TileAdherence] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        pairs = [_load_pair(run, r) for r in chunk]
        for row, (image, _) in zip(chunk, pairs, strict=True):
            if image.shape[0] % 32 or image.shape[1] % 32:
                raise InputError(f"the tile is {image.shape[1]}×{image.shape[0]} px: the "
                                 "segmenter needs sides that are multiples of 32 px",
                                 path=run / row["image_path"], item=f"tile {row['id']}")
        one_size = len({image.shape for image, _ in pairs}) == 1
        predicted = (ds.predict(model, "segmentation", np.stack([p[0] for p in pairs]),
                                batch_size=batch, device=torch_device) if one_size else
                     [ds.predict(model, "segmentation", p[0][None], device=torch_device)[0]
                      for p in pairs])
        for row, (_, mask), segmented in zip(chunk, pairs, predicted, strict=True):
            iou, bf1 = _scores(mask, segmented, settings.tolerance_px)
            tiles.append(TileAdherence(row["id"], row["synthesis_type"], iou, bf1))
    result = AdherenceResult(tiles, config, settings.tolerance_px, mpp=_mpp(rows),
                             segmenter_file=settings.segmenter)
    return result, model


def write_adherence(run: Path, result: AdherenceResult, model: Any, settings: AdherenceSettings,
                    command: str = "") -> Path:
    """Write ``RUN/adherence.json`` (and the trained segmenter to ``settings.save_to``)
    atomically; returns the JSON's path."""
    from histosynth.synthesis.downstream.saved import save_segmenter

    segmenter: dict[str, Any] = {"config": result.segmenter}
    if settings.save_to is not None and settings.segmenter is None:
        save_segmenter(model, result.segmenter, settings.save_to)
        result.saved_to = Path(settings.save_to).absolute()
    file = result.segmenter_file or result.saved_to
    if file is not None:
        segmenter["file"] = str(file)
        segmenter["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    document = {
        "format_version": 1, "created_at": utc_now(), "histosynth": __version__,
        "command": command, "segmenter": segmenter,
        "boundary_tolerance_px": result.tolerance_px, "mpp": result.mpp,
        "summary": result.summary(),
        "tiles": {t.id: {"synthesis_type": t.synthesis_type, "iou": round(t.iou, 6),
                         "boundary_f1": round(t.boundary_f1, 6)} for t in result.tiles},
    }
    result.path = refuse_links_in(run, run / ADHERENCE_NAME)
    atomic_write_json(result.path, document)
    return result.path


def adherence_settings(
    segmenter: str | os.PathLike | None = None,
    save_to: str | os.PathLike | None = None,
    *,
    arch: str = "unetplusplus",
    encoder: str | None = None,
    epochs: int = 20,
    batch_size: int = 8,
    seed: int = 0,
) -> AdherenceSettings:
    """Settings from the command line's values (the benchmark's defaults)."""
    training = DownstreamSettings(task="segmentation", arch=arch, encoder=encoder,
                                  epochs=epochs, batch_size=batch_size, seed=seed)
    return AdherenceSettings(segmenter=Path(segmenter) if segmenter else None,
                             save_to=Path(save_to) if save_to else None, training=training)
