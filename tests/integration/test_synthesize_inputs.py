"""Donors and backgrounds for ``synthesize``, from a real demo project (no engine)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from histosynth.common.geometry import TileGeometry
from histosynth.integration.annotations import class_matches
from histosynth.integration.tiles import collect_backgrounds, collect_donors, load_sources


@pytest.fixture(scope="module")
def sources(demo_project):
    return load_sources(project=demo_project)


def test_donors_are_vessel_crops_with_their_own_mask(sources):
    skipped = []
    donors = collect_donors(sources, ["Vessel"], TileGeometry(512, 0.5), skipped)
    vessels = [a for s in sources for a in s.annotations if class_matches(a.class_name, "Vessel")]
    assert len(donors) + len(skipped) == len(vessels)
    assert all("larger than 50% of the 512 px tile" in reason for _, reason in skipped)
    for donor in donors:
        side = donor.image.shape[0]
        assert donor.image.shape == (side, side, 3) and donor.mask.shape == (side, side)
        assert side <= 256
        assert set(np.unique(donor.mask)) <= {0, 255}
        # the vessel's own area at 0.5 µm/px, within a pixel ring
        area = donor.vessel.geometry.area * (donor.source.mpp / 0.5) ** 2
        assert abs((donor.mask > 0).sum() - area) <= 0.05 * area + 2 * np.sqrt(area) * 2


def test_backgrounds_carry_the_vessels_inside_and_skip_small_slides(sources):
    skipped = []
    backgrounds = collect_backgrounds(
        sources, ["Vessel"], TileGeometry(1024, 0.5), seed=0, skipped=skipped
    )
    # the second demo slide is 2048×1536 px at 0.25 µm/px: smaller than a 1024 px tile
    assert any("smaller than a background tile" in reason for _, reason in skipped)
    assert backgrounds and all(b.source is sources[0] for b in backgrounds)
    for background in backgrounds:
        assert background.image.shape == (1024, 1024, 3)
        assert background.tissue.mean() >= 0.5
        drawn = (background.existing_mask > 0).sum()
        assert drawn == pytest.approx(
            sum(a.geometry.area for a in background.existing), rel=0.02, abs=50
        )
    assert any(b.existing for b in backgrounds), "some background should hold a vessel"
    again = collect_backgrounds(sources, ["Vessel"], TileGeometry(1024, 0.5), seed=0)
    assert [(b.x, b.y) for b in again] == [(b.x, b.y) for b in backgrounds]


def test_a_donor_crop_beyond_the_slide_edge_excludes_the_white_from_its_ring(sources):
    """A vessel by the slide's edge: the part of its crop beyond the slide is white, and
    ``others`` marks exactly that part, so the ring pasted with the vessel holds tissue."""
    donors = collect_donors(sources, ["Vessel"], TileGeometry(512, 0.5), [], context_px=30)
    edge = []
    for donor in donors:
        minx, miny, maxx, maxy = donor.vessel.geometry.bounds
        src = donor.source
        if min(minx, miny, src.width - maxx, src.height - maxy) * src.mpp / 0.5 < 40:
            edge.append(donor)
    assert edge, "the demo places vessels by the slide's edge"
    for donor in edge:
        white = (donor.image >= 250).all(axis=-1)
        outside = donor.others > 0
        assert outside.any()
        # the pixels beyond the edge are white (but for the resampled one next to it), and
        # what is marked holds no vessel
        deep = cv2.erode(outside.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert deep.any() and white[deep].all()
        assert not (outside & (donor.mask > 0)).any()
    inner = [d for d in donors if d not in edge]
    assert any(not (d.others > 0).any() for d in inner)


def test_a_polygon_touching_the_slide_only_at_its_edge_is_skipped_with_a_warning(
    sources, tmp_path, caplog
):
    """It meets the slide along a line or at a point: no area to rasterise, so it is
    skipped with a warning (it used to end in "cannot rasterise a LineString")."""
    import json

    slide = sources[1].slide_path
    width, height = sources[1].width, sources[1].height

    def feature(ring, name):
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "name": name,
                           "classification": {"name": "Vessel"}},
        }

    along = [[width, 100], [width + 80, 100], [width + 80, 200], [width, 200], [width, 100]]
    corner = [[width, height], [width + 50, height], [width + 50, height + 50],
              [width, height + 50], [width, height]]
    inside = [[300, 300], [400, 300], [400, 380], [300, 380], [300, 300]]
    path = tmp_path / "edge.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature(along, "along the edge"), feature(corner, "at the corner"),
        feature(inside, "inside")]}))
    with caplog.at_level("WARNING", logger="histosynth"):
        (source,) = load_sources(slide=slide, annotations=path)
    assert [a.name for a in source.annotations] == ["inside"]
    assert sum("touches the slide only along its edge" in r.message for r in caplog.records) == 2


def test_names_with_lone_surrogates_and_control_characters_are_stored_safely(
    sources, tmp_path, invoke
):
    """``"\\udfff"`` is valid JSON but no UTF-8: it used to end every writer in a
    UnicodeEncodeError. Now the name is kept with U+FFFD in its place."""
    import csv
    import json

    slide = sources[1].slide_path
    ring = [[300, 300], [420, 300], [420, 400], [300, 400], [300, 300]]
    text = json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "name": "odd\udfff\x07name",
                       "classification": {"name": "Vessel"}}}]})
    assert "\\udfff" in text
    path = tmp_path / "odd.geojson"
    path.write_text(text, encoding="ascii")
    (source,) = load_sources(slide=slide, annotations=path)
    assert source.annotations[0].name == "odd\ufffd\ufffdname"
    out = tmp_path / "ds"
    result = invoke("extract", "--slide", slide, "--annotations", path, "--class", "Vessel",
                    "--out", out, "--tile-size", 256)
    assert result.exit_code == 0, result.output
    with (out / "index.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    for written in out.rglob("*.geojson"):
        written.read_text(encoding="utf-8")  # valid UTF-8


def test_the_tiles_of_a_run_start_from_different_backgrounds(sources):
    """Each tile's first background is one no earlier tile started from while the run has
    such backgrounds (two of the demo's four tiles once shared one), chosen from the
    seed and the tile's index alone: asked in any order, the same choices."""
    from histosynth.workflows.synthesize.settings import SynthesisSettings
    from histosynth.workflows.synthesize.tile_plan import BackgroundOrders

    geometry = TileGeometry(512, 0.5)
    donors = collect_donors(sources, ["Vessel"], geometry, [], context_px=30)
    backgrounds = collect_backgrounds(sources, ["Vessel"], geometry, seed=0)
    assert len(backgrounds) >= 4
    run = SynthesisSettings(classes=("Vessel",), count=40, tile_size=512)
    orders = BackgroundOrders(donors, backgrounds, run)
    firsts = [orders(i)[0] for i in range(len(backgrounds))]
    assert len(set(firsts)) == len(backgrounds)
    for i in range(len(backgrounds)):  # the donor's whole ranking, its first choice first
        assert sorted(orders(i)) == list(range(len(backgrounds)))
    later = [orders(i)[0] for i in range(len(backgrounds), 3 * len(backgrounds))]
    assert set(later) <= set(range(len(backgrounds)))  # all used: the most similar again
    resumed = BackgroundOrders(donors, backgrounds, run)
    assert [resumed(i)[0] for i in (7, 2, 0, 5)] == [firsts[7], firsts[2], firsts[0], firsts[5]]
    synthetic = SynthesisSettings(classes=("Vessel",), count=4, tile_size=512,
                                  background="synthetic")
    assert BackgroundOrders(donors, backgrounds, synthetic)(0) == []
