"""One tile of a synthesize run, planned and made: the steps every executor shares.

The single-process run (:mod:`histosynth.workflows.synthesize.workflow`) and the Ray
actors (:mod:`histosynth.workflows.synthesize.scale_out`) call these same functions, so
both make the same tiles from the same plan: the donor order, each donor's background
ranking, the background a tile tries in turn, its composite, and the engine calls
(``plan_batches``) that render it. ``run`` is always the run's resolved
:class:`~histosynth.workflows.synthesize.settings.SynthesisSettings`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histosynth.integration.errors import InputError
from histosynth.integration.tiles import Background, Donor, ReferenceTile, most_tissue_crop

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.synthesis.engine import Engine
    from histosynth.synthesis.inpaint import CompositeResult
    from histosynth.workflows.synthesize.settings import SynthesisSettings

log = logging.getLogger(__name__)

__all__ = [
    "BackgroundOrders",
    "PlannedTile",
    "SkippedTile",
    "adapter_folder",
    "background_histograms",
    "background_ranking",
    "compose_tile",
    "donor_order",
    "load_adapter_for",
    "plan_batches",
    "render_inpaint",
    "render_shape",
    "render_variation",
    "synthetic_background",
]


@dataclass
class PlannedTile:
    index: int
    donor: Donor
    background: Background
    composite: CompositeResult


@dataclass
class SkippedTile:
    """A planned tile that cannot be made: the reason for run.json and for the result."""

    index: int
    reason: str
    detail: str


def adapter_folder(adapter: str) -> Path:
    """Where the LoRA adapter ``adapter`` is: a folder path, or a name in the adapter
    library (``$HISTOSYNTH_ADAPTERS``, else ``~/.local/share/histosynth/adapters``)."""

    as_path = Path(adapter).expanduser()
    if as_path.is_dir():
        return as_path
    from histosynth.synthesis.adapters import adapter_library

    root = adapter_library()
    candidate = root / adapter
    if candidate.is_dir():
        return candidate
    raise InputError(
        f"no adapter folder {as_path} and no adapter {adapter!r} in the library {root} "
        "(set HISTOSYNTH_ADAPTERS or give the adapter's folder)",
        item="--adapter",
    )


def load_adapter_for(engine: Engine, adapter: str) -> str:
    """Load the LoRA adapter (folder or library name) onto the engine's transformer,
    checked against the base weights; return the name the pipelines activate."""
    from histosynth.synthesis.adapters import load_adapter, loaded_adapters

    if adapter in loaded_adapters(engine.transformer):
        return adapter
    info = load_adapter(engine.transformer, adapter_folder(adapter), activate=False)
    return info.name


def donor_order(donors: Sequence[Donor], run: SynthesisSettings) -> np.ndarray:
    """The donors' order the tiles cycle through (tile i takes ``order[i % len]``)."""
    return np.random.default_rng([run.seed, 1]).permutation(len(donors))


def background_histograms(backgrounds: Sequence[Background]) -> np.ndarray:
    """The tissue colour histogram of each background (what a donor is ranked against)."""
    from histosynth.synthesis.pipelines.background import candidate_histograms

    return candidate_histograms([(b.image, b.tissue) for b in backgrounds])


def background_ranking(
    donor: Donor, backgrounds: Sequence[Background], histograms: np.ndarray | None = None
) -> list[int]:
    """The backgrounds' indices, the most similar to the donor's surroundings first (their
    order when the donor has no tissue around it to compare). ``histograms``: the
    backgrounds' :func:`background_histograms`, computed once for many donors."""
    from histosynth.synthesis.errors import EngineError
    from histosynth.synthesis.pipelines.background import lab_histogram, rank_histograms

    if not backgrounds:
        return []
    if histograms is None:
        histograms = background_histograms(backgrounds)
    try:
        reference = lab_histogram(donor.context, donor.context_tissue)
    except EngineError:
        return list(range(len(backgrounds)))
    return rank_histograms(reference, histograms)


