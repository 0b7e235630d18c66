"""What an engine can do: the timesteps its denoiser learnt, whether it generates from
noise, its tile sizes — declared, read without loading weights, and checked per mode.

A denoiser serves only the noise levels it was trained on. Seam regeneration at strength
τ starts at timestep ⌊τ · T⌋ (T = 1000), so an engine trained on timesteps ``[0, 560)``
serves τ ≤ 0.56; generation from pure noise (``--mode variation``, synthetic
backgrounds) starts at T − 1 and needs the whole range. PixCell was trained on all of it;
the embedded default's seam denoiser was not, and says so in its
``histosynth_engine.json``::

    "abilities": {"timesteps": [0, 560], "generates": false, "tile_sizes": [512]}

:func:`refusal` turns a request the engine cannot serve into the one line a command
prints (naming the engine, the mode and what to use instead).

Example:
    >>> seams_only = EngineAbilities(timesteps=(0, 560), generates=False, tile_sizes=(512,))
    >>> seams_only.max_strength
    0.56
    >>> print(refusal("default", seams_only, "variation"))  # doctest: +ELLIPSIS
    engine 'default' cannot make --mode variation: it generates no tile from noise (its ...
    >>> refusal("default", seams_only, "inpaint", strength=0.35) is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from histosynth.synthesis.errors import EngineError

__all__ = [
    "FULL_RANGE",
    "GENERATING_MODES",
    "EngineAbilities",
    "refusal",
    "serves",
]

FULL_RANGE = (0, 1000)
"""Every timestep of the DDPM schedule PixCell and histosynth train on (T = 1000)."""

GENERATING_MODES = ("variation", "synthetic background")
"""The modes that start from pure noise."""

INSTEAD = {
    "variation": "--mode inpaint (real donors in real tissue), or an engine that generates "
    "(pixcell-1024, pixcell-256; histosynth models list)",
    "synthetic background": "--background real, or an engine that generates (pixcell-1024, "
    "pixcell-256; histosynth models list)",
}


@dataclass(frozen=True)
class EngineAbilities:
    """What an engine serves.

    Attributes:
        timesteps: ``[low, high)`` of the timesteps its denoiser was trained on (of T).
        generates: whether it generates tiles from pure noise (variation, synthetic
            backgrounds): its denoiser — or a companion generator it carries — learnt the
            whole range.
        tile_sizes: the tile sides it makes, px (empty: any multiple of 64, the tiny engine).
        num_train_timesteps: T of its noise schedule.
    """

    timesteps: tuple[int, int] = FULL_RANGE
    generates: bool = True
    tile_sizes: tuple[int, ...] = ()
    num_train_timesteps: int = 1000

    @property
    def max_strength(self) -> float:
        """The largest τ a seam regeneration may use (its first timestep was trained on)."""
        return round(self.timesteps[1] / self.num_train_timesteps, 6)

    def to_json(self) -> dict[str, Any]:
        """The ``abilities`` object of ``histosynth_engine.json``."""
        return {
            "timesteps": list(self.timesteps),
            "generates": self.generates,
            "tile_sizes": list(self.tile_sizes),
        }

    @classmethod
    def from_json(
        cls, data: Any, *, where: str = "histosynth_engine.json", tile_size: int | None = None
    ) -> EngineAbilities:
        """Read an ``abilities`` object; ``None`` (an older folder) → the full range, generating,
        at ``tile_size``.

        Raises:
            EngineError: a malformed object, naming ``where``.
        """
        sizes = (tile_size,) if tile_size else ()
        if data is None:
            return cls(tile_sizes=sizes)
        if not isinstance(data, Mapping):
            raise EngineError("abilities must be a JSON object", path=where)
        span = data.get("timesteps", FULL_RANGE)
        low, high = tuple(span) if isinstance(span, list | tuple) and len(span) == 2 else (-1, -1)
        integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high))
        if not integers or not 0 <= low < high <= 1000:
            raise EngineError(
                "abilities.timesteps must be [low, high] with 0 <= low < high <= 1000, not "
                f"{data.get('timesteps')!r}",
                path=where,
            )
        generates = data.get("generates", high == 1000)
        if not isinstance(generates, bool):
            raise EngineError(f"abilities.generates must be true or false, not {generates!r}",
                              path=where)
        raw_sizes = data.get("tile_sizes", list(sizes))
        if not isinstance(raw_sizes, list | tuple) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in raw_sizes
        ):
            raise EngineError(f"abilities.tile_sizes must be a list of px, not {raw_sizes!r}",
                              path=where)
        return cls(timesteps=(low, high), generates=generates, tile_sizes=tuple(raw_sizes))


def refusal(
    engine: str,
    abilities: EngineAbilities,
    mode: str,
    *,
    strength: float | None = None,
    tile_size: int | None = None,
) -> str | None:
    """The one line refusing ``mode`` (``"inpaint"``, ``"variation"``, ``"synthetic
    background"``) with this engine, or ``None`` when it serves it.

    ``strength``: τ of a seam regeneration (inpaint with the diffusion harmoniser);
    ``tile_size``: px asked for.
    """
    low, high = abilities.timesteps
    if tile_size is not None and abilities.tile_sizes and tile_size not in abilities.tile_sizes:
        sizes = ", ".join(str(s) for s in abilities.tile_sizes)
        return (
            f"engine {engine!r} makes {sizes} px tiles, not {tile_size} px; use --tile-size "
            f"{sizes}"
        )
    if mode in GENERATING_MODES and not abilities.generates:
        what = "--mode variation" if mode == "variation" else "synthetic backgrounds"
        return (
            f"engine {engine!r} cannot make {what}: it generates no tile from noise (its "
            f"denoiser learnt timesteps {low}–{high - 1} of {abilities.num_train_timesteps}, "
            f"enough for seams only); use {INSTEAD[mode]}"
        )
    if strength is not None and strength > abilities.max_strength + 1e-9:
        return (
            f"engine {engine!r} serves --strength up to {abilities.max_strength:g} (its "
            f"denoiser learnt timesteps {low}–{high - 1}), not {strength:g}; use a lower "
            "--strength, --harmonise multiband, or an engine trained on the whole range "
            "(pixcell-1024)"
        )
    return None


def serves(abilities: EngineAbilities, trained: bool = True) -> str:
    """One line saying which modes an engine serves (``histosynth models list``)."""
    sizes = ", ".join(str(s) for s in abilities.tile_sizes) or "any multiple of 64"
    if not trained:
        return (
            f"serves: inpainting with multiband seams; variation, synthetic backgrounds and "
            f"diffusion seams only with --allow-untrained (noise); timesteps "
            f"{abilities.timesteps[0]}–{abilities.timesteps[1] - 1}; tiles {sizes} px"
        )
    modes = [f"inpainting (--strength ≤ {abilities.max_strength:g})"]
    if abilities.generates:
        modes += ["variation", "synthetic backgrounds"]
        tail = ""
    else:
        tail = "; refuses variation and synthetic backgrounds (it generates no tile from noise)"
    return (
        f"serves: {', '.join(modes)}{tail}; timesteps {abilities.timesteps[0]}–"
        f"{abilities.timesteps[1] - 1}; tiles {sizes} px"
    )
