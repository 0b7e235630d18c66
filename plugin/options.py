"""Bounded numbers for the command line: each numeric option is finite and in its range.

click's ``FloatRange`` lets ``nan`` through (every comparison with it is false) and
``inf`` wherever there is no upper bound, and ``IntRange(min=1)`` takes ``10**12``;
each would reach the engine (black seams, empty runs, runaway loops or allocations).
The limits below are checked by click before any work, and by
:class:`~histosynth.synthetic_tiles.SynthesisSettings` for the Python API.
"""

from __future__ import annotations

import math
from typing import Any

import click

__all__ = [
    "COUNT_MAX",
    "GUIDANCE_MAX",
    "MPP_MAX",
    "SEED_MAX",
    "STEPS_MAX",
    "FiniteFloat",
    "check_finite",
    "wait_option",
]

#: Coarsest resolution an option accepts, µm/px (a 512 px tile then spans 51 mm).
MPP_MAX = 100.0
#: Most synthetic tiles one run makes.
COUNT_MAX = 1_000_000
#: Most denoising steps (the schedules have 1000 training timesteps).
STEPS_MAX = 1000
#: Largest classifier-free guidance scale.
GUIDANCE_MAX = 50.0
#: Largest seed (numpy's and torch's generators take 32-bit seeds everywhere).
SEED_MAX = 2**32 - 1


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``±inf``."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def check_finite(name: str, value: float, low: float, high: float) -> float:
    """``value`` as a float when it is finite and ``low ≤ value ≤ high``; otherwise
    ValueError naming the option ``name`` (e.g. ``"--mpp"``) and the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], not {value!r}")
    return number


#: Longest ``--wait`` for another process's lock, seconds (a day).
WAIT_MAX_S = 86400.0


def wait_option(func):
    """The ``--wait SECONDS`` option of every command that takes a project or run lock
    (the value arrives as ``wait_s``)."""
    return click.option(
        "--wait",
        "wait_s",
        type=FiniteFloat(0, WAIT_MAX_S),
        default=0.0,
        show_default=True,
        help="Seconds to wait for another histosynth process holding the project's or run "
        "folder's lock before giving up.",
    )(func)