class BackgroundOrders:
    """The backgrounds each tile of a run tries, in turn: first a seeded one of the three
    most similar to its donor's surroundings that no earlier tile of the run starts from
    (while the run has such backgrounds: the tiles of a run show different tissue), then
    the rest of its donor's ranking. Every choice follows from the seed and the tile's
    index alone (a resumed run, a Ray run and a single-process run choose alike)."""

    def __init__(
        self, donors: Sequence[Donor], backgrounds: Sequence[Background], run: SynthesisSettings
    ) -> None:
        self.donors, self.backgrounds, self.run = donors, backgrounds, run
        self.donor_order = donor_order(donors, run)
        self._histograms = background_histograms(backgrounds) if backgrounds else None
        self._rankings: dict[int, list[int]] = {}
        self._firsts: list[int] = []

    def donor_of(self, index: int) -> int:
        """The donor tile ``index`` takes (the donors in a seeded cycle)."""
        return int(self.donor_order[index % len(self.donors)])

    def ranking(self, donor: int) -> list[int]:
        """The backgrounds by similarity to ``donor``'s surroundings (computed once)."""
        if donor not in self._rankings:
            self._rankings[donor] = background_ranking(
                self.donors[donor], self.backgrounds, self._histograms
            )
        return self._rankings[donor]

    def __call__(self, index: int) -> list[int]:
        """The background indices tile ``index`` tries, in turn."""
        if not self.backgrounds or self.run.background == "synthetic":
            return []
        while len(self._firsts) <= index:  # every earlier tile's first choice, in order
            tile = len(self._firsts)
            used = set(self._firsts)
            ranked = self.ranking(self.donor_of(tile))
            pool = ([r for r in ranked if r not in used] or ranked)[:3]
            rng = np.random.default_rng([self.run.seed, tile])
            self._firsts.append(pool[int(rng.integers(len(pool)))])
        first = self._firsts[index]
        return [first, *[r for r in self.ranking(self.donor_of(index)) if r != first]]


def compose_tile(
    index: int,
    donor: Donor,
    backgrounds: Sequence[Background],
    order: Sequence[int],
    run: SynthesisSettings,
    engine: Engine,
) -> PlannedTile | SkippedTile:
    """Tile ``index``'s composite: the donor placed into the first background of ``order``
    it fits, else (``--background auto / synthetic``) into one generated for it."""
    from histosynth.synthesis.inpaint import prepare_composite

    def place(background: Background, existing: np.ndarray | None) -> CompositeResult | None:
        return prepare_composite(
            background.image,
            donor.image,
            donor.mask,
            existing=existing,
            tissue=background.tissue,
            donor_tissue=donor.tissue,
            seed=run.seed + index,
            colour_blend=run.colour_blend,
            context_ring=run.ring,
            donor_exclude=donor.others,
        )

    for attempt, b in enumerate(order):
        background = backgrounds[b]
        try:
            composite = place(background, background.existing_mask)
        except ValueError as exc:
            return SkippedTile(index, f"donor {donor.vessel.id}: {exc}", str(exc))
        if composite is not None:
            if attempt:
                log.debug("tile %d: background %d of the ranking", index, attempt)
            return PlannedTile(index, donor, background, composite)
    if run.background in ("auto", "synthetic") and run.generate_backgrounds:
        background = synthetic_background(engine, donor, index, run)
        composite = place(background, None)
        if composite is not None:
            return PlannedTile(index, donor, background, composite)
    reason = f"donor {donor.vessel.id} fits no background tile (tissue, free space)"
    if run.background == "auto" and not run.generate_backgrounds:
        reason += (
            f", and the engine ({run.model}) generates no synthetic background (it "
            "cannot generate from noise, or is UNTRAINED)"
        )
    return SkippedTile(index, reason, reason)


