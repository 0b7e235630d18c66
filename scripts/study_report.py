"""The downstream study's output: the segmentation table, each arm's difference from
``+aug`` with a Welch interval, the learning curve and the stages' minutes
(``scripts/study_downstream.py``; its rows as ``summarise`` makes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def table(rows: list[dict[str, Any]], ks: list[int]) -> str:
    """Markdown: one line per arm, IoU and F1 (mean ± sd over seeds) per K, tiles, time."""
    head = " | ".join(f"K={k} IoU | K={k} F1" for k in ks)
    lines = [f"| arm | {head} | tiles per K (real + synthetic) | training s (all K, seeds) "
             "| synthesis s |",
             "|---|" + "---:|---:|" * len(ks) + "---|---:|---:|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = {r["k"]: r for r in rows if r["arm"] == arm}
        cells = []
        for k in ks:
            for metric in ("iou", "f1"):
                m = mine[k][metric]
                cells.append(f"{m['mean']:.3f} ± {m['sd']:.3f}")
        tiles = ", ".join(f"{mine[k]['real']}+{mine[k]['synthetic']}" for k in ks)
        first = mine[ks[0]]
        lines.append(f"| {arm} | {' | '.join(cells)} | {tiles} | {first['train_seconds']:.0f}"
                     f" | {first['synthesis_seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    """The learning curve (IoU against training tiles, one line per arm) as a PNG; a note
    instead when matplotlib is not installed (histosynth does not depend on it)."""
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib, then re-run)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    palette = plt.get_cmap("tab20").colors  # 20 colours: every arm its own
    for index, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["k"])
        x = [r["real"] + r["synthetic"] for r in mine]
        y = [r["iou"]["mean"] for r in mine]
        ax.errorbar(x, y, yerr=[r["iou"]["sd"] for r in mine], marker="o", capsize=3,
                    label=arm, color=palette[(2 * index) % 20 + (2 * index) // 20 % 2],
                    linestyle="--" if arm.startswith("synthetic") else "-")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([5, 10, 20, 50, 100, 200, 500]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training tiles (real + synthetic)")
    ax.set_ylabel("held-out IoU (mean ± sd over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    from io import BytesIO

    from histosynth.common.files import atomic_write_bytes

    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return None


def stage_minutes(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(synthesis, training) minutes recorded for the study's arms: each mode's synthesis
    once, each arm's trainings once (its rows repeat them per K)."""
    synthesis = {r["arm"].split()[-2].lstrip("+") if r["synthetic"] else "": r["synthesis_seconds"]
                 for r in rows}
    training = {r["arm"]: r["train_seconds"] for r in rows}
    return sum(synthesis.values()) / 60, sum(training.values()) / 60


def welch(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Mean of ``x`` minus mean of ``y`` and its Welch 95 % interval (t quantile at the
    Welch–Satterthwaite degrees of freedom); nan bounds with fewer than 2 values a side."""
    import math

    from scipy import stats

    a = np.array([v for v in x if not math.isnan(v)], float)
    b = np.array([v for v in y if not math.isnan(v)], float)
    if not len(a) or not len(b):
        return math.nan, math.nan, math.nan
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, df)) * se
    return diff, diff - half, diff + half


def differences(rows: list[dict[str, Any]], ks: list[int], baseline: str = "+aug") -> str:
    """Markdown: every other arm's held-out IoU minus ``baseline``'s at each K (difference
    of the seed means, Welch 95 % interval); ``*`` where the interval excludes 0."""
    by = {(r["arm"], r["k"]): r["iou"]["per_seed"] for r in rows}
    lines = [f"| arm − {baseline} | " + " | ".join(f"K={k} ΔIoU [95 % CI]" for k in ks) + " |",
             "|---|" + "---:|" * len(ks)]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        if arm in ("real", baseline):
            continue
        cells = []
        for k in ks:
            diff, low, high = welch(by[(arm, k)], by[(baseline, k)])
            mark = " *" if low > 0 or high < 0 else ""
            cells.append(f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]{mark}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
