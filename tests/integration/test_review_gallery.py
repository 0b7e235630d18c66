"""The review gallery, checked in a real headless Chromium: one card per index row, values
escaped (no injected script runs), filters preset from the URL fragment hide cards, every
image the page references exists and loads."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlencode

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import Point

from histosynth.commands.review import review
from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import RunWriter, TileRecord, read_index, update_index
from histosynth.integration.demo.data import he_source_image
from histosynth.integration.errors import InputError
from histosynth.review.gallery import OVERLAY_ALPHA, OVERLAY_RGB, write_gallery

EVIL_CLASS = "Vessel <script>document.title='pwned'</script> \"quoted\" 'single' & <b>bold</b>"
TILE = 64
STATUSES = {
    "inp-0": "accepted",
    "inp-1": "rejected",
    "var-0": "pending",
    "ext-0": "accepted",
    "ext-1": "pending",
}
CLASSES = {
    "inp-0": "Vessel: Invasive",
    "inp-1": "Vessel",
    "var-0": "Vessel: Invasive",
    "ext-0": EVIL_CLASS,
    "ext-1": "Tumor",
}


def _crop(he: np.ndarray, k: int, size: int = TILE) -> np.ndarray:
    y, x = 40 + 97 * k, 60 + 83 * k
    return np.ascontiguousarray(he[y : y + size, x : x + size])


def _disc(size: int, radius: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (size // 2, size // 2), radius, 255, -1)
    return mask


def build_run(run: Path) -> list[dict[str, str]]:
    """A run with inpainting, variation and extracted rows of real H&E crops."""
    he = he_source_image()
    mask = _disc(TILE, 18)
    vessel = [Annotation(geometry=Point(32, 32).buffer(18), class_name="Vessel")]
    common = dict(tile_x=1024, tile_y=2048, tile_size=TILE, mpp=0.5)
    with RunWriter(
        run, config={"mode": "test"}, extra_columns=("donor_image", "donor_entry_id")
    ) as writer:
        for k, tile_id in enumerate(("inp-0", "inp-1")):
            donor = _crop(he, 5 + k, 32)
            writer.add_tile(
                TileRecord(
                    id=tile_id,
                    synthesis_type="inpainting",
                    class_name=CLASSES[tile_id],
                    source_image="/slides/background-B.svs",
                    source_entry_id="2",
                    source_annotation_id=f"uuid-{k}",
                    insert_x=32.0,
                    insert_y=31.5,
                    rotation_deg=12.5,
                    model="pixcell-256",
                    adapter="style-a",
                    seed=100 + k,
                    steps=50,
                    guidance_scale=2.5,
                    strength=0.55,
                    extra={"donor_image": "/slides/donor-A.svs", "donor_entry_id": "1"},
                    **common,
                ),
                _crop(he, k),
                mask,
                vessel,
                refs={
                    "background": _crop(he, k + 2),
                    "donor": donor,
                    "donor-mask": _disc(32, 12),
                    "composite": _crop(he, k + 3),
                },
            )
        writer.add_tile(
            TileRecord(
                id="var-0",
                synthesis_type="variation",
                class_name=CLASSES["var-0"],
                source_image="/slides/donor-A.svs",
                model="pixcell-256",
                seed=7,
                steps=20,
                guidance_scale=1.5,
                extra={"donor_image": "/slides/donor-A.svs", "donor_entry_id": "1"},
                **common,
            ),
            _crop(he, 4),
            mask,
            vessel,
            refs={"reference": _crop(he, 5)},
        )
        for k, tile_id in enumerate(("ext-0", "ext-1")):
            writer.add_tile(
                TileRecord(
                    id=tile_id,
                    synthesis_type="extracted",
                    class_name=CLASSES[tile_id],
                    source_image=f"/slides/real-{k}.ome.tif",
                    source_entry_id=str(3 + k),
                    **common,
                ),
                _crop(he, 6 + k),
                _disc(TILE, 10 + 5 * k),
                vessel,
            )
    update_index(
        run,
        {tid: {"review_status": status} for tid, status in STATUSES.items() if status != "pending"},
    )
    return read_index(run)


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "run one"  # a space: relative links must be URL-quoted
    build_run(folder)
    return folder


# --------------------------------------------------------------------------- HTML parsing


class _Page(HTMLParser):
    """Cards (with their attributes), images, links and scripts of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cards: dict[str, dict[str, str | None]] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self.body: dict[str, str | None] = {}
        self.figures: list[dict[str, str | None]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "article" and "card" in (attributes.get("class") or "").split():
            self.cards[attributes["data-id"] or ""] = attributes
        elif tag == "img":
            self.images.append(attributes["src"] or "")
        elif tag == "a" and attributes.get("href"):
            self.links.append(attributes["href"] or "")
        elif tag == "script":
            self.scripts += 1
        elif tag == "body":
            self.body = attributes
        elif tag == "figure":
            self.figures.append(attributes)
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


# --------------------------------------------------------------------------- Chromium


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium)"
)


#: Headless Chromium on a machine without network: none of its background connections.
HEADLESS_OFFLINE = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)


