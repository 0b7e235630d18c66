"""Donors and backgrounds for ``synthesize``, from a real demo project (no engine)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from histosynth.integration.annotations import class_matches
from histosynth.integration.demodata import build_demo_project
from histosynth.integration.tiles import collect_backgrounds, collect_donors, load_sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    project = build_demo_project(tmp_path_factory.mktemp("p") / "project")
    return load_sources(project=project)


def test_donors_are_vessel_crops_with_their_own_mask(sources):
    skipped = []
    donors = collect_donors(sources, ["Vessel"], 512, 0.5, skipped)
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
    backgrounds = collect_backgrounds(sources, ["Vessel"], 1024, 0.5, seed=0, skipped=skipped)
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
    again = collect_backgrounds(sources, ["Vessel"], 1024, 0.5, seed=0)
    assert [(b.x, b.y) for b in again] == [(b.x, b.y) for b in backgrounds]


def test_a_donor_crop_beyond_the_slide_edge_excludes_the_white_from_its_ring(sources):
    """A vessel by the slide's edge: the part of its crop beyond the slide is white, and
    ``others`` marks exactly that part, so the ring pasted with the vessel holds tissue."""
    donors = collect_donors(sources, ["Vessel"], 512, 0.5, [], context_px=30)
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
