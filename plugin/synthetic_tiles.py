"""The ``synthesize`` workflow: real donor vessels into new tissue (``inpaint``), or
variations of real vessel tiles (``variation``), written as a run folder.

It composes the integration layer (slides, annotations, masks, the run folder) with the
engine (one model load per run, tiles batched). Everything is planned from the seed
before any pixel is generated, so a resumed run makes exactly the tiles that are missing.

Size: the workflow and its frozen settings; every pixel and geometry step it runs lives
in ``histosynth.integration.tiles`` or the engine.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histosynth import __version__
from histosynth.common.geometry import DEFAULT_MPP
from histosynth.integration.content_check import ContentThresholds, ContentVerdict
from histosynth.integration.dataset import RunWriter, TileRecord, check_run_folder
from histosynth.integration.errors import InputError
from histosynth.integration.masks import union_mask
from histosynth.integration.tiles import (
    DONOR_MAX_FRACTION,
    TOO_LARGE,
    Background,
    Donor,
    ReferenceTile,
    SlideSource,
    check_classes,
    collect_backgrounds,
    collect_donors,
    load_sources,
    mask_annotation,
    open_sources,
    reference_tile,
)
from histosynth.options import COUNT_MAX, GUIDANCE_MAX, MPP_MAX, SEED_MAX, STEPS_MAX, check_finite
from histosynth.run_checks import (
    calibrate_run,
    check_content,
    check_engine_serves,
    resolved_harmonise,
)
from histosynth.synthesis import defaults
from histosynth.tile_plan import (
    PlannedTile,
    SkippedTile,
    background_histograms,
    background_order,
    background_ranking,
    compose_tile,
    donor_order,
    load_adapter_for,
    plan_batches,
    render_inpaint,
    render_variation,
)

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.scale_out import RayOptions
    from histosynth.synthesis.engine import Engine

log = logging.getLogger(__name__)

MODES = ("inpaint", "variation")
#: where inpainting backgrounds come from: real tiles of the slides; tiles generated from
#: noise conditioned on 16 rotated copies of real tissue near the donor; real, and
#: synthetic for a donor that fits no real tile.
BACKGROUNDS = ("auto", "real", "synthetic")
#: how the seam of an inpainted tile is regenerated: partial diffusion (the engine),
#: multiband (Laplacian-pyramid) blending without weights, or not at all (the composite);
#: auto: diffusion with a trained engine, multiband with an UNTRAINED one.
HARMONISERS = ("auto", "diffusion", "multiband", "none")
#: mode → (steps, guidance): the dissertation's inpainting defaults; PixCell's sampler.
MODE_DEFAULTS = {
    "inpaint": (defaults.INPAINT_STEPS, defaults.INPAINT_GUIDANCE),
    "variation": (defaults.VARIATION_STEPS, defaults.VARIATION_GUIDANCE),
}
EXTRA_COLUMNS = (
    "donor_image",
    "donor_entry_id",
    "background_kind",
    "placement_penalty",
    "mask_source",
    "harmonise",
    "qc",
)


@dataclass
class SynthesizeResult:
    """What ``synthesize`` did."""

    run_dir: Path
    written: int = 0
    already_present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    engine_description: str = ""
    trained: bool = True
    #: whether the engine made pixels (not only inpainting seams harmonised without it)
    model_painted: bool = True
    #: ids of the tiles written in this call that failed the content check, with reasons
    qc_failed: dict[str, str] = field(default_factory=dict)
    #: the content check's thresholds (calibrated on real tiles of the run's slides)
    content_check: ContentThresholds | None = None


@dataclass(frozen=True)
class SynthesisSettings:
    """What to synthesise and how (frozen; checked when made, before anything loads).

    ``None`` means the engine's (``tile_size``, ``kv_compress``; ``model``: PixCell-1024
    when its weights are installed, else the embedded default) or the mode's
    (``steps``, ``guidance``: :data:`MODE_DEFAULTS`; ``batch_size``: 4 on a GPU, else 1;
    ``strength``: the engine's τ, ``Engine.strength``).
    ``tile_size`` is px at ``mpp`` µm/px; ``seam_sigma`` px; ``strength`` = τ;
    ``context_ring``: px of each donor's own surrounding tissue pasted with it, so that its
    wall lies inside the pasted tissue rather than on the regenerated seam (``None``: 2σ).
    ``allow_untrained``: let an UNTRAINED engine (``tiny``) paint pixels — variation,
    synthetic backgrounds, diffusion seams — to try the workflow; its tiles fail the
    content check. ``generate_backgrounds`` is resolved by the run: whether ``--background
    auto`` may generate one for a donor that fits no real tile (the engine generates).

    Raises:
        InputError: a value out of range or not one of the choices, naming the option.
    """

    classes: tuple[str, ...]
    count: int
    mode: str = "inpaint"
    tile_size: int | None = None
    mpp: float = DEFAULT_MPP
    model: str | None = None
    adapter: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    kv_compress: int | None = None
    seam_sigma: float = defaults.SEAM_SIGMA
    colour_blend: float = defaults.COLOUR_BLEND
    context_ring: int | None = None
    background: str = "auto"
    harmonise: str = "auto"
    batch_size: int | None = None
    device: str | None = None
    allow_untrained: bool = False
    generate_backgrounds: bool = True

    def __post_init__(self) -> None:
        classes = (self.classes,) if isinstance(self.classes, str) else tuple(self.classes)
        object.__setattr__(self, "classes", classes)
        for name, value, choices in (
            ("mode", self.mode, MODES),
            ("background", self.background, BACKGROUNDS),
            ("harmonise", self.harmonise, HARMONISERS),
        ):
            if value not in choices:
                raise InputError(f"--{name} must be one of {', '.join(choices)}, not {value!r}")
        if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
            raise InputError("name at least one class (--class)")
        steps, guidance = self.mode_steps, self.mode_guidance
        integers = [
            ("--count", self.count, 1, COUNT_MAX),
            ("--steps", steps, 1, STEPS_MAX),
            ("--seed", self.seed, 0, SEED_MAX),
            ("the context ring (px)", self.context_ring, 0, 256),
            ("--tile-size", self.tile_size, 64, 16384),
            ("--kv-compress", self.kv_compress, 1, 64),
            ("--batch-size", self.batch_size, 1, 1024),
        ]
        for name, value, low, high in integers:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InputError(f"{name} must be a whole number, not {value!r}")
            if not low <= value <= high:
                raise InputError(f"{name} must be in [{low}, {high}], not {value}")
        reals = [
            ("--strength", self.strength, 0.0, 1.0),
            ("--guidance", guidance, 1.0, GUIDANCE_MAX),
            ("--mpp", self.mpp, 1e-6, MPP_MAX),
            ("the seam σ (px)", self.seam_sigma, 0.1, 1000.0),
            ("the colour blend", self.colour_blend, 0.0, 1.0),
        ]
        for name, value, low, high in reals:
            if value is None:
                continue
            try:
                check_finite(name, value, low, high)
            except ValueError as exc:
                raise InputError(str(exc)) from None

    @property
    def ring(self) -> int:
        """``context_ring``, or 2σ rounded."""
        return round(2 * self.seam_sigma) if self.context_ring is None else self.context_ring

    @property
    def mode_steps(self) -> int:
        """``steps``, or the mode's default."""
        return MODE_DEFAULTS[self.mode][0] if self.steps is None else self.steps

    @property
    def mode_guidance(self) -> float:
        """``guidance``, or the mode's default."""
        return MODE_DEFAULTS[self.mode][1] if self.guidance is None else self.guidance

    def run_config(self, sources: Sequence[SlideSource]) -> dict[str, Any]:
        """The ``config`` of ``run.json`` (what a resumed run must match) of these settings
        as resolved for a run (model id, steps, tile size … filled in)."""
        inpaint = self.mode == "inpaint"
        return {
            "command": "synthesize",
            "mode": self.mode,
            "classes": list(self.classes),
            "count": self.count,
            "tile_size": self.tile_size,
            "mpp": self.mpp,
            "model": self.model,
            "adapter": self.adapter,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "strength": self.strength if inpaint else None,
            "kv_compress": self.kv_compress,
            "seam_sigma": self.seam_sigma,
            "colour_blend": self.colour_blend,
            "context_ring": self.ring if inpaint else None,
            "background": self.background if inpaint else None,
            "harmonise": self.harmonise if inpaint else None,
            "sources": sorted(str(s.slide_path) for s in sources),
        }


def synthesize(
    settings: SynthesisSettings,
    *,
    out: str | Path,
    project: str | Path | None = None,
    slide: str | Path | None = None,
    annotations: str | Path | None = None,
    sources: Sequence[SlideSource] | None = None,
    slide_mpp_override: float | None = None,
    skip_missing: bool = False,
    resume: bool = False,
    engine: Engine | None = None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
    command: str = "",
    ray: RayOptions | None = None,
) -> SynthesizeResult:
    """Make ``settings.count`` synthetic tiles of ``settings.classes`` vessels into the run
    folder ``out``.

    Every tile passes the content check (:mod:`histosynth.integration.content_check`,
    calibrated on real tiles of the slides) before it is written; a failing tile is written
    with ``qc`` = ``fail: <reasons>`` and listed in ``result.qc_failed``.

    ``inpaint``: each tile is a real background tile of the project's slides with a real
    donor vessel (rotated to the tissue's nucleus orientation, colour-matched) placed
    where it fits, and only the seam regenerated by partial diffusion (``strength`` =
    τ). Annotations of the classes already in the background tile are carried into the
    mask and GeoJSON. ``variation``: new tiles conditioned on real vessel tiles; a
    variation row carries its class and no mask (``mask_source = none``).
    ``harmonise`` (inpaint): ``diffusion`` regenerates the seam with the engine,
    ``multiband`` blends it by Laplacian pyramids (no model step; milliseconds per tile),
    ``none`` keeps the composite; in every mode the tile equals the composite beyond 4σ
    of the seam.

    The slides come from ``project``, or ``slide`` + ``annotations`` (GeoJSON), or
    ``sources`` (slides and annotations already in memory, e.g. from TIAToolbox readers
    and annotation stores, see ``histosynth.tiatoolbox``; a source without a ``reader``
    is opened from its ``slide_path``). ``engine``: an already loaded engine
    (``load_engine``), else ``settings.model`` is loaded once for the run.
    ``ray``: render on a Ray cluster, one engine per actor (:mod:`histosynth.scale_out`;
    the model is then given by ``settings``, not as a loaded ``engine``).

    >>> SynthesisSettings(classes=("Vessel",), count=0)
    Traceback (most recent call last):
    ...
    histosynth.integration.errors.InputError: --count must be in [1, 1000000], not 0
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("the output folder is a file", path=out)
    check_run_folder(out, resume=resume)  # before the slow part: loading the model
    if ray is not None:
        if engine is not None:
            raise InputError(
                "--ray loads the model on every worker: give it by name or folder "
                "(settings.model), not as a loaded engine"
            )
        from histosynth.scale_out import connect

        ray = connect(ray)
    # an unknown model, or a mode it cannot serve, fails here in well under a second
    check_engine_serves(settings.model if engine is None else engine, settings)

    if sources is None:
        sources = load_sources(
            project=project,
            slide=slide,
            annotations=annotations,
            mpp=slide_mpp_override,
            skip_missing=skip_missing,
        )
    else:
        if project is not None or slide is not None or annotations is not None:
            raise InputError("give sources, or a project / slide with annotations, not both")
        sources = open_sources(sources, slide_mpp_override)
    check_classes(sources, settings.classes)
    if engine is None:
        from histosynth.synthesis.engine import load_engine

        engine = load_engine(
            settings.model,
            # on Ray the driver's copy only answers what the model is; the actors render
            device="cpu" if ray is not None else settings.device,
            kv_compress=settings.kv_compress,
            tile_size=settings.tile_size if settings.model == "tiny" else None,
        )
    tile_size = engine.tile_size if settings.tile_size is None else settings.tile_size
    if engine.tile_size != tile_size:
        raise InputError(
            f"the model makes {engine.tile_size} px tiles; use --tile-size {engine.tile_size}"
        )
    generates = engine.abilities.generates and (engine.trained or settings.allow_untrained)
    run = replace(
        settings,
        harmonise=resolved_harmonise(settings.harmonise, engine.trained),
        generate_backgrounds=generates,
        tile_size=tile_size,
        steps=settings.mode_steps,
        guidance=settings.mode_guidance,
        strength=engine.strength if settings.strength is None else settings.strength,
        adapter=None if settings.adapter is None else load_adapter_for(engine, settings.adapter),
        batch_size=settings.batch_size or (4 if _renders_on_gpu(engine, ray) else 1),
        model=engine.model_id,
        kv_compress=engine.kv_compress,
    )
    mode, classes, mpp = run.mode, run.classes, run.mpp
    if not engine.trained and (
        mode == "variation" or run.harmonise == "diffusion" or run.background == "synthetic"
    ):
        log.warning(
            "the engine is UNTRAINED (seeded random weights): the synthetic pixels "
            "are not histology; use it to try the workflow, not for training data"
        )
    skipped: list[tuple[str, str]] = []
    role = "donor" if mode == "inpaint" else "reference vessel"
    max_fraction = DONOR_MAX_FRACTION if mode == "inpaint" else 1.0
    ring = run.ring if mode == "inpaint" else 0
    donors = collect_donors(
        sources,
        classes,
        tile_size,
        mpp,
        skipped,
        context_px=ring,
        max_fraction=max_fraction,
        role=role,
    )
    if not donors:
        raise InputError(
            f"no usable {role} of class "
            + ", ".join(repr(c) for c in classes)
            + (f": {skipped[0][1]}" if skipped else "")
        )
    backgrounds: list[Background] = []
    if mode == "inpaint" and run.background != "synthetic":
        backgrounds = collect_backgrounds(
            sources, classes, tile_size, mpp, seed=run.seed, skipped=skipped
        )
        if not backgrounds:
            why = "no background tile with enough tissue (≥ 50 %) in the slides" + "".join(
                f"; {reason}" for _, reason in skipped if "smaller than" in reason
            )
            if run.background == "real":
                raise InputError(
                    why + "; use other slides, a smaller --tile-size, --background auto "
                    "(synthetic backgrounds) or --mode variation"
                )
            log.warning("%s: generating synthetic backgrounds instead", why)

    config = run.run_config(sources)
    thresholds = calibrate_run(donors, backgrounds)
    result = SynthesizeResult(
        out,
        engine_description=engine.description,
        trained=engine.trained,
        model_painted=mode == "variation" or run.harmonise == "diffusion",
    )
    with RunWriter(
        out,
        config=config,
        resume=resume,
        command=command,
        extra_columns=EXTRA_COLUMNS,
        device=str(engine.device) if ray is None else _ray_device(ray),
    ) as writer:
        writer.set_info(
            histosynth=__version__,
            engine=engine.description,
            engine_trained=engine.trained,
            content_check=thresholds.to_json(),
        )
        result.content_check = thresholds
        if ray is not None:
            writer.set_info(
                ray={
                    "address": ray.address,
                    "workers": ray.workers,
                    "gpus_per_worker": ray.gpus_per_worker,
                }
            )
        too_large = [item for item, reason in skipped if reason.startswith(TOO_LARGE)]
        for item, reason in skipped:
            writer.skip(item, reason, warn=item not in too_large)
        if too_large:
            log.warning(
                "%d vessel(s) skipped: each %s is larger than %.0f%% of the %d px tile at %g "
                "µm/px (use a larger --tile-size or a coarser --mpp; each one is in run.json)",
                len(too_large),
                role,
                100 * max_fraction,
                tile_size,
                mpp,
            )
        result.skipped.extend(skipped)
        prefix = "inp" if mode == "inpaint" else "var"
        todo = [i for i in range(run.count) if not writer.has(f"{prefix}-{i:05d}")]
        result.already_present = run.count - len(todo)
        if ray is not None:
            spec = {
                "model": settings.model,
                "device": settings.device,
                "kv_compress": settings.kv_compress,
                "tile_size": settings.tile_size if settings.model == "tiny" else None,
                "adapter": settings.adapter,
            }
            _run_on_ray(ray, spec, writer, result, todo, donors, backgrounds, run, progress)
        elif mode == "inpaint":
            _run_inpaint(engine, writer, result, todo, donors, backgrounds, run, progress)
        else:
            _run_variation(engine, writer, result, todo, donors, run, progress)
    return result


def _renders_on_gpu(engine: Engine, ray: RayOptions | None) -> bool:
    return bool(ray.gpus_per_worker) if ray is not None else engine.device.type == "cuda"


def _ray_device(ray: RayOptions) -> str:
    return f"ray: {ray.workers} worker(s), " + (
        f"{ray.gpus_per_worker:g} GPU each" if ray.gpus_per_worker else "CPU"
    )


def _run_on_ray(
    options: RayOptions,
    engine_spec: dict[str, Any],
    writer: RunWriter,
    result: SynthesizeResult,
    todo: list[int],
    donors: list[Donor],
    backgrounds: list[Background],
    run: SynthesisSettings,
    progress,
) -> None:
    """The plan of a single-process run, rendered by Ray actors and written here in plan
    order as the outcomes arrive."""
    from histosynth.scale_out import render_on_ray

    order = donor_order(donors, run)
    rankings: dict[int, list[int]] = {}
    histograms = background_histograms(backgrounds) if backgrounds else None

    def donor_of(i: int) -> int:
        return int(order[i % len(donors)])

    def orders(i: int) -> list[int]:
        d = donor_of(i)
        if d not in rankings:
            rankings[d] = background_ranking(donors[d], backgrounds, histograms)
        return background_order(i, rankings[d], run)

    references: dict[int, ReferenceTile] = {}
    if run.mode == "variation":  # read from the slides here: the actors have no readers
        for d in sorted({donor_of(i) for i in todo}):
            references[d] = reference_tile(donors[d], run.tile_size, run.mpp, run.classes)
    outcomes = render_on_ray(
        options,
        engine_spec,
        run,
        list(plan_batches(todo, run.batch_size)),
        donor_of,
        orders,
        donors,
        backgrounds,
        references,
    )
    for outcome in progress(outcomes, len(todo)) if progress else outcomes:
        d = donor_of(outcome.index)
        if outcome.skip is not None:
            _record_skip(writer, result, outcome.skip)
        elif run.mode == "variation":
            _write_variation(
                writer, result, outcome.index, references[d], donors[d], outcome.image, run
            )
        else:
            background = (
                backgrounds[outcome.background]
                if outcome.background is not None
                else Background.synthetic(donors[d].source, outcome.generated_background)
            )
            prepared = PlannedTile(outcome.index, donors[d], background, outcome.composite)
            _write_inpaint_batch(writer, result, [prepared], [outcome.image], run)


# --------------------------------------------------------------------------- inpainting


def _record_skip(writer: RunWriter, result: SynthesizeResult, skip: SkippedTile) -> None:
    writer.skip(f"tile {skip.index}", skip.reason)
    result.skipped.append((f"tile {skip.index}", skip.detail))


def _run_inpaint(
    engine: Engine,
    writer: RunWriter,
    result: SynthesizeResult,
    todo: list[int],
    donors: list[Donor],
    backgrounds: list[Background],
    run: SynthesisSettings,
    progress,
) -> None:
    pipeline = engine.inpaint_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    rankings: dict[int, list[int]] = {}
    histograms = background_histograms(backgrounds) if backgrounds else None
    order = donor_order(donors, run)
    for chunk in plan_batches(todo, run.batch_size, progress):
        batch: list[PlannedTile] = []
        for i in chunk:
            d = int(order[i % len(donors)])
            if d not in rankings:
                rankings[d] = background_ranking(donors[d], backgrounds, histograms)
            prepared = compose_tile(
                i, donors[d], backgrounds, background_order(i, rankings[d], run), run, engine
            )
            if isinstance(prepared, SkippedTile):
                _record_skip(writer, result, prepared)
            else:
                batch.append(prepared)
        if batch:
            _write_inpaint_batch(writer, result, batch, render_inpaint(pipeline, batch, run), run)


def _write_inpaint_batch(
    writer: RunWriter,
    result: SynthesizeResult,
    batch: Sequence[PlannedTile],
    images: Sequence[np.ndarray],
    run: SynthesisSettings,
) -> None:
    for prepared, image in zip(batch, images, strict=True):
        if prepared.background.x is None:
            result.model_painted = True  # a generated background
        _write_inpainted(writer, result, prepared, image, run)


def _write_inpainted(
    writer: RunWriter,
    result: SynthesizeResult,
    prepared: PlannedTile,
    image: np.ndarray,
    run: SynthesisSettings,
) -> None:
    donor, background, comp = prepared.donor, prepared.background, prepared.composite
    diffused = run.harmonise == "diffusion"
    vessel = comp.mask if comp.vessel_mask is None else comp.vessel_mask
    mask = union_mask(vessel, background.existing_mask)
    inserted = mask_annotation(
        vessel,
        donor.vessel,
        "synthetic vessel",
        {"histosynth_inserted": "true", "source_annotation_id": donor.vessel.id},
    )
    tile_annotations = [*([inserted] if inserted else []), *background.existing]
    cx, cy = comp.placement.centre
    record = TileRecord(
        id=f"inp-{prepared.index:05d}",
        synthesis_type="inpainting",
        class_name=donor.vessel.class_name or "",
        source_image=str(background.source.slide_path),
        source_entry_id=background.source.entry_id,
        source_annotation_id=donor.vessel.id,
        tile_x=background.x,
        tile_y=background.y,
        tile_size=run.tile_size,
        mpp=run.mpp,
        insert_x=round(float(cx), 2),
        insert_y=round(float(cy), 2),
        rotation_deg=round(float(comp.rotation_deg), 3),
        model=run.model,
        adapter=run.adapter or "",
        seed=run.seed + prepared.index,
        steps=run.steps if diffused else None,
        guidance_scale=run.guidance if diffused else None,
        strength=run.strength if diffused else None,
        kv_compress=run.kv_compress or "",
        extra={
            "donor_image": str(donor.source.slide_path),
            "donor_entry_id": donor.source.entry_id,
            "background_kind": "real" if background.x is not None else "synthetic",
            "placement_penalty": round(float(comp.placement.penalty), 4),
            "mask_source": "placed donor",
            "harmonise": run.harmonise,
        },
    )
    # the tissue it was made from: the real background, or for a generated one the
    # donor's own surroundings
    source = background.image if background.x is not None else donor.context
    verdict = check_content(result.content_check, image, source, mask, comp.composite)
    _record_content(result, record, verdict)
    refs = {
        "background": background.image,
        "donor": comp.donor_image,
        "donor-mask": comp.donor_mask,  # what was pasted: the vessel and its tissue ring
        "vessel-mask": vessel,  # the vessel alone, placed (tile px)
        "composite": comp.composite,
    }
    writer.add_tile(record, image, mask, tile_annotations, refs=refs)
    result.written += 1


# --------------------------------------------------------------------------- variation


def _run_variation(
    engine: Engine,
    writer: RunWriter,
    result: SynthesizeResult,
    todo: list[int],
    donors: list[Donor],
    run: SynthesisSettings,
    progress,
) -> None:
    """Variations of real vessel tiles (the donors' centred tiles) as references."""
    pipeline = engine.variation_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    tile = run.tile_size
    mpp = run.mpp
    references: dict[int, ReferenceTile] = {}

    def reference(k: int) -> tuple[ReferenceTile, Donor]:
        if k not in references:
            references[k] = reference_tile(donors[k], tile, mpp, run.classes)
        return references[k], donors[k]

    order = donor_order(donors, run)
    for batch in plan_batches(todo, run.batch_size, progress):
        refs = [reference(int(order[i % len(donors)])) for i in batch]
        images = render_variation(pipeline, [ref for ref, _ in refs], batch, run)
        for i, (ref, donor), image in zip(batch, refs, images, strict=True):
            _write_variation(writer, result, i, ref, donor, image, run)


def _write_variation(
    writer: RunWriter,
    result: SynthesizeResult,
    index: int,
    ref: ReferenceTile,
    donor: Donor,
    image: np.ndarray,
    run: SynthesisSettings,
) -> None:
    """A variation row carries its class and no mask: generation from encoder rows keeps
    morphology, not pixel positions, so the reference's outline (kept in
    ``refs/<id>-reference-mask.png`` as provenance) does not match the new pixels."""
    record = TileRecord(
        id=f"var-{index:05d}",
        synthesis_type="variation",
        class_name=donor.vessel.class_name or "",
        source_image=str(donor.source.slide_path),
        source_entry_id=donor.source.entry_id,
        source_annotation_id=donor.vessel.id,
        tile_x=ref.x,
        tile_y=ref.y,
        tile_size=run.tile_size,
        mpp=run.mpp,
        model=run.model,
        adapter=run.adapter or "",
        seed=run.seed + index,
        steps=run.steps,
        guidance_scale=run.guidance,
        kv_compress=run.kv_compress or "",
        extra={
            "donor_image": str(donor.source.slide_path),
            "donor_entry_id": donor.source.entry_id,
            "background_kind": "",
            "placement_penalty": "",
            "mask_source": "none",
        },
    )
    _record_content(result, record, check_content(result.content_check, image, ref.image, None))
    refs = {"reference": ref.image, "reference-mask": ref.mask}
    writer.add_tile(record, image, None, [], refs=refs)
    result.written += 1


def _record_content(result: SynthesizeResult, record: TileRecord, verdict: ContentVerdict) -> None:
    """The tile's content check verdict into its ``qc`` cell (and the result's failures)."""
    record.extra["qc"] = verdict.cell
    if not verdict.passed:
        result.qc_failed[record.id] = verdict.cell
