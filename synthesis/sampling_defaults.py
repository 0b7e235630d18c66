"""An engine's own sampling defaults: the steps and classifier-free guidance scale of
each mode, used wherever a call or a command names none.

They live in the engine folder's ``histosynth_engine.json`` (``inpaint_steps``,
``inpaint_guidance``, ``variation_steps``, ``variation_guidance``, beside its τ
``strength``), chosen by that engine's own bench; a folder that names none takes
:mod:`histosynth.synthesis.defaults` (the dissertation's values, tuned for PixCell).
Read without loading a weight, so a command knows them before any work.

``harmonise`` names the seam mode ``--harmonise auto`` picks for this engine, as its model
card's evidence found best (``diffusion``, ``multiband`` or ``none``: the downstream study
and the seam bench, ``docs/evidence.md``). It is a measurement of these weights, so an
engine trained from this one does not inherit it (:meth:`SamplingDefaults.to_meta` leaves
it out); a folder that names none gets ``diffusion`` when trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histosynth.synthesis import defaults
from histosynth.synthesis.errors import EngineError

__all__ = ["META_KEYS", "SamplingDefaults", "strength_of"]

#: ``histosynth_engine.json`` key → :class:`SamplingDefaults` field
META_KEYS = ("inpaint_steps", "inpaint_guidance", "variation_steps", "variation_guidance")


@dataclass(frozen=True)
class SamplingDefaults:
    """Steps (of the full schedule) and CFG scale per mode.

    ``inpaint_steps``: an inpainting's full schedule, of which ``int(steps · τ)`` run;
    ``inpaint_guidance``: its CFG scale (1 = the conditional pass alone, half the cost);
    ``variation_steps`` / ``variation_guidance``: the same for tiles made from noise.

    >>> own = SamplingDefaults(inpaint_steps=12, inpaint_guidance=1)
    >>> own.steps("inpaint"), own.guidance("inpaint"), own.steps("variation")
    (12, 1, 20)
    """

    inpaint_steps: int = defaults.INPAINT_STEPS
    inpaint_guidance: float = defaults.INPAINT_GUIDANCE
    variation_steps: int = defaults.VARIATION_STEPS
    variation_guidance: float = defaults.VARIATION_GUIDANCE
    harmonise: str | None = None

    def steps(self, mode: str) -> int:
        """Steps of ``mode`` (``"inpaint"`` or ``"shape"``, or ``"variation"`` for any tile
        from noise)."""
        return self.inpaint_steps if mode in ("inpaint", "shape") else self.variation_steps

    def guidance(self, mode: str) -> float:
        """CFG scale of ``mode`` (as :meth:`steps`)."""
        return self.inpaint_guidance if mode in ("inpaint", "shape") else self.variation_guidance

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> SamplingDefaults:
        """The defaults an engine's metadata names (its limits already checked by
        :func:`~histosynth.synthesis.config_limits.check_engine_meta`); the rest
        :mod:`~histosynth.synthesis.defaults`."""
        given = {key: meta[key] for key in META_KEYS if meta.get(key) is not None}
        harmonise = meta.get("harmonise")
        return cls(**given, harmonise=harmonise if isinstance(harmonise, str) else None)

    def to_meta(self) -> dict[str, Any]:
        """The ``histosynth_engine.json`` keys of these defaults an engine trained from this
        one starts with (not ``harmonise``: its evidence is of these weights)."""
        return {key: getattr(self, key) for key in META_KEYS}


def strength_of(meta: Mapping[str, Any], where: str | Path) -> float:
    """The τ an engine's metadata asks for (:data:`defaults.STRENGTH` when it says none).

    Raises:
        EngineError: not a number in (0, 1], naming ``where``.
    """
    value = meta.get("strength", defaults.STRENGTH)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise EngineError(f"strength must be a number in (0, 1], not {value!r}", path=where)
    return float(value)