def synthetic_background(
    engine: Engine, donor: Donor, index: int, run: SynthesisSettings
) -> Background:
    """A background generated from noise (synthetic-background mode): the condition is 16
    randomly rotated copies of the most tissue-rich real crop (a quarter tile wide) of the
    donor's surroundings, i.e. a full tile's worth of encoder rows."""
    from histosynth.synthesis.pipelines.background import (
        generate_background,
        synthetic_condition_tile,
    )

    crop = most_tissue_crop(donor.context, donor.context_tissue, run.tile_size // 4)
    rng = np.random.default_rng([run.seed, index, 3])
    condition = synthetic_condition_tile(crop, rng, grid=4)
    image = generate_background(
        engine,
        condition,
        seeds=[run.seed + index],
        steps=run.steps,
        adapter=run.adapter,
    )[0]
    return Background.synthetic(donor.source, image)


def plan_batches(todo: Sequence[int], batch_size: int, progress=None) -> Iterable[list[int]]:
    """The engine calls of a run: consecutive ``batch_size`` tiles of ``todo`` (a tile
    that cannot be made leaves its batch one short, so every executor batches alike);
    ``progress`` advances once per tile."""
    chunks = [list(todo[k : k + batch_size]) for k in range(0, len(todo), batch_size)]
    if progress is None:
        yield from chunks
        return
    bar = iter(progress(todo, len(todo)))
    for chunk in chunks:
        for _ in chunk:
            next(bar, None)
        yield chunk
    for _ in bar:  # let the bar finish
        pass


def render_inpaint(
    pipeline, batch: Sequence[PlannedTile], run: SynthesisSettings, control: Any = None
) -> list:
    """The tiles of ``batch``: the seam regenerated by the engine in one call (seeds
    ``run.seed + index``; shape mode: also the inside of each target outline at
    ``run.inside_strength``, by masked partial diffusion; ``control``: a
    :class:`~histosynth.synthesis.pipelines.control.MaskControl` steering every step),
    blended by Laplacian pyramids, or the composites."""
    if run.harmonise != "diffusion":
        from histosynth.synthesis.inpaint.harmonise import harmonise_multiband

        if run.harmonise == "none":
            return [p.composite.composite for p in batch]
        return [
            harmonise_multiband(
                p.background.image, p.composite.composite, p.composite.mask, sigma=run.seam_sigma
            )
            for p in batch
        ]
    inside = {}
    if run.mode == "shape":
        inside = {
            "inside": np.stack([p.composite.vessel_mask for p in batch]),
            "inside_strength": run.inside_strength,
        }
    output = pipeline(
        np.stack([p.composite.composite for p in batch]),
        np.stack([p.composite.mask for p in batch]),
        strength=run.strength,
        **inside,
        guidance_scale=run.guidance,
        num_inference_steps=run.steps,
        seeds=[run.seed + p.index for p in batch],
        seam_sigma=run.seam_sigma,
        adapter=run.adapter,
        control=control,
    )
    return list(output.images)


def render_shape(
    pipeline, batch: Sequence[PlannedTile], run: SynthesisSettings, controlnet: Any = None
) -> list:
    """Shape mode's tiles of ``batch`` in one engine call. Without a ``controlnet``:
    :func:`render_inpaint`. With one, every denoising step is conditioned on each tile's
    target outline mask (its ``vessel_mask``) with guidance ``run.mask_guidance`` (s_mask;
    ``run.guidance`` is s_uni): inpainting as :func:`render_inpaint` (``pipeline`` an
    ``InpaintPipeline``), or with ``run.whole_tile`` the whole tile generated from noise
    on the composite's encoder rows (``pipeline`` a ``VariationPipeline``; no seam blend,
    every pixel new)."""
    if controlnet is None:
        return render_inpaint(pipeline, batch, run)
    from histosynth.synthesis.pipelines.control import MaskControl, mask_tensor

    assert run.mask_guidance is not None and run.tile_size is not None, "a resolved run"
    control = MaskControl(
        controlnet,
        mask_tensor(np.stack([p.composite.vessel_mask for p in batch]), run.tile_size),
        mask_guidance=run.mask_guidance,
    )
    if not run.whole_tile:
        return render_inpaint(pipeline, batch, run, control)
    output = pipeline(
        np.stack([p.composite.composite for p in batch]),
        guidance_scale=run.guidance,
        num_inference_steps=run.steps,
        seeds=[run.seed + p.index for p in batch],
        adapter=run.adapter,
        control=control,
    )
    return list(output.images)


def render_variation(
    pipeline, refs: Sequence[ReferenceTile], indices: Sequence[int], run: SynthesisSettings
) -> list:
    """Variations of the reference tiles in one engine call (seeds ``run.seed + index``)."""
    output = pipeline(
        np.stack([ref.image for ref in refs]),
        guidance_scale=run.guidance,
        num_inference_steps=run.steps,
        seeds=[run.seed + i for i in indices],
        adapter=run.adapter,
    )
    return list(output.images)
