"""The downstream study's output: the segmentation table, the learning curve and the
stages' minutes (``scripts/study_downstream.py``; its rows as ``summarise`` makes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
