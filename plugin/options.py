"""Bounds of the numbers a user gives, shared by the commands and the workflows.

click's ``FloatRange`` lets ``nan`` through (every comparison with it is false) and
``inf`` wherever there is no upper bound, and ``IntRange(min=1)`` takes ``10**12``;
each would reach the engine (black seams, empty runs, runaway loops or allocations).
The limits below are checked by click before any work (the option types of
:mod:`histosynth.commands.options`), and by the workflows' settings (e.g.
:class:`~histosynth.workflows.synthesize.SynthesisSettings`) for the Python API. No click
here: the workflows import this module.
"""

from __future__ import annotations

import math

__all__ = [
    "COUNT_MAX",
    "GUIDANCE_MAX",
    "MPP_MAX",
    "SEED_MAX",
    "STEPS_MAX",
    "WAIT_MAX_S",
    "check_finite",
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
#: Longest ``--wait`` for another process's lock, seconds (a day).
WAIT_MAX_S = 86400.0


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
