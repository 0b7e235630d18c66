"""A synthesize run set up, before its first tile: the Ray cluster connected, the slides
opened, the engine loaded, the settings it resolves, the donors and background tiles
collected, and what ``run.json`` says of them.
:func:`~histosynth.workflows.synthesize.workflow.synthesize` calls these in order; its
executors then make the tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histosynth import __version__
from histosynth.integration.errors import InputError
from histosynth.integration.tiles import (
    DONOR_MAX_FRACTION,
    TOO_LARGE,
    check_classes,
    collect_backgrounds,
    collect_donors,
    open_sources,
)
from histosynth.workflows.synthesize.run_checks import resolved_harmonise, steered
from histosynth.workflows.synthesize.tile_plan import load_adapter_for
from histosynth.workflows.tile_runs import annotated_slides

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.integration.content_check import ContentThresholds
    from histosynth.integration.dataset import RunWriter
    from histosynth.integration.sketches import Sketch
    from histosynth.integration.tiles import Background, Donor, SlideSource
    from histosynth.synthesis.controlnet_library import ControlNetInfo
    from histosynth.synthesis.engine import Engine
    from histosynth.workflows.synthesize.scale_out import RayOptions
    from histosynth.workflows.synthesize.settings import SynthesisSettings

log = logging.getLogger(__name__)

__all__ = [
    "RunControl",
    "collect_tiles",
    "connect_ray",
    "donor_role",
    "engine_folder",
    "load_run_controlnet",
    "load_run_engine",
    "ray_device",
    "ray_engine_spec",
    "record_collection_skips",
    "requested_controlnet",
    "resolved_settings",
    "run_harmonise",
    "slide_sources",
    "write_run_info",
]


def connect_ray(ray: RayOptions | None, engine: Engine | None) -> RayOptions | None:
    """The Ray cluster connected (``None``: no Ray); a loaded engine cannot go to it."""
    if ray is None:
        return None
    if engine is not None:
        raise InputError(
            "--ray loads the model on every worker: give it by name or folder "
            "(settings.model), not as a loaded engine"
        )
    from histosynth.workflows.synthesize.scale_out import connect

    return connect(ray)


def slide_sources(
    sources: Sequence[SlideSource] | None,
    project: str | Path | None,
    slide: str | Path | None,
    annotations: str | Path | None,
    slide_mpp_override: float | None,
    skip_missing: bool,
    classes: Sequence[str],
) -> list[SlideSource]:
    """The run's slides, opened: ``sources`` given in memory, else read from ``project``
    or ``slide`` + ``annotations``; each of ``classes`` must be annotated in them."""
    if sources is None:
        return annotated_slides(
            classes, project, slide, annotations, slide_mpp_override, skip_missing
        )
    if project is not None or slide is not None or annotations is not None:
        raise InputError("give sources, or a project / slide with annotations, not both")
    check_classes(sources, classes)
    return open_sources(sources, slide_mpp_override)


def load_run_engine(settings: SynthesisSettings, ray: RayOptions | None) -> Engine:
    """``settings.model`` loaded once for the run (on Ray, a CPU copy that only answers
    what the model is: the actors render)."""
    from histosynth.synthesis.engine import load_engine

    return load_engine(
        settings.model,
        device="cpu" if ray is not None else settings.device,
        kv_compress=settings.kv_compress,
        tile_size=settings.tile_size if settings.model == "tiny" else None,
    )


def resolved_settings(
    settings: SynthesisSettings,
    engine: Engine,
    ray: RayOptions | None,
    control: RunControl | None = None,
) -> SynthesisSettings:
    """``settings`` with what the engine decides filled in (tile size, harmonise, τ,
    steps, guidance, the adapter loaded, the batch size, the model id; with a ``control``
    ControlNet its name, weights hash and the mask's guidance scale); a warning when an
    UNTRAINED engine will paint pixels."""
    tile_size = engine.tile_size if settings.tile_size is None else settings.tile_size
    if engine.tile_size != tile_size:
        raise InputError(
            f"the model makes {engine.tile_size} px tiles; use --tile-size {engine.tile_size}"
        )
    generates = engine.abilities.generates and (engine.trained or settings.allow_untrained)
    own = engine.sampling  # the engine's steps and guidance where the settings name none
    # a whole tile is a tile from noise: the engine's steps and guidance for those
    sampled = "variation" if settings.whole_tile else settings.mode
    harmonise = run_harmonise(settings, engine)
    run = replace(
        settings,
        harmonise="diffusion" if settings.whole_tile else harmonise,
        generate_backgrounds=generates,
        tile_size=tile_size,
        steps=own.steps(sampled) if settings.steps is None else settings.steps,
        guidance=own.guidance(sampled) if settings.guidance is None else settings.guidance,
        strength=engine.strength if settings.strength is None else settings.strength,
        inside_strength=_inside_strength(settings, engine, control),
        controlnet=None if control is None else control.info.name,
        controlnet_sha256=None if control is None else control.info.weights_sha256,
        mask_guidance=_mask_guidance(settings, control),
        adapter=None if settings.adapter is None else load_adapter_for(engine, settings.adapter),
        batch_size=settings.batch_size or (4 if _renders_on_gpu(engine, ray) else 1),
        model=engine.model_id,
        kv_compress=engine.kv_compress,
    )
    if not engine.trained and (
        run.mode == "variation" or run.harmonise == "diffusion" or run.background == "synthetic"
    ):
        log.warning(
            "the engine is UNTRAINED (seeded random weights): the synthetic pixels "
            "are not histology; use it to try the workflow, not for training data"
        )
    return run


def run_harmonise(settings: SynthesisSettings, engine: Engine) -> str:
    """The seam mode of the run: ``settings.harmonise`` with ``auto`` resolved for
    ``engine`` (:func:`~histosynth.workflows.synthesize.run_checks.resolved_harmonise`)."""
    return resolved_harmonise(
        settings.harmonise, engine.trained, engine.sampling.harmonise, steered=steered(settings)
    )


def _inside_strength(
    settings: SynthesisSettings, engine: Engine, control: RunControl | None = None
) -> float | None:
    """Shape mode's τ inside the outline beyond the seam band: the one named, else 0 (the
    warped donor kept there, as inpainting keeps its donor; regenerating it lowered the
    mask adherence of the embedded engine's drawn tiles from 0.60 to 0.43 IoU); with a
    ControlNet the τ its metadata records as measured best (``generation``), else the
    engine's highest τ (the inside generated from the mask, not kept)."""
    if settings.mode != "shape":
        return None
    if settings.inside_strength is not None:
        return settings.inside_strength
    if control is None:
        return 0.0
    top = min(1.0, engine.abilities.max_strength)
    return min(top, float(control.info.generation.get("inside_strength", top)))


def _mask_guidance(settings: SynthesisSettings, control: RunControl | None) -> float | None:
    """s_mask of a run with a ControlNet (the one named, else the one its metadata records
    as measured best, else the default); ``None`` without one."""
    from histosynth.workflows.synthesize.settings import DEFAULT_MASK_GUIDANCE

    if control is None:
        return None
    if settings.mask_guidance is not None:
        return settings.mask_guidance
    return float(control.info.generation.get("mask_guidance", DEFAULT_MASK_GUIDANCE))


# --------------------------------------------------------------------------- ControlNet


@dataclass
class RunControl:
    """The run's vessel-mask ControlNet: the module (on the engine's device), its folder
    (what Ray actors load) and its metadata."""

    controlnet: Any
    folder: Path
    info: ControlNetInfo


def requested_controlnet(settings: SynthesisSettings) -> Path | None:
    """The folder of the ControlNet ``settings.controlnet`` names (a library name or a
    folder), found before any slide or weight is read; ``None`` when it names none (the
    engine's own may still apply, :func:`load_run_controlnet`).

    Raises:
        EngineError: no such ControlNet (one line naming the library).
    """
    from histosynth.synthesis.controlnet_library import resolve_controlnet
    from histosynth.workflows.synthesize.settings import NO_CONTROLNET

    if settings.controlnet is None or settings.controlnet == NO_CONTROLNET:
        return None
    return resolve_controlnet(settings.controlnet)


def engine_folder(engine: Engine) -> Path | None:
    """The engine folder ``engine`` was loaded from (the parent of its ``transformer/``
    folder), or ``None`` (a preset built in memory, a bare transformer folder)."""
    where = str(engine.sources.get("transformer", ""))
    _, _, path = where.partition(" ")
    folder = Path(path) if path else None
    if folder is None or folder.name != "transformer" or not folder.is_dir():
        return None
    return folder.parent


def load_run_controlnet(
    settings: SynthesisSettings, engine: Engine, folder: Path | None
) -> RunControl | None:
    """The run's ControlNet loaded once onto ``engine``'s transformer: the one named
    (``folder``, :func:`requested_controlnet`), else in shape mode the one the engine
    folder ships when the run regenerates with the engine; ``None`` without one.

    Raises:
        InputError: ``--whole-tile`` or ``--mask-guidance`` without a ControlNet; a
            ControlNet named for seams harmonised without the engine.
        EngineError: a ControlNet of another base, resolution or shape (one line).
    """
    from histosynth.synthesis.controlnet_library import engine_controlnet_folder, load_controlnet
    from histosynth.workflows.synthesize.settings import NO_CONTROLNET

    if settings.mode != "shape":
        return None
    diffused = settings.whole_tile or run_harmonise(settings, engine) == "diffusion"
    if folder is None and settings.controlnet is None and diffused:
        folder = engine_controlnet_folder(engine_folder(engine))
        if folder is not None:
            log.info("the engine's own ControlNet: %s", folder)
    if folder is None:
        if settings.whole_tile or settings.mask_guidance is not None:
            what = "--whole-tile" if settings.whole_tile else "--mask-guidance"
            raise InputError(
                f"{what} needs a vessel-mask ControlNet (--controlnet NAME); "
                + ("none was asked for" if settings.controlnet == NO_CONTROLNET
                   else f"the engine ({engine.model_id}) ships none")
            )
        return None
    if not diffused:
        raise InputError(
            f"--controlnet steers the engine's regeneration: not with --harmonise "
            f"{run_harmonise(settings, engine)} (use --harmonise "
            "diffusion" + ("" if engine.trained else ", with --allow-untrained for an "
                           "UNTRAINED engine") + ")"
        )
    if settings.whole_tile and engine.generator is not None:
        raise InputError(
            f"engine {engine.preset!r} generates from noise with a companion generator; "
            "a ControlNet steers its seam denoiser: not with --whole-tile"
        )
    controlnet, info = load_controlnet(folder, engine.transformer)
    return RunControl(controlnet, folder, info)


def donor_role(mode: str) -> tuple[str, float]:
    """What a donor is called in ``mode``, and the largest share of the tile it may fill."""
    if mode in ("inpaint", "shape"):
        return "donor", DONOR_MAX_FRACTION
    return "reference vessel", 1.0


def collect_tiles(
    sources: Sequence[SlideSource], run: SynthesisSettings
) -> tuple[list[Donor], list[Background], list[tuple[str, str]]]:
    """The donors (reference vessels in ``variation``), the background tiles to inpaint
    into (when the run takes real tissue) and what cannot be used (item, reason).

    Raises:
        InputError: no usable donor; no background tile with ``--background real``.
    """
    skipped: list[tuple[str, str]] = []
    role, max_fraction = donor_role(run.mode)
    ring = run.ring if run.places_donors else 0
    classes, geometry = run.classes, run.geometry
    donors = collect_donors(
        sources, classes, geometry, skipped, context_px=ring, max_fraction=max_fraction, role=role
    )
    if not donors:
        raise InputError(
            f"no usable {role} of class "
            + ", ".join(repr(c) for c in classes)
            + (f": {skipped[0][1]}" if skipped else "")
        )
    backgrounds: list[Background] = []
    if run.places_donors and run.shapes != "drawn" and run.background != "synthetic":
        backgrounds = collect_backgrounds(
            sources, classes, geometry, seed=run.seed, skipped=skipped
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
    return donors, backgrounds, skipped


def drawn_sketches(
    sources: Sequence[SlideSource], run: SynthesisSettings, skipped: list[tuple[str, str]]
) -> list[Sketch]:
    """The sketches of ``run.shape_class`` usable as target outlines (the others added to
    ``skipped`` and logged, one line each).

    Raises:
        InputError: no usable sketch (the reason of the first one when there were some).
    """
    from histosynth.integration.sketches import collect_sketches

    before = len(skipped)
    sketches = collect_sketches(sources, run.shape_class, run.geometry, run.ring, skipped)
    for item, reason in skipped[before:]:
        log.warning("%s: %s; skipped", item, reason)
    if not sketches:
        first = skipped[before:][:1]
        raise InputError(
            f"no usable sketch of class {run.shape_class!r} for --shapes drawn"
            + (f": {first[0][0]}: {first[0][1]}" if first else "")
        )
    return sketches


# --------------------------------------------------------------------------- run.json


def write_run_info(
    writer: RunWriter, engine: Engine, thresholds: ContentThresholds, ray: RayOptions | None
) -> None:
    """The version, the engine, the content check's thresholds and the Ray cluster into
    run.json."""
    writer.set_info(
        histosynth=__version__,
        engine=engine.description,
        engine_trained=engine.trained,
        content_check=thresholds.to_json(),
    )
    if ray is not None:
        writer.set_info(
            ray={
                "address": ray.address,
                "workers": ray.workers,
                "gpus_per_worker": ray.gpus_per_worker,
            }
        )


def record_collection_skips(
    writer: RunWriter, skipped: list[tuple[str, str]], run: SynthesisSettings
) -> None:
    """The vessels and slides left out while collecting (``skipped``: item, reason) into
    run.json; the vessels too large for the tile are one warning, not one each."""
    too_large = [item for item, reason in skipped if reason.startswith(TOO_LARGE)]
    for item, reason in skipped:
        writer.skip(item, reason, warn=item not in too_large)
    if too_large:
        role, max_fraction = donor_role(run.mode)
        log.warning(
            "%d vessel(s) skipped: each %s is larger than %.0f%% of the %d px tile at %g "
            "µm/px (use a larger --tile-size or a coarser --mpp; each one is in run.json)",
            len(too_large),
            role,
            100 * max_fraction,
            run.tile_size,
            run.mpp,
        )


def ray_engine_spec(
    settings: SynthesisSettings, control: RunControl | None = None
) -> dict[str, Any]:
    """What each Ray actor loads: the model as the caller named it (and the run's
    ControlNet from its folder, checked against the actor's engine)."""
    return {
        "model": settings.model,
        "device": settings.device,
        "kv_compress": settings.kv_compress,
        "tile_size": settings.tile_size if settings.model == "tiny" else None,
        "adapter": settings.adapter,
        "controlnet": None if control is None else str(control.folder.resolve()),
    }


def _renders_on_gpu(engine: Engine, ray: RayOptions | None) -> bool:
    return bool(ray.gpus_per_worker) if ray is not None else engine.device.type == "cuda"


def ray_device(ray: RayOptions) -> str:
    return f"ray: {ray.workers} worker(s), " + (
        f"{ray.gpus_per_worker:g} GPU each" if ray.gpus_per_worker else "CPU"
    )
