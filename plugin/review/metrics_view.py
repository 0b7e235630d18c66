"""The review gallery's metrics section: ``RUN/metrics.json`` as a table and two inline
SVG plots (real vs synthetic features on their first two principal axes, and the
nearest-neighbour distance histograms). No script, no network: presentation attributes
only, so the gallery's content-security policy needs no change."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("histosynth")

__all__ = ["adherence_by_tile", "adherence_section", "metrics_section"]

REAL, SYNTHETIC = "#1f77b4", "#d62728"
W, H, PAD = 380, 240, 28


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _scale(values: list[float], lo: float, hi: float) -> tuple[float, float]:
    vmin, vmax = min(values), max(values)
    span = (vmax - vmin) or 1.0
    return (hi - lo) / span, lo - vmin * (hi - lo) / span


def _scatter(pca: dict[str, list[list[float]]]) -> str:
    real, fake = pca.get("real", []), pca.get("synthetic", [])
    points = real + fake
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax, bx = _scale(xs, PAD, W - 8)
    ay, by = _scale(ys, H - PAD, 8)
    dots = []
    for colour, group in ((REAL, real), (SYNTHETIC, fake)):
        dots += [
            f'<circle cx="{ax * x + bx:.1f}" cy="{ay * y + by:.1f}" r="2.5" '
            f'fill="{colour}" fill-opacity="0.6"/>'
            for x, y in group
        ]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" '
        f'aria-label="real and synthetic features, first two principal axes">'
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="none" stroke="#888"/>'
        + "".join(dots)
        + f'<text x="{PAD}" y="{H - 8}" font-size="11" fill="#888">PC 1 → · PC 2 ↑ · '
        f'<tspan fill="{REAL}">real ({len(real)})</tspan> · '
        f'<tspan fill="{SYNTHETIC}">synthetic ({len(fake)})</tspan></text></svg>'
    )


def _histogram(nnd: dict[str, Any], bins: int = 20) -> str:
    s2r, r2r = nnd.get("synth_to_real", []), nnd.get("real_to_real", [])
    values = s2r + r2r
    if not values:
        return ""
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    bar_w = (W - PAD - 8) / bins
    bars = []
    counts = []
    for group in (r2r, s2r):
        c = [0] * bins
        for v in group:
            c[min(bins - 1, int((v - lo) / width))] += 1
        counts.append([n / max(1, len(group)) for n in c])
    top = max(max(c) for c in counts) or 1.0
    for colour, c in ((REAL, counts[0]), (SYNTHETIC, counts[1])):
        for k, share in enumerate(c):
            h = (H - PAD - 8) * share / top
            bars.append(
                f'<rect x="{PAD + k * bar_w:.1f}" y="{H - PAD - h:.1f}" '
                f'width="{bar_w - 1:.1f}" height="{h:.1f}" fill="{colour}" '
                'fill-opacity="0.45"/>'
            )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" '
        f'aria-label="nearest-neighbour distance histograms">'
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="none" stroke="#888"/>'
        + "".join(bars)
        + f'<text x="{PAD}" y="{H - 10}" font-size="11" fill="#888">{lo:.3g} … {hi:.3g} '
        f'({_e(nnd.get("metric", ""))}) · <tspan fill="{REAL}">real → real</tspan> · '
        f'<tspan fill="{SYNTHETIC}">synth → real</tspan></text></svg>'
    )


def metrics_section(run: Path) -> str:
    """The section for ``RUN/metrics.json``, or "" when there is none (or it is
    unreadable: then a warning in the log)."""
    path = run / "metrics.json"
    if not path.is_file():
        return ""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        spaces = doc.get("feature_spaces") or [doc["feature_space"]]
        rows = doc["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: not shown in the gallery (%s)", path, exc)
        return ""
    lines = []
    for row in rows:
        value = "n/a" if row.get("value") is None else f"{row['value']:.4g}"
        pm = "" if row.get("pm") is None else f"± {row['pm']:.2g}"
        group = "" if row.get("group", "all") == "all" else f" [{row['group']}]"
        lines.append(
            f'<tr><th scope="row">{_e(row.get("metric", ""))}{_e(group)}</th>'
            f"<td>{_e(row.get('space') or spaces[0].get('name', ''))}</td>"
            f"<td>{_e(value)}</td><td>{_e(pm)}</td><td>{_e(row.get('note', ''))}</td></tr>"
        )
    local = [str(s.get("name")) for s in spaces if not s.get("comparable_with_published")]
    caveat = (
        ""
        if not local
        else (
            '<p class="caveat"><strong>Not comparable with published numbers:</strong> '
            f"measured in the {_e(', '.join(local))} feature space"
            f"{'s' if len(local) > 1 else ''}.</p>"
        )
    )
    names = ", ".join(f"{s.get('name')} ({s.get('dim')}-d)" for s in spaces)
    counts = doc.get("counts", {})
    plots = doc.get("plots", {})
    return (
        '<section id="metrics" aria-label="fidelity metrics">'
        f"<h2>Fidelity: {counts.get('synthetic', '?')} synthetic vs {counts.get('real', '?')} "
        f"real tiles ({_e(names)} features)</h2>{caveat}"
        "<table><thead><tr><th>metric</th><th>features</th><th>value</th><th>±</th>"
        "<th>note</th></tr></thead>"
        f"<tbody>{''.join(lines)}</tbody></table>"
        f'<div class="plots">{_scatter(plots.get("pca", {}))}{_histogram(plots.get("nnd", {}))}'
        "</div></section>"
    )


ADHERENCE_FILE = "adherence.json"


def _adherence(run: Path) -> dict[str, Any] | None:
    """``RUN/adherence.json`` (``evaluate --mask-adherence``), or None when there is none
    (or it is unreadable: then a warning in the log)."""
    path = run / ADHERENCE_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc.get("tiles"), dict) or not isinstance(doc.get("summary"), dict):
            raise ValueError("no tiles or summary")
        float(doc["boundary_tolerance_px"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s: not shown in the gallery (%s)", path, exc)
        return None
    return doc


def adherence_by_tile(run: Path) -> dict[str, list[tuple[str, str]]]:
    """tile id → the (label, value) items of its mask adherence for the tile's card:
    mask IoU and boundary F1 at the file's tolerance; {} without ``RUN/adherence.json``."""
    doc = _adherence(run)
    if doc is None:
        return {}
    tolerance = f"boundary F1 ({float(doc['boundary_tolerance_px']):g} px)"
    out = {}
    for tile_id, values in doc["tiles"].items():
        try:
            out[str(tile_id)] = [("mask IoU", f"{float(values['iou']):.3f}"),
                                 (tolerance, f"{float(values['boundary_f1']):.3f}")]
        except (KeyError, TypeError, ValueError):
            continue
    return out


def adherence_section(run: Path) -> str:
    """The mask adherence summary (one row per synthesis type), or "" without
    ``RUN/adherence.json``."""
    doc = _adherence(run)
    if doc is None:
        return ""
    lines = []
    for kind, s in doc["summary"].items():
        try:
            cells = [s["tiles"], f"{s['iou']:.3f} ± {s['iou_sd']:.2f}",
                     f"{s['boundary_f1']:.3f} ± {s['boundary_f1_sd']:.2f}", s.get("lowest", "")]
        except (KeyError, TypeError, ValueError):
            continue
        lines.append(f'<tr><th scope="row">{_e(kind)}</th>'
                     + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    tolerance = f"{float(doc['boundary_tolerance_px']):g} px"
    return (
        '<section id="adherence" aria-label="mask adherence">'
        "<h2>Mask adherence: the segmented vessel against each tile's own mask</h2>"
        "<table><thead><tr><th>synthesis type</th><th>tiles</th><th>IoU</th>"
        f"<th>boundary F1 ({_e(tolerance)})</th><th>lowest IoU</th></tr></thead>"
        f"<tbody>{''.join(lines)}</tbody></table></section>"
    )
