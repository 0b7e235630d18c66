"""The review gallery of a run: ``RUN/review.html``, one card per row of ``index.csv``.

A reviewer opens the page in any browser, straight from the disk (``file://``). It is
self-contained: no network, no external script or style sheet; a Content-Security-Policy
allows only the page's own inline script and style (by hash) and images from the run.

Images are *linked* by paths relative to ``RUN`` (the page lives in ``RUN``), not embedded:
a run of a thousand 1024-px tiles would make a page of gigabytes with data URIs, while
relative links keep it a few hundred kB and let the browser load images lazily. The page
therefore stays valid only inside its run folder (move the folder, not the page).

Per card, by ``synthesis_type``:

- ``inpainting``: background, donor, composite (``refs/<id>-*.png``), result, mask overlay
- ``variation``: reference (``refs/<id>-reference.png``), result, mask overlay
- ``extracted`` (and anything else): image, mask overlay

The mask overlay is the row's image with its mask drawn on it (translucent fill and an
outline), precomputed with OpenCV into ``RUN/review/<id>-overlay.png``: it shows whether the
label fits the image it will be trained with. Overlays are rebuilt only when missing or
older than the image or the mask.

Filters (plain JavaScript in the page): status check boxes, class and type selects, and a
"N shown" counter; a hidden card gets the ``hidden`` attribute. The filters are read from,
and written back to, the URL fragment, so a link can preset them:
``review.html#status=accepted,pending&class=Vessel&type=inpainting`` (a class includes its
derived classes: ``Vessel`` shows ``Vessel: Invasive``).

Every value from the index (class names, paths, ids) is HTML-escaped.

Served by ``histosynth review serve`` (:func:`gallery_html` with a token), the page also
gets the decision bar and its script (accept / reject / undo, keys, reviewer, comment).

Size: over 600 lines because the page's style sheet and its two scripts are text
constants here, beside the markup they work on (the page must stay one self-contained
file, so they cannot be separate assets).

Example::

    page = write_gallery("out/run")     # -> out/run/review.html
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from histosynth.common.files import atomic_write_bytes, atomic_write_text
from histosynth.integration.annotations import class_parts
from histosynth.integration.content_check import qc_failed
from histosynth.integration.dataset import (
    INDEX_COLUMNS,
    REVIEW_STATUSES,
    read_index,
    untrained_tile_ids,
    validate_tile_id,
)
from histosynth.integration.decisions import rows_with_logged_decisions
from histosynth.integration.errors import InputError
from histosynth.integration.images import overlay_png, read_mask, read_rgb
from histosynth.integration.run_folder import has_mask, refuse_links_in, review_status
from histosynth.review.metrics_view import adherence_by_tile, adherence_section, metrics_section

log = logging.getLogger(__name__)

GALLERY_NAME = "review.html"
PAGE_SIZE = 200
"""Cards per page of the served gallery (:func:`gallery_html` with ``page``)."""
OVERLAY_DIR = "review"
OVERLAY_RGB = (0, 230, 64)
"""Colour of the mask overlay (RGB): green stands out on H&E pinks and purples."""
OVERLAY_ALPHA = 0.3
"""Opacity of the overlay's fill; the outline is opaque."""

Progress = Callable[[Iterable, int], Iterable]
"""``progress(items, total) -> items``: wraps the loop over rows (e.g. a tqdm bar)."""

# (label, column) of the provenance list, in display order.
PROVENANCE: tuple[tuple[str, str], ...] = (
    ("source slide", "source_image"),
    ("entry", "source_entry_id"),
    ("annotation", "source_annotation_id"),
    ("tile x, y", "tile_x,tile_y"),
    ("tile size", "tile_size"),
    ("µm/px", "mpp"),
    ("model", "model"),
    ("adapter", "adapter"),
    ("seed", "seed"),
    ("steps", "steps"),
    ("guidance", "guidance_scale"),
    ("strength", "strength"),
    ("KV compression", "kv_compress"),
    ("insert x, y", "insert_x,insert_y"),
    ("rotation °", "rotation_deg"),
    ("created", "created_at"),
    ("image sha256", "image_sha256"),
)

