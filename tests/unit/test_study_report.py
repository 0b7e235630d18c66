"""scripts/study_report.py: the Welch interval of a difference of seed means."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "study_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("study_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_report"] = module
    spec.loader.exec_module(module)
    return module


def test_welch_matches_scipy_and_marks_what_excludes_zero(report) -> None:
    from scipy import stats

    x, y = [0.74, 0.72, 0.75, 0.73, 0.76], [0.69, 0.70, 0.68, 0.71, 0.69]
    diff, low, high = report.welch(x, y)
    assert diff == pytest.approx(np.mean(x) - np.mean(y))
    test = stats.ttest_ind(x, y, equal_var=False)
    assert (low > 0) == (test.pvalue < 0.05)
    # the interval's end is the shift at which Welch's test gives p = 0.05
    shifted = stats.ttest_ind(np.array(x) - high, y, equal_var=False)
    assert shifted.pvalue == pytest.approx(0.05, abs=1e-6)
    rows = [{"arm": a, "k": 8, "iou": {"per_seed": v}}
            for a, v in (("real", y), ("+aug", y), ("+aug +none 1×", x), ("other", y))]
    table = report.differences(rows, [8])
    assert "| +aug +none 1× | +0.046" in table and table.count(" *") == 1
    assert "| real |" not in table


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=6),
       st.lists(st.floats(0, 1), min_size=2, max_size=6))
def test_welch_interval_holds_the_difference(report, x, y) -> None:
    diff, low, high = report.welch(x, y)
    assert math.isclose(diff, np.mean(x) - np.mean(y), abs_tol=1e-9)
    assert low <= diff + 1e-9 and diff <= high + 1e-9
    assert math.isnan(report.welch([], y)[0])  # nothing to compare
