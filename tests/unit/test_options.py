"""Numeric options are finite and bounded before any work (issue: hostile input).

click's ``FloatRange`` alone lets ``nan`` and ``inf`` through, and an unbounded
``IntRange`` takes ``10**12``: each case here must be refused with one line, exit 2 (a
usage error), before any output folder exists; the Python API refuses the same values.
"""

from __future__ import annotations

import math

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.commands.options import FiniteFloat
from histosynth.integration.errors import InputError
from histosynth.options import COUNT_MAX, STEPS_MAX, check_finite
from histosynth.workflows.synthesize import SynthesisSettings

BASE = ["synthesize", "--slide", "s.tif", "--annotations", "a.geojson", "--class", "Vessel"]

BAD = [
    ("--mpp", "nan"),
    ("--mpp", "inf"),
    ("--mpp", "1e6"),
    ("--mpp", "-0.5"),
    ("--slide-mpp", "nan"),
    ("--guidance", "nan"),
    ("--guidance", "inf"),
    ("--strength", "nan"),
    ("--count", str(10**12)),
    ("--count", "1e12"),
    ("--steps", str(10**11)),
    ("--seed", str(2**40)),
]


@pytest.mark.parametrize(("option", "value"), BAD)
def test_synthesize_refuses_a_bad_number_before_any_work(invoke, tmp_path, option, value):
    out = tmp_path / "run"
    args = [*BASE, "--out", out, "--count", "2", option, value]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    message = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(message) == 1 and option in message[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        [
            "extract",
            "--slide",
            "s.tif",
            "--annotations",
            "a.geojson",
            "--class",
            "V",
            "--min-area",
            "nan",
        ],
        [
            "extract",
            "--slide",
            "s.tif",
            "--annotations",
            "a.geojson",
            "--class",
            "V",
            "--max-area",
            "inf",
        ],
        ["demo", "--count", str(10**9)],
        ["demo", "--steps", str(10**9)],
    ],
)
def test_other_commands_bound_their_numbers(invoke, tmp_path, args):
    out = tmp_path / "out"
    result = invoke(*args, "--out", out)
    assert result.exit_code == 2, result.output
    assert not out.exists()


@settings(max_examples=50, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_finite_float_accepts_exactly_the_finite_numbers_in_range(value: float) -> None:
    kind = FiniteFloat(0.0, 10.0)
    if math.isfinite(value) and 0.0 <= value <= 10.0:
        assert kind.convert(repr(value), None, None) == value
    else:
        with pytest.raises(click.BadParameter, match=r"finite|range"):
            kind.convert(repr(value), None, None)


def test_check_finite_names_the_option() -> None:
    assert check_finite("--x", "2.5", 0, 3) == 2.5
    for bad in (math.nan, math.inf, -1.0, "abc", None):
        with pytest.raises(ValueError, match="--x"):
            check_finite("--x", bad, 0, 3)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"mpp": math.nan}, "--mpp"),
        ({"mpp": math.inf}, "--mpp"),
        ({"guidance": math.nan}, "--guidance"),
        ({"strength": math.nan}, "--strength"),
        ({"count": COUNT_MAX + 1}, "--count"),
        ({"count": 2.5}, "--count"),
        ({"steps": STEPS_MAX + 1}, "--steps"),
        ({"seam_sigma": math.inf}, "seam σ"),
        ({"colour_blend": math.nan}, "colour blend"),
        ({"kv_compress": 0}, "--kv-compress"),
        ({"tile_size": 10**6}, "--tile-size"),
    ],
)
def test_the_python_api_refuses_the_same_values(change, named) -> None:
    with pytest.raises(InputError, match=named):
        SynthesisSettings(**{"classes": ("Vessel",), "count": 2, **change})
    assert SynthesisSettings(classes=("Vessel",), count=2).count == 2
