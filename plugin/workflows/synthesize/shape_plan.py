"""Shape mode's tiles: the target outline of each (an annotator's sketch, or a real
vessel outline deformed), and the donor warped into it (rendered by
:func:`~histosynth.workflows.synthesize.tile_plan.render_inpaint`).

``--shapes drawn``: tile i is centred on the i-th sketch (slide, then annotation id order),
its donor the i-th of the seeded donor cycle. ``--shapes bank``: tile i takes the outline
of a seeded real vessel of the class, deformed by a seed of its own (elastic field,
rotation, flip, an area within the class's range), placed on the backgrounds tile i tries
(:class:`~histosynth.workflows.synthesize.tile_plan.BackgroundOrders`) where it fits.
Every choice follows from the run's seed and the tile's index alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from shapely.geometry import Polygon

from histosynth.integration.masks import rasterize
from histosynth.integration.sketches import Sketch, sketch_tile
from histosynth.integration.tiles import DONOR_MAX_FRACTION, Background, Donor
from histosynth.workflows.synthesize.tile_plan import PlannedTile, SkippedTile

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.workflows.synthesize.settings import SynthesisSettings

__all__ = [
    "ShapeTarget",
    "ShapeTargets",
    "compose_shape_tile",
]


@dataclass
class ShapeTarget:
    """Tile ``index``'s target outline: ``outline`` (n, 2) px and ``mask`` (uint8 0/255)
    in the tile (``drawn``, with the sketch's tile as ``background``) or in a crop of its
    own (``bank``, placed later); ``shape_id``: the sketch's annotation id, or the bank
    outline's source annotation id and deformation seed (``<id>@<seed>``)."""

    source: str
    shape_id: str
    outline: np.ndarray
    mask: np.ndarray
    background: Background | None = None


class ShapeTargets:
    """The target outline of each tile of a shape run (made when asked, from the seed)."""

    def __init__(
        self, run: SynthesisSettings, donors: Sequence[Donor], sketches: Sequence[Sketch]
    ) -> None:
        self.run, self.donors, self.sketches = run, donors, sketches
        areas = [float((d.mask > 0).sum()) for d in donors]
        self.area_range = (min(areas), max(areas)) if areas else (0.0, 0.0)

    def __call__(self, index: int) -> ShapeTarget:
        if self.run.shapes == "drawn":
            sketch = self.sketches[index]
            background, outline, mask = sketch_tile(sketch, self.run.geometry, self.run.classes)
            return ShapeTarget("drawn", sketch.annotation.id, outline, mask, background)
        return self._bank(index)

    def _bank(self, index: int) -> ShapeTarget:
        from histosynth.synthesis.inpaint.shape import donor_outline, target_frame
        from histosynth.synthesis.inpaint.warp import deform_outline

        run = self.run
        pick = np.random.default_rng([run.seed, index, 11])
        model = self.donors[int(pick.integers(len(self.donors)))]
        deformation = int(pick.integers(2**31))
        rng = np.random.default_rng(deformation)
        outline = deform_outline(donor_outline(model.mask), rng, area_range=self.area_range)
        # the crop (outline, ring, margin) stays within the share of the tile a donor may
        # fill: a larger draw is scaled down to fit
        margin = run.ring + 2
        limit = run.tile_size * DONOR_MAX_FRACTION - 2 * margin
        span = float((outline.max(axis=0) - outline.min(axis=0)).max())
        if span > limit:
            outline = outline * (limit / span)
        moved, shape = target_frame(outline, margin)
        mask = rasterize([Polygon(moved)], origin=(0, 0), scale=1.0, shape=shape)
        return ShapeTarget("bank", f"{model.vessel.id}@{deformation}", moved, mask)


def compose_shape_tile(
    index: int,
    donor: Donor,
    target: ShapeTarget,
    backgrounds: Sequence[Background],
    order: Sequence[int],
    run: SynthesisSettings,
) -> PlannedTile | SkippedTile:
    """Tile ``index``'s composite: ``donor`` warped into ``target``, on the sketch's own
    tile (``drawn``) or on the first background of ``order`` it fits (``bank``)."""
    from histosynth.synthesis.inpaint.shape import prepare_shape_composite, warp_into_target

    def paste(background: Background, place: bool):
        return prepare_shape_composite(
            background.image,
            crop,
            tissue=background.tissue,
            existing=background.existing_mask if place else None,
            seed=run.seed + index,
            place=place,
            colour_blend=run.colour_blend,
        )

    try:
        # the warp does not depend on the background: once per tile, whatever it tries
        crop = warp_into_target(
            donor.image,
            donor.mask,
            target.outline,
            target.mask,
            context_ring=run.ring,
            donor_exclude=donor.others,
        )
        if target.background is not None:
            made = paste(target.background, place=False)
            return PlannedTile(index, donor, target.background, made)
        for b in order:
            made = paste(backgrounds[b], place=True)
            if made is not None:
                return PlannedTile(index, donor, backgrounds[b], made)
    except ValueError as exc:
        return SkippedTile(index, f"shape {target.shape_id}, donor {donor.vessel.id}: {exc}",
                           str(exc))
    reason = f"shape {target.shape_id} fits no background tile (tissue, free space)"
    return SkippedTile(index, reason, reason)
