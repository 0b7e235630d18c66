"""The colours QuPath gives classes: its built-in classes' and, for any other name, the
one ``PathClass`` derives from the name's Java hash; and QuPath's packed ARGB integers.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from histosynth.integration.annotations import RGB, class_parts

__all__ = ["argb_to_rgb", "default_color", "rgb_to_argb"]


# QuPath's built-in classes (PathClass.StandardPathClasses and getDefaultColor, v0.4–0.7).
_STANDARD_COLORS: dict[str, RGB] = {
    "Tumor": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Ignore*": (180, 180, 180),
    "Image": (128, 128, 128),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
}
# Intensity classes: base colour, scale when standalone (QuPath scales by 1.25), scale
# when derived from a class other than "Tumor" (derived from "Tumor" they use the base).
_INTENSITY_COLORS: dict[str, tuple[RGB, float]] = {
    "Positive": ((200, 50, 50), 0.75),
    "Negative": ((90, 90, 180), 1.25),
    "1+": ((255, 215, 0), 0.9),
    "2+": ((225, 150, 50), 0.6),
    "3+": ((200, 50, 50), 0.4),
}


def _scaled(rgb: RGB, scale: float) -> RGB:
    """``ColorTools.makeScaledRGB``: each channel times ``scale``, truncated, at most 255."""
    return tuple(int(min(255.0, c * scale)) for c in rgb)  # type: ignore[return-value]


def _java_string_hash(text: str) -> int:
    """Java ``String.hashCode()`` (over UTF-16 code units), as a signed 32-bit int."""
    h = 0
    data = text.encode("utf-16-le", errors="surrogatepass")
    for i in range(0, len(data), 2):
        h = (31 * h + (data[i] | (data[i + 1] << 8))) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def _java_random_color(seed: int) -> RGB:
    """QuPath's colour for a new class: ``java.util.Random(seed)``, rejecting dark colours."""
    mask = (1 << 48) - 1
    state = (seed ^ 0x5DEECE66D) & mask

    def next_byte() -> int:  # Random.nextInt(256) == (256 * next(31)) >> 31
        nonlocal state
        state = (state * 0x5DEECE66D + 0xB) & mask
        return (256 * (state >> 17)) >> 31

    r = g = b = 0
    while r < 40 and g < 40 and b < 40:
        r, g, b = next_byte(), next_byte(), next_byte()
    return (r, g, b)


def default_color(class_name: str) -> RGB:
    """The colour QuPath gives a class it creates without one, as (r, g, b) 0–255.

    Built-in classes (Tumor, Stroma, Immune cells, Necrosis, Other, Region*, Ignore*,
    Positive, Negative, 1+, 2+, 3+, and their derived intensity classes) get QuPath's
    fixed colours; any other name gets QuPath's deterministic pseudo-random colour
    (``java.util.Random`` seeded with the hash of the name), so a class created here
    looks the same as one QuPath creates itself.
    """
    parts = class_parts(class_name)
    if not parts:
        return (64, 64, 64)  # QuPath's colour for a class without a name
    last = parts[-1]
    if len(parts) == 1:
        if last in _STANDARD_COLORS:
            return _STANDARD_COLORS[last]
        if last in _INTENSITY_COLORS:
            return _scaled(_INTENSITY_COLORS[last][0], 1.25)
    elif last in _INTENSITY_COLORS:
        base, derived_scale = _INTENSITY_COLORS[last]
        if parts[:-1] == ["Tumor"]:
            return base
        return _scaled(default_color(": ".join(parts[:-1])), derived_scale)
    return _java_random_color(_java_string_hash("\n".join(parts)))


def argb_to_rgb(value: int) -> RGB:
    """Unpack a QuPath packed colour (signed or unsigned 32-bit (A)RGB int) into (r, g, b).

    Raises ``TypeError`` for a non-integer and ``ValueError`` outside 32 bits.
    """
    if isinstance(value, bool):
        raise TypeError(f"packed colour must be an integer, not {value!r}")
    value = operator.index(value)
    if not -(1 << 31) <= value < (1 << 32):
        raise ValueError(f"packed colour {value} does not fit in 32 bits")
    value &= 0xFFFFFFFF
    return ((value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF)


def rgb_to_argb(rgb: Sequence[int]) -> int:
    """Pack (r, g, b) 0–255 into QuPath's signed 32-bit ARGB int with alpha 255."""
    channels = list(rgb)
    if len(channels) != 3:
        raise ValueError(f"expected (r, g, b), got {rgb!r}")
    packed = 0xFF
    for c in channels:
        if isinstance(c, bool):
            raise TypeError(f"colour channel must be an integer, not {c!r}")
        c = operator.index(c)
        if not 0 <= c <= 255:
            raise ValueError(f"colour channel {c} is outside 0–255")
        packed = (packed << 8) | c
    return packed - (1 << 32)