def chromium(tmp_path: Path, url: str, *extra: str) -> str:
    """Run headless Chromium on ``url`` (offline flags); return stdout."""
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    command = [
        CHROMIUM,
        *HEADLESS_OFFLINE,
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--run-all-compositor-stages-before-draw",
        *extra,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dump_dom(tmp_path: Path, page: Path, fragment: str = "") -> _Page:
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    return parse(chromium(tmp_path, url, "--window-size=1400,8000", "--dump-dom"))


def visible(page: _Page) -> set[str]:
    return {tid for tid, attrs in page.cards.items() if "hidden" not in attrs}


# --------------------------------------------------------------------------- tests


@needs_chromium
def test_chromium_renders_one_card_per_row_and_runs_no_injected_script(
    run: Path, tmp_path: Path
) -> None:
    page_path = write_gallery(run)
    assert page_path == run / "review.html"
    dom = dump_dom(tmp_path, page_path)

    assert set(dom.cards) == set(STATUSES)
    assert dom.body.get("data-ready") == "true"  # the page's own script ran
    assert dom.body.get("data-shown") == str(len(STATUSES))
    assert dom.scripts == 1  # the class name's <script> stayed text
    assert "pwned" not in dom.title and dom.title.startswith("histosynth review")
    for tile_id, attrs in dom.cards.items():
        assert attrs["data-status"] == STATUSES[tile_id]
        assert attrs["data-class"] == CLASSES[tile_id]  # quotes and <> round-trip exactly
        assert "hidden" not in attrs
    # every image loaded under the page's Content-Security-Policy (no "broken" figure)
    assert dom.figures and not [f for f in dom.figures if "broken" in (f.get("class") or "")]
    assert len(dom.images) == 5 + 5 + 3 + 2 + 2


@needs_chromium
@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ("status=accepted", {"inp-0", "ext-0"}),
        ("status=pending,rejected&type=extracted", {"ext-1"}),
        ("class=Vessel", {"inp-0", "inp-1", "var-0"}),  # a class includes derived ones
        (urlencode({"class": EVIL_CLASS}), {"ext-0"}),
    ],
)
def test_chromium_filters_preset_by_the_fragment_hide_cards(
    run: Path, tmp_path: Path, fragment: str, expected: set[str]
) -> None:
    dom = dump_dom(tmp_path, write_gallery(run), fragment)
    assert set(dom.cards) == set(STATUSES)
    assert visible(dom) == expected
    assert dom.body.get("data-shown") == str(len(expected))


@needs_chromium
def test_chromium_marks_an_image_that_fails_to_load(run: Path, tmp_path: Path) -> None:
    page = write_gallery(run)
    (run / "images/ext-1.png").unlink()  # removed after the page was written
    (run / "refs/inp-0-donor.png").write_bytes(b"not a PNG")
    dom = dump_dom(tmp_path, page)
    broken = [f for f in dom.figures if "broken" in (f.get("class") or "")]
    assert len(broken) == 2


