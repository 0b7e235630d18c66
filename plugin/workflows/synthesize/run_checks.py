"""What a synthesize run may ask of its engine, and what its tiles must show.

Before anything is read, :func:`check_engine_serves` refuses a run the engine cannot
serve (its declared ``abilities``, :mod:`histosynth.synthesis.abilities`; an UNTRAINED
engine's painting without ``allow_untrained``). While the run writes, every tile gets the
content check (:mod:`histosynth.integration.content_check`) against thresholds
:func:`calibrate_run` derived from real tiles of the run's own slides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from histosynth.integration.content_check import (
    ContentThresholds,
    ContentVerdict,
    calibrate,
    check_tile,
)
from histosynth.integration.errors import InputError
from histosynth.integration.masks import tissue_mask

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.integration.tiles import Background, Donor
    from histosynth.workflows.synthesize.settings import SynthesisSettings

log = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_TILES",
    "WEAK_GAMUT",
    "calibrate_run",
    "check_content",
    "check_engine_serves",
    "resolved_harmonise",
    "stain_warning",
    "steered",
]

#: real tiles the content check is calibrated on (backgrounds, then donors' surroundings)
CALIBRATION_TILES = 16
#: below this median share of in-gamut pixels in a run's real tiles, its slides are not
#: H&E-like
WEAK_GAMUT = 0.3


def resolved_harmonise(
    harmonise: str, trained: bool, recorded: str | None = None, *, steered: bool = False
) -> str:
    """``auto`` → diffusion when a ControlNet steers the run (``steered``: one named, or
    ``--whole-tile``), else the seam mode the engine's metadata records as best by its
    evidence (``recorded``, its ``harmonise``), else diffusion with a trained engine,
    multiband with an UNTRAINED one."""
    if harmonise != "auto":
        return harmonise
    if steered:
        return "diffusion"
    if recorded is not None:
        return recorded
    return "diffusion" if trained else "multiband"


def steered(settings: SynthesisSettings) -> bool:
    """Whether a ControlNet is asked for by name (or ``--whole-tile``, which needs one)."""
    from histosynth.workflows.synthesize.settings import NO_CONTROLNET

    return settings.whole_tile or settings.controlnet not in (None, NO_CONTROLNET)


def check_engine_serves(
    model: str | os.PathLike | Any | None, settings: SynthesisSettings
) -> None:
    """Refuse, before any slide or weight is read, a run the engine cannot serve: a mode
    that generates from noise with an engine that does not (``--whole-tile`` too), a τ
    beyond the timesteps its denoiser learnt, a tile size it does not make, or pixels
    painted by an UNTRAINED engine without ``allow_untrained``.

    Args:
        model: a loaded ``Engine``, or what ``settings.model`` names (a preset, a folder,
            ``None``), whose metadata is read without loading a weight.
        settings: the run's ``SynthesisSettings``.

    Raises:
        InputError: one line naming the engine, the mode and what to use instead.
        EngineError: an unknown model or missing weights (``model_facts``).
    """
    from histosynth.synthesis.abilities import refusal

    if hasattr(model, "abilities"):  # a loaded engine
        engine, abilities, trained = model.preset, model.abilities, model.trained
        recorded = model.sampling.harmonise
    else:
        from histosynth.synthesis.weights import model_facts

        facts = model_facts(model)
        engine, abilities, trained = facts.name, facts.abilities, facts.trained
        recorded = facts.sampling.harmonise
    inpaint = settings.places_donors
    harmonise = resolved_harmonise(
        settings.harmonise, trained, recorded, steered=steered(settings)
    )
    diffusion = inpaint and harmonise == "diffusion"
    # the tile size always; τ only where the engine regenerates seams
    asks = [("inpaint", settings.strength if diffusion else None)]
    if diffusion and settings.inside_strength is not None:
        asks.append(("inpaint", settings.inside_strength))
    if not inpaint:
        asks.append(("variation", None))
    elif settings.background == "synthetic":
        asks.append(("synthetic background", None))
    for mode, strength in asks:
        line = refusal(engine, abilities, mode, strength=strength, tile_size=settings.tile_size)
        if line is not None:
            raise InputError(line)
    if settings.whole_tile and (abilities.max_strength < 1 or not abilities.generates):
        raise InputError(
            f"engine {engine!r} cannot make --whole-tile: a whole tile is generated from noise "
            f"(strength 1) and its denoiser serves strengths up to {abilities.max_strength:g} "
            "(the timesteps it learnt); use an engine that generates (pixcell-1024, "
            "pixcell-256), or drop --whole-tile (the seams and the outline's inside regenerated)"
        )
    if trained or settings.allow_untrained:
        return
    generating = "an engine that generates (pixcell-1024, pixcell-256)"
    painted = {
        "--mode variation": (not inpaint, generating),
        "--background synthetic": (inpaint and settings.background == "synthetic", generating),
        "--harmonise diffusion": (diffusion, "a trained engine (default, pixcell-1024)"),
        "--whole-tile": (settings.whole_tile, generating),
    }
    for what, (asked, instead) in painted.items():
        if asked:
            raise InputError(
                f"engine {engine!r} is UNTRAINED (seeded random weights): {what} would write "
                f"noise, not tissue; use {instead}, or pass --allow-untrained to try the "
                "workflow (its tiles fail the content check)"
            )


def calibrate_run(donors: Sequence[Donor], backgrounds: Sequence[Background]) -> ContentThresholds:
    """The content check's thresholds from real tiles of the run's slides: up to
    :data:`CALIBRATION_TILES` backgrounds and donors' surroundings, and the donors'
    vessels on their tissue; a warning when those tiles are not H&E-like."""
    real = [b.image for b in backgrounds[:CALIBRATION_TILES]]
    real += [d.context for d in donors[: max(0, CALIBRATION_TILES - len(real))]]
    masked = [
        (d.image, d.mask, tissue_mask(d.image) if d.tissue is None else d.tissue)
        for d in donors[:CALIBRATION_TILES]
    ]
    thresholds = calibrate(real, masked)
    warning = stain_warning(thresholds)
    if warning:
        log.warning("%s", warning)
    return thresholds


def stain_warning(thresholds: ContentThresholds) -> str | None:
    """One line when most real tiles of a run (their median share) lie outside the H&E
    gamut — another stain? — else None; a few odd tiles (blood, glass) do not warn."""
    typical = thresholds.real.get("gamut_median")
    if typical is None:  # thresholds recorded before the median was
        typical = (thresholds.real.get("gamut") or [1.0])[0]
    if typical >= WEAK_GAMUT:
        return None
    return (
        f"most real tiles of these slides lie outside the H&E gamut (median share "
        f"{typical:.2f} of {thresholds.real_tiles} tiles): another stain? The content "
        f"check's gamut bound is weak for this run ({thresholds.gamut_min:.2f}); its detail "
        "and colour checks still apply"
    )


def check_content(
    thresholds: ContentThresholds | None,
    image: np.ndarray,
    source: np.ndarray,
    mask: np.ndarray | None,
    composite: np.ndarray | None = None,
) -> ContentVerdict:
    """One tile's content check: against the tissue it was made from (``source``), with
    its mask on the tile's tissue when it has one; for an inpainted tile, the pixels the
    harmoniser changed in its ``composite`` (the seam band) are checked on their own too."""
    assert thresholds is not None, "calibrate_run before the first tile"
    tissue = None if mask is None else tissue_mask(image)
    return check_tile(image, thresholds, source=source, mask=mask, tissue=tissue,
                      composite=composite)
