"""Scores of the downstream benchmark, from confusion counts over a whole test fold.

Segmentation (pixels, vessel = positive): IoU = TP / (TP + FP + FN), sensitivity =
TP / (TP + FN), specificity = TN / (TN + FP). Classification (tiles, invasive = positive):
F1 = 2TP / (2TP + FP + FN), sensitivity, specificity. A ratio whose denominator is 0 is
``nan`` (e.g. sensitivity on a fold with no positives).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["classification_scores", "confusion", "segmentation_scores"]


def confusion(truth: np.ndarray, predicted: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of two boolean arrays of one shape."""
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    if truth.shape != predicted.shape:
        raise ValueError(f"shapes differ: {truth.shape} vs {predicted.shape}")
    tp = int(np.count_nonzero(truth & predicted))
    fp = int(np.count_nonzero(~truth & predicted))
    fn = int(np.count_nonzero(truth & ~predicted))
    return tp, fp, fn, truth.size - tp - fp - fn


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def segmentation_scores(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """IoU, sensitivity and specificity of pixel counts."""
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
    }


def classification_scores(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """F1, sensitivity and specificity of tile counts."""
    return {
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
    }