@needs_chromium
def test_chromium_screenshot(run: Path, tmp_path: Path) -> None:
    page = write_gallery(run)
    shot = tmp_path / "review.png"
    chromium(tmp_path, page.resolve().as_uri(), "--window-size=1280,1400", f"--screenshot={shot}")
    image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (1400, 1280, 3)
    assert image.std() > 10  # not a blank page
    keep = os.environ.get("HISTOSYNTH_KEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_every_referenced_file_exists_and_values_are_escaped(run: Path) -> None:
    text = write_gallery(run).read_text(encoding="utf-8")
    page = parse(text)
    assert set(page.cards) == set(STATUSES)
    assert page.scripts == 1
    assert text.count("<script") == 1 and "<b>bold" not in text
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in text
    assert "connect-src" not in text and "http://" not in text and "https://" not in text
    referenced = page.images + page.links
    assert referenced
    for src in referenced:
        assert not src.startswith(("/", "file:", "http")), src
        path = (run / unquote(src)).resolve()
        assert path.is_file(), src
        assert path.is_relative_to(run.resolve())
    for tile_id in STATUSES:
        assert f"review/{tile_id}-overlay.png" in page.images
    inp = [src for src in page.images if "inp-0" in src]
    assert inp == [
        "refs/inp-0-background.png",
        "refs/inp-0-donor.png",
        "refs/inp-0-composite.png",
        "images/inp-0.png",
        "review/inp-0-overlay.png",
    ]
    assert [src for src in page.images if "var-0" in src] == [
        "refs/var-0-reference.png",
        "images/var-0.png",
        "review/var-0-overlay.png",
    ]


def test_overlay_draws_the_mask_on_the_result(run: Path) -> None:
    write_gallery(run)
    image = cv2.imread(str(run / "images/ext-0.png"), cv2.IMREAD_COLOR)
    mask = cv2.imread(str(run / "masks/ext-0.png"), cv2.IMREAD_GRAYSCALE)
    overlay = cv2.imread(str(run / "review/ext-0-overlay.png"), cv2.IMREAD_COLOR)
    assert overlay.shape == image.shape
    outside = cv2.dilate(mask, np.ones((7, 7), np.uint8)) == 0
    np.testing.assert_array_equal(overlay[outside], image[outside])
    inside = cv2.erode(mask, np.ones((7, 7), np.uint8)) > 0
    expected = image[inside] * (1 - OVERLAY_ALPHA) + np.array(OVERLAY_RGB[::-1]) * OVERLAY_ALPHA
    assert np.abs(overlay[inside].astype(float) - expected).max() <= 1.0
    edge = (mask > 0) & ~inside
    assert (overlay[edge] == np.array(OVERLAY_RGB[::-1], np.uint8)).all(axis=1).any()


def test_overlay_is_rebuilt_when_the_mask_changes(run: Path) -> None:
    write_gallery(run)
    overlay_path = run / "review/ext-1-overlay.png"
    first = overlay_path.read_bytes()
    write_gallery(run)
    assert overlay_path.read_bytes() == first
    mask_path = run / "masks/ext-1.png"
    cv2.imwrite(str(mask_path), np.zeros((TILE, TILE), np.uint8))
    later = overlay_path.stat().st_mtime_ns + 10**9
    os.utime(mask_path, ns=(later, later))
    write_gallery(run)
    rebuilt = cv2.imread(str(overlay_path), cv2.IMREAD_COLOR)
    image = cv2.imread(str(run / "images/ext-1.png"), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(rebuilt, image)  # an empty mask draws nothing


def test_a_missing_file_shows_on_its_card(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    (run / "refs/inp-1-composite.png").unlink()
    with caplog.at_level(logging.WARNING, logger="histosynth"):
        text = write_gallery(run).read_text(encoding="utf-8")
    page = parse(text)
    assert set(page.cards) == set(STATUSES)
    assert "refs/inp-1-composite.png" not in page.images
    assert "missing file" in text and "refs/inp-1-composite.png" in text
    assert any("inp-1" in r.getMessage() and "composite" in r.getMessage() for r in caplog.records)


def test_provenance_and_badge_on_the_card(run: Path) -> None:
    text = write_gallery(run).read_text(encoding="utf-8")
    card = text[text.index('id="card-inp-0"') : text.index('id="card-inp-1"')]
    assert '<span class="badge status-accepted">accepted</span>' in card
    for shown in (
        "background-B.svs",
        "donor-A.svs",
        "pixcell-256",
        "style-a",
        "100",
        "2.5",
        "0.55",
        "32.0, 31.5",
        "12.5",
        "uuid-0",
    ):
        assert shown in card, shown
    assert 'title="/slides/background-B.svs"' in card


def test_cli_gallery_prints_the_page(run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(review, ["gallery", str(run)], obj={"quiet": True})
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()) == run / "review.html"
    assert (run / "review.html").is_file()
    missing = CliRunner().invoke(review, ["gallery", str(tmp_path / "nope")])
    assert isinstance(missing.exception, InputError)


# --------------------------------------------------------------------------- metrics


def _metrics_json(run: Path) -> None:
    doc = {
        "feature_space": {"name": "tiny", "dim": 16, "comparable_with_published": False},
        "counts": {"synthetic": 3, "real": 4},
        "metrics": [
            {
                "metric": "FID",
                "value": 12.5,
                "pm": None,
                "note": "<script>x</script>",
                "group": "all",
            },
            {"metric": "KID ×10³", "value": 4.94, "pm": 0.5, "note": "", "group": "all"},
        ],
        "plots": {
            "pca": {
                "real": [[0, 0], [1, 1], [2, 0], [0, 2]],
                "synthetic": [[1, 0], [0, 1], [2, 2]],
            },
            "nnd": {
                "metric": "cosine",
                "synth_to_real": [0.1, 0.2, 0.15],
                "real_to_real": [0.12, 0.18, 0.2, 0.11],
            },
        },
    }
    (run / "metrics.json").write_text(json.dumps(doc), encoding="utf-8")


def test_the_gallery_shows_the_run_s_metrics_and_plots(run: Path) -> None:
    _metrics_json(run)
    text = write_gallery(run).read_text(encoding="utf-8")
    assert '<section id="metrics"' in text and "Not comparable with published numbers" in text
    assert "<td>12.5</td>" in text and "± 0.5" in text
    assert "<script>x</script>" not in text and "&lt;script&gt;x&lt;/script&gt;" in text
    assert text.count("<circle") == 7  # 4 real + 3 synthetic points
    assert text.count("<svg") == 2
    (run / "metrics.json").write_text("{ broken", encoding="utf-8")
    assert '<section id="metrics"' not in write_gallery(run).read_text(encoding="utf-8")


@needs_chromium
def test_chromium_draws_the_metric_plots(run: Path, tmp_path: Path) -> None:
    _metrics_json(run)
    page = write_gallery(run)
    dom = chromium(tmp_path, page.resolve().as_uri(), "--window-size=1400,3000", "--dump-dom")
    assert dom.count("<circle") == 7 and dom.count("<svg") == 2
    assert 'id="metrics"' in dom