# (caption, ref name or None for the row's image) per synthesis type.
_PANELS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "inpainting": (
        ("background", "background"),
        ("donor", "donor"),
        ("composite", "composite"),
        ("result", None),
    ),
    "variation": (("reference", "reference"), ("result", None)),
    "shape": (
        ("background", "background"),
        ("target outline", "shape-mask"),
        ("donor", "donor"),
        ("warped composite", "composite"),
        ("result", None),
    ),
}
_DEFAULT_PANELS: tuple[tuple[str, str | None], ...] = (("image", None),)


def write_gallery(
    run_dir: str | os.PathLike,
    *,
    progress: Progress | None = None,
) -> Path:
    """Write ``RUN/review.html`` (atomically) and the overlays it shows; return its path.

    Rows whose files are missing still get a card, with "missing file" in place of the
    image (and a warning in the log), so that a reviewer sees the problem.

    Raises:
        InputError: ``run_dir`` is not a run folder or its ``index.csv`` is unreadable.
    """
    run = Path(run_dir)
    target = refuse_links_in(run, run / GALLERY_NAME)
    atomic_write_text(target, gallery_html(run, progress=progress))
    return target


def gallery_html(
    run_dir: str | os.PathLike,
    *,
    progress: Progress | None = None,
    review_token: str | None = None,
    rows: Sequence[dict[str, str]] | None = None,
    page: int | None = None,
    statuses: Sequence[str] = (),
) -> str:
    """The gallery page of the run as text. ``review_token``: the page is served by
    ``histosynth review serve`` and gets its decision bar (accept / reject / undo, keys,
    reviewer, comment, progress) posting to the server with this token.

    ``rows``: the index's rows when the caller holds them (default: read ``index.csv``).
    ``page`` (1-based): only that page of :data:`PAGE_SIZE` cards, with links to the
    others — a served run of 100 000 tiles would otherwise be a page of 180 MB;
    ``statuses``: only rows of those review statuses are paged through. The summary and
    the filters' counts cover the whole run."""
    run = Path(run_dir)
    rows = list(rows_with_logged_decisions(run, read_index(run)) if rows is None else rows)
    extra_columns = _extra_columns(rows)
    adherence = adherence_by_tile(run)
    shown = rows
    pager = ""
    if page is not None:
        wanted = {s for s in statuses if s}
        selected = [r for r in rows if _status(r) in wanted] if wanted else rows
        pages = max(1, -(-len(selected) // PAGE_SIZE))
        page = min(max(1, page), pages)
        shown = selected[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        pager = _pager(page, pages, len(selected), sorted(wanted))
    cards = []
    iterator: Iterable = progress(shown, len(shown)) if progress else shown
    for row in iterator:
        cards.append(_card(run, row, extra_columns, adherence.get(row.get("id", ""), [])))
    return _page(
        run,
        rows,
        cards,
        untrained=len(untrained_tile_ids(run, rows)),
        review_token=review_token,
        pager=pager,
    )


def _pager(page: int, pages: int, count: int, statuses: Sequence[str]) -> str:
    """Links to the previous / next page (and to the pending tiles only)."""
    only = f"&status={quote(','.join(statuses))}" if statuses else ""

    def link(number: int, text: str) -> str:
        return f'<a href="?page={number}{_e(only)}" rel="{text}">{text}</a>'

    which = f" {_e('/'.join(statuses))}" if statuses else ""
    parts = [f"page {page} of {pages} ({count} tiles{which})"]
    if page > 1:
        parts.append(link(page - 1, "prev"))
    if page < pages:
        parts.append(link(page + 1, "next"))
    parts.append('<a href="?page=1">all</a>' if statuses
                 else '<a href="?page=1&amp;status=pending">pending only</a>')
    return f'<nav class="pager" data-page="{page}" data-pages="{pages}">{" · ".join(parts)}</nav>'


# --------------------------------------------------------------------------- files


def _run_file(run: Path, rel: str) -> str | None:
    """``rel`` (from the index or built from an id) as a URL path relative to the page,
    or None when it is empty, leaves the run folder or does not exist."""
    if not rel:
        return None
    posix = PurePosixPath(rel.replace("\\", "/"))
    if not posix.parts or posix.is_absolute() or ".." in posix.parts or ":" in posix.parts[0]:
        return None
    path = run / Path(*posix.parts)
    if not path.is_file():
        return None
    return quote(posix.as_posix(), safe="/")


def _safe_id(tile_id: str) -> bool:
    try:
        validate_tile_id(tile_id)
    except InputError:
        return False
    return True


def write_overlay(image_path: Path, mask_path: Path, target: Path) -> bool:
    """Draw ``mask_path`` on ``image_path`` (fill + outline) into PNG ``target``.

    Skipped when ``target`` is newer than both inputs. Returns False (and writes nothing)
    when an input cannot be read or the sizes differ.
    """
    try:
        newest = max(image_path.stat().st_mtime_ns, mask_path.stat().st_mtime_ns)
        if target.is_file() and target.stat().st_mtime_ns >= newest:
            return True
    except OSError:
        return False
    try:
        image, mask = read_rgb(image_path), read_mask(mask_path)
    except InputError:
        log.warning("%s: cannot read the image or its mask for the overlay", image_path)
        return False
    if image.shape[:2] != mask.shape:
        log.warning(
            "%s: mask is %s, the image %s; no overlay", mask_path, mask.shape, image.shape[:2]
        )
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, overlay_png(image, mask, OVERLAY_RGB, OVERLAY_ALPHA))
    return True




# --------------------------------------------------------------------------- HTML


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _extra_columns(rows: Sequence[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    return [name for name in rows[0] if name not in INDEX_COLUMNS]


def _status(row: dict[str, str]) -> str:
    return review_status(row)


def _figure(caption: str, src: str | None, missing: str, tile_id: str) -> str:
    if src is None:
        return (
            f'<figure class="missing"><div class="placeholder">missing file<br>'
            f"<code>{_e(missing)}</code></div><figcaption>{_e(caption)}</figcaption></figure>"
        )
    return (
        f'<figure><a href="{_e(src)}" target="_blank" rel="noopener">'
        f'<img src="{_e(src)}" alt="{_e(caption)} of {_e(tile_id)}" loading="lazy"></a>'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _card(
    run: Path,
    row: dict[str, str],
    extra_columns: Sequence[str],
    adherence: Sequence[tuple[str, str]] = (),
) -> str:
    tile_id = row.get("id", "")
    kind = row.get("synthesis_type", "")
    status = _status(row)
    class_name = row.get("class_name", "")
    safe = _safe_id(tile_id)
    figures = []
    for caption, ref in _PANELS.get(kind, _DEFAULT_PANELS):
        rel = row.get("image_path", "") if ref is None else f"refs/{tile_id}-{ref}.png"
        src = _run_file(run, rel) if (ref is None or safe) else None
        if src is None:
            log.warning("%s: %s: %s file missing: %s", run, tile_id, caption, rel or "(none)")
        figures.append(_figure(caption, src, rel, tile_id))

    image_src = _run_file(run, row.get("image_path", ""))
    masked = has_mask(row)
    mask_src = _run_file(run, row.get("mask_path", "")) if masked else None
    overlay_rel = f"{OVERLAY_DIR}/{tile_id}-overlay.png"
    overlay_src = None
    if safe and image_src and mask_src:
        try:
            made = write_overlay(
                run / Path(*PurePosixPath(row["image_path"].replace("\\", "/")).parts),
                run / Path(*PurePosixPath(row["mask_path"].replace("\\", "/")).parts),
                refuse_links_in(run, run / OVERLAY_DIR / f"{tile_id}-overlay.png"),
            )
        except InputError as exc:
            log.warning("%s", exc)
            made = False
        overlay_src = quote(overlay_rel, safe="/") if made else None
    if not masked:
        figures.append(
            '<figure class="missing"><div class="placeholder">no mask: its pixels were '
            "generated, not placed — a classification sample (its class only)</div>"
            "<figcaption>mask</figcaption></figure>"
        )
    else:
        if overlay_src is None:
            log.warning("%s: %s: no mask overlay (image or mask missing or unreadable)", run,
                        tile_id)
        figures.append(
            _figure("mask overlay", overlay_src, row.get("mask_path", "") or overlay_rel, tile_id)
        )
    qc = row.get("qc", "")
    qc_badge = (
        f'<span class="qc qc-fail" title="{_e(qc)}">content check {_e(qc)}</span>'
        if qc_failed(qc)
        else ""
    )

    items = []
    for label, columns in PROVENANCE:
        values = [row.get(column, "") for column in columns.split(",")]
        text = ", ".join(values) if any(values) else ""
        items.append(_dd(label, text, full=text))
    for column in extra_columns:
        if row.get(column):
            items.append(_dd(column.replace("_", " "), row[column], full=row[column]))
    items += [_dd(label, value, full=value) for label, value in adherence]

    return (
        f'<article class="card" id="card-{_e(tile_id)}" data-id="{_e(tile_id)}" '
        f'data-status="{_e(status)}" data-class="{_e(class_name)}" data-type="{_e(kind)}">\n'
        f"<header><h2>{_e(tile_id)}</h2>"
        f'<span class="badge status-{_e(status)}">{_e(status)}</span>{qc_badge}'
        f'<span class="type">{_e(kind)}</span>'
        f'<span class="class">{_e(class_name) or "(no class)"}</span></header>\n'
        f'<div class="images">{"".join(figures)}</div>\n'
        f'<dl class="provenance">{"".join(items)}</dl>\n'
        "</article>"
    )


def _dd(label: str, text: str, *, full: str) -> str:
    shown = text
    if "/" in text or "\\" in text:  # a path: show the file name, the full path on hover
        shown = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or text
    value = f"<dd>{_e(shown)}</dd>" if text else '<dd class="empty">—</dd>'
    if text and shown != text:
        value = f'<dd title="{_e(full)}">{_e(shown)}</dd>'
    return f"<dt>{_e(label)}</dt>{value}"


def _class_options(rows: Sequence[dict[str, str]]) -> list[tuple[str, int]]:
    """Every class and every parent class of one (``Vessel`` for ``Vessel: Invasive``),
    with the number of rows it selects."""
    counts: Counter[str] = Counter()
    for row in rows:
        parts = class_parts(row.get("class_name", ""))
        for depth in range(1, len(parts) + 1):
            counts[": ".join(parts[:depth])] += 1
    return sorted(counts.items(), key=lambda item: item[0].casefold())


def _csp_hash(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return f"'sha256-{digest}'"


def _untrained_banner(count: int, total: int) -> str:
    if not count:
        return ""
    return (
        f'<p class="untrained" role="alert"><strong>UNTRAINED engine:</strong> {count} of '
        f"{total} tiles were made by an engine with random weights (the <code>tiny</code> "
        "preset). Their synthetic pixels show the workflow, not histology: do not accept "
        "them as training data. Install PixCell-1024 for production "
        "(<code>histosynth models check pixcell-1024</code>).</p>"
    )


def _page(
    run: Path,
    rows: Sequence[dict[str, str]],
    cards: Sequence[str],
    *,
    untrained: int = 0,
    review_token: str | None = None,
    pager: str = "",
) -> str:
    statuses = Counter(_status(row) for row in rows)
    status_names = list(REVIEW_STATUSES) + sorted(set(statuses) - set(REVIEW_STATUSES))
    types = Counter(row.get("synthesis_type", "") for row in rows)
    boxes = "".join(
        f'<label class="status-{_e(name)}"><input type="checkbox" name="status" '
        f'value="{_e(name)}" checked> {_e(name)} ({statuses.get(name, 0)})</label>'
        for name in status_names
    )
    class_options = "".join(
        f'<option value="{_e(name)}">{_e(name)} ({count})</option>'
        for name, count in _class_options(rows)
    )
    type_options = "".join(
        f'<option value="{_e(name)}">{_e(name)} ({count})</option>'
        for name, count in sorted(types.items())
    )
    summary = ", ".join(f"{statuses.get(name, 0)} {_e(name)}" for name in status_names)
    title = f"histosynth review: {run.resolve().name}"
    served = review_token is not None
    scripts = f"{_csp_hash(_SCRIPT)} {_csp_hash(_REVIEW_SCRIPT)}" if served else _csp_hash(_SCRIPT)
    csp = (
        "default-src 'none'; img-src 'self' file: data:; "
        f"style-src {_csp_hash(_STYLE)}; script-src {scripts}; "
        + ("connect-src 'self'; " if served else "")
        + "base-uri 'none'; form-action 'none'"
    )
    decided = sum(1 for row in rows if _status(row) != "pending")
    review_bar = (
        f'<form id="review" autocomplete="off" data-total="{len(rows)}">'
        '<button type="button" id="accept" title="accept (a)">accept <kbd>a</kbd></button>'
        '<button type="button" id="reject" title="reject (r)">reject <kbd>r</kbd></button>'
        '<button type="button" id="undo" title="undo (u)">undo <kbd>u</kbd></button>'
        '<label>reviewer <input id="reviewer" maxlength="100" size="12"></label>'
        '<label>comment <input id="comment" maxlength="1000" size="24"></label>'
        f'<output id="decided" aria-live="polite">{decided} of {len(rows)} decided</output>'
        '<output id="review-error" role="alert"></output>'
        "<span class=\"keys\">next <kbd>j</kbd> <kbd>→</kbd>, previous <kbd>k</kbd> "
        "<kbd>←</kbd></span></form>"
        if served
        else ""
    )
    token_meta = (
        f'<meta name="histosynth-token" content="{_e(review_token)}">\n' if served else ""
    )
    review_script = f"<script>{_REVIEW_SCRIPT}</script>\n" if served else ""
    written = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    body = "\n".join(cards) if cards else '<p class="none">The index has no rows.</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="histosynth review gallery">
{token_meta}<title>{_e(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<header class="page">
<h1>{_e(title)}</h1>
{_untrained_banner(untrained, len(rows))}
<p class="summary">{len(rows)} tiles: <span id="summary-counts">{summary}</span>. \
Written {_e(written)}.</p>
<form id="filters" autocomplete="off">
<fieldset><legend>status</legend>{boxes}</fieldset>
<label>class <select id="class-filter"><option value="">all classes</option>\
{class_options}</select></label>
<label>type <select id="type-filter"><option value="">all types</option>\
{type_options}</select></label>
<output id="shown" aria-live="polite">{len(rows)} shown</output>
</form>
{review_bar}
{pager}
</header>
{metrics_section(run)}
{adherence_section(run)}
<main id="cards">
{body}
</main>
<script>{_SCRIPT}</script>
{review_script}</body>
</html>
"""


_STYLE = """
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #f4f4f6; --card: #fff; --muted: #666;
  --line: #d8d8de; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e8e8ea; --bg: #17171a; --card: #222226; --muted: #a0a0a8; --line: #3a3a40; }
}
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
[hidden] { display: none !important; }
header.page { position: sticky; top: 0; z-index: 1; padding: 8px 16px; background: var(--card);
  border-bottom: 1px solid var(--line); }
h1 { font-size: 18px; margin: 0 0 4px; }
#metrics, #adherence { margin: 12px 16px; padding: 8px 12px; background: var(--card);
  border: 1px solid var(--line); border-radius: 6px; }
#metrics h2, #adherence h2 { font-size: 15px; margin: 0 0 6px; }
#metrics table, #adherence table { border-collapse: collapse; }
#metrics th, #metrics td, #adherence th, #adherence td { padding: 2px 10px 2px 0;
  text-align: left; }
#metrics td:nth-child(2), #metrics td:nth-child(3) { text-align: right; }
#metrics .plots { display: flex; gap: 16px; flex-wrap: wrap; margin-top: 8px; }
#metrics .caveat { color: var(--muted); margin: 0 0 6px; }
.summary { margin: 0 0 6px; color: var(--muted); }
.untrained { margin: 0 0 6px; padding: 6px 10px; border: 2px solid #b00020; background: #fde7ea;
  color: #5c0010; }
#filters { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; }
#filters fieldset { border: 1px solid var(--line); padding: 2px 8px; margin: 0; }
#filters legend { font-size: 12px; color: var(--muted); }
#filters label { margin-right: 8px; }
#filters select { max-width: 24em; }
#shown { font-weight: 600; }
.pager { margin-top: 6px; color: var(--muted); }
#review { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-top: 6px; }
#review button { font: inherit; padding: 2px 10px; }
#review-error { color: #c53030; font-weight: 600; }
#review .keys { color: var(--muted); font-size: 12px; }
kbd { font: 11px ui-monospace, monospace; border: 1px solid var(--line); border-radius: 3px;
  padding: 0 3px; }
.card.current { outline: 3px solid #3182ce; outline-offset: 2px; }
main { padding: 12px 16px; display: grid; gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 12px; }
.card > header { display: flex; flex-wrap: wrap; gap: 8px; align-items: baseline; }
.card h2 { font-size: 15px; margin: 0; font-family: ui-monospace, monospace; }
.badge { border-radius: 9px; padding: 0 8px; font-size: 12px; font-weight: 600; color: #fff;
  background: #777; }
.badge.status-pending { background: #b7791f; }
.badge.status-accepted { background: #2f855a; }
.badge.status-rejected { background: #c53030; }
.qc-fail { border-radius: 9px; padding: 0 8px; font-size: 12px; font-weight: 600;
  color: #fff; background: #9b2c2c; }
.type, .class { color: var(--muted); }
.images { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0; }
figure { margin: 0; width: 200px; }
figure img { width: 200px; height: 200px; object-fit: contain; display: block;
  background: repeating-conic-gradient(#ccc 0 25%, #eee 0 50%) 0 0 / 16px 16px; }
figure.broken img { outline: 3px solid #c53030; }
figcaption { font-size: 12px; color: var(--muted); text-align: center; }
.placeholder { width: 200px; height: 200px; display: flex; flex-direction: column;
  justify-content: center; align-items: center; text-align: center; color: #c53030;
  border: 2px dashed #c53030; font-size: 12px; overflow-wrap: anywhere; padding: 4px; }
.provenance { display: grid; grid-template-columns: max-content 1fr max-content 1fr
  max-content 1fr; gap: 1px 10px; margin: 0; font-size: 12px; }
.provenance dt { color: var(--muted); }
.provenance dd { margin: 0; overflow-wrap: anywhere; }
.provenance dd.empty { color: var(--muted); }
.none { color: var(--muted); }
"""

_REVIEW_SCRIPT = """
(function () {
  "use strict";
  var token = document.querySelector('meta[name="histosynth-token"]').content;
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));
  var bar = document.getElementById("review");
  var reviewer = document.getElementById("reviewer");
  var comment = document.getElementById("comment");
  var decided = document.getElementById("decided");
  var error = document.getElementById("review-error");
  var done = [];  // [card, status before] of this page's decisions, for undo
  var current = null;
  try { reviewer.value = window.localStorage.getItem("histosynth-reviewer") || ""; }
  catch (e) { /* storage off */ }
  reviewer.addEventListener("change", function () {
    try { window.localStorage.setItem("histosynth-reviewer", reviewer.value); }
    catch (e) { /* storage off */ }
  });

  function visible() { return cards.filter(function (c) { return !c.hidden; }); }
  function select(card) {
    if (!card) { return; }
    if (current) { current.classList.remove("current"); }
    current = card;
    card.classList.add("current");
    card.scrollIntoView({block: "nearest"});
    document.body.dataset.current = card.dataset.id;
  }
  function move(step) {
    var shown = visible();
    if (!shown.length) { return; }
    var i = shown.indexOf(current);
    if (i < 0) { select(shown[0]); return; }
    select(shown[Math.max(0, Math.min(shown.length - 1, i + step))]);
  }
  function show(card, status) {
    card.dataset.status = status;
    var badge = card.querySelector(".badge");
    badge.textContent = status;
    badge.className = "badge status-" + status;
  }
  function count(body) {
    var per = {}, n;
    if (body && body.counts) {  // the server's counts cover every page
      per = body.counts;
      n = body.decided;
      bar.dataset.total = body.total;
    } else {
      cards.forEach(function (c) { per[c.dataset.status] = (per[c.dataset.status] || 0) + 1; });
      n = cards.filter(function (c) { return c.dataset.status !== "pending"; }).length;
    }
    decided.textContent = n + " of " + bar.dataset.total + " decided";
    var names = [];
    Array.prototype.forEach.call(document.querySelectorAll('#filters input[name="status"]'),
      function (box) {
        var label = box.parentNode;
        label.lastChild.textContent = " " + box.value + " (" + (per[box.value] || 0) + ")";
        names.push((per[box.value] || 0) + " " + box.value);
      });
    var summary = document.getElementById("summary-counts");
    if (summary) { summary.textContent = names.join(", "); }
  }
  function post(card, status, undo) {
    error.textContent = "";
    return fetch("/api/decision", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-Histosynth-Token": token},
      body: JSON.stringify({id: card.dataset.id, status: status, undo: undo,
        reviewer: reviewer.value, comment: comment.value}),
      credentials: "same-origin"
    }).then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok) { throw new Error(body.error || response.statusText); }
        show(card, body.status);
        count(body);
        if (body.warning) { error.textContent = body.warning; }
        document.body.dataset.saved = String(Number(document.body.dataset.saved || 0) + 1);
        return body;
      });
    }).catch(function (e) { error.textContent = "not saved: " + e.message; });
  }
  function decide(status) {
    if (!current) { move(0); }
    if (!current) { return; }
    var card = current, before = card.dataset.status;
    post(card, status, false).then(function (body) {
      if (body) { done.push([card, before]); comment.value = ""; move(1); }
    });
  }
  function undo() {
    var last = done.pop();
    if (!last) { return; }
    select(last[0]);
    post(last[0], last[1], true);
  }
  document.getElementById("accept").addEventListener("click", function () { decide("accepted"); });
  document.getElementById("reject").addEventListener("click", function () { decide("rejected"); });
  document.getElementById("undo").addEventListener("click", undo);
  cards.forEach(function (card) {
    card.addEventListener("click", function () { select(card); });
  });
  document.addEventListener("keydown", function (event) {
    var tag = (event.target && event.target.tagName) || "";
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") { return; }
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var key = event.key;
    if (key === "a") { decide("accepted"); }
    else if (key === "r") { decide("rejected"); }
    else if (key === "u") { undo(); }
    else if (key === "j" || key === "ArrowDown" || key === "ArrowRight") { move(1); }
    else if (key === "k" || key === "ArrowUp" || key === "ArrowLeft") { move(-1); }
    else { return; }
    event.preventDefault();
  });
  move(0);
  document.body.dataset.review = "ready";
})();
"""

_SCRIPT = """
(function () {
  "use strict";
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));
  var boxes = Array.prototype.slice.call(
    document.querySelectorAll('#filters input[name="status"]'));
  var classSelect = document.getElementById("class-filter");
  var typeSelect = document.getElementById("type-filter");
  var shown = document.getElementById("shown");

  function parts(name) {
    return String(name || "").split(":").map(function (p) { return p.trim(); })
      .filter(function (p) { return p.length > 0; });
  }
  function classMatches(name, wanted) {
    var have = parts(name), want = parts(wanted);
    if (want.length === 0 || have.length < want.length) { return false; }
    for (var i = 0; i < want.length; i++) { if (have[i] !== want[i]) { return false; } }
    return true;
  }
  function choose(select, value) {
    for (var i = 0; i < select.options.length; i++) {
      if (select.options[i].value === value) { select.selectedIndex = i; return; }
    }
    select.selectedIndex = 0;
  }
  function readHash() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    if (params.has("status")) {
      var wanted = params.get("status").split(",");
      boxes.forEach(function (box) { box.checked = wanted.indexOf(box.value) >= 0; });
    }
    if (params.has("class")) { choose(classSelect, params.get("class")); }
    if (params.has("type")) { choose(typeSelect, params.get("type")); }
  }
  function writeHash() {
    var params = new URLSearchParams();
    var checked = boxes.filter(function (b) { return b.checked; })
      .map(function (b) { return b.value; });
    if (checked.length !== boxes.length) { params.set("status", checked.join(",")); }
    if (classSelect.value) { params.set("class", classSelect.value); }
    if (typeSelect.value) { params.set("type", typeSelect.value); }
    try { history.replaceState(null, "", "#" + params.toString()); } catch (e) { /* file: */ }
  }
  function apply() {
    var statuses = {};
    boxes.forEach(function (box) { if (box.checked) { statuses[box.value] = true; } });
    var wantedClass = classSelect.value, wantedType = typeSelect.value, count = 0;
    cards.forEach(function (card) {
      var visible = statuses[card.dataset.status] === true &&
        (wantedClass === "" || classMatches(card.dataset.class, wantedClass)) &&
        (wantedType === "" || card.dataset.type === wantedType);
      card.hidden = !visible;
      if (visible) { count += 1; }
    });
    shown.textContent = count + " shown";
    document.body.dataset.shown = String(count);
  }
  function changed() { apply(); writeHash(); }

  boxes.forEach(function (box) { box.addEventListener("change", changed); });
  classSelect.addEventListener("change", changed);
  typeSelect.addEventListener("change", changed);
  window.addEventListener("hashchange", function () { readHash(); apply(); });
  Array.prototype.forEach.call(document.querySelectorAll("figure img"), function (img) {
    function broken() { img.closest("figure").classList.add("broken"); }
    if (img.complete && img.naturalWidth === 0 && img.getAttribute("loading") !== "lazy") {
      broken();
    }
    img.addEventListener("error", broken);
  });
  readHash();
  apply();
  document.body.dataset.ready = "true";
})();
"""
