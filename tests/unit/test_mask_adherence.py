"""Mask adherence's measures on hand-made masks, the saved segmenter file, and the
gallery's reading of ``adherence.json`` (issue 28, item 5)."""

from __future__ import annotations

import io
import json
import logging
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.metrics.adherence import boundary_f1, mask_boundary, mask_iou


def _square(size: int = 32, top: int = 8, left: int = 8, side: int = 12) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_identical_masks_score_one_and_disjoint_ones_zero():
    a = _square()
    assert mask_iou(a, a) == 1.0 and boundary_f1(a, a) == 1.0
    assert mask_iou(a, _square(top=22, left=22, side=8)) == 0.0
    corner = _square(top=26, left=26, side=6)
    assert boundary_f1(a, corner) == 0.0  # every boundary pixel > 2 px from the other's


def test_iou_of_two_overlapping_squares():
    a, b = _square(top=0, left=0, side=10), _square(top=0, left=5, side=10)
    # 10×5 shared of 10×15 together
    assert mask_iou(a, b) == pytest.approx(50 / 150)


def test_boundary_f1_tolerates_a_shift_within_the_tolerance_only():
    a = _square()
    one = np.roll(a, 1, axis=1)
    assert mask_iou(one, a) < 1.0
    assert boundary_f1(a, one, tolerance_px=2) == 1.0
    four = np.roll(a, 4, axis=1)
    assert 0.0 < boundary_f1(a, four, tolerance_px=2) < 1.0
    assert boundary_f1(a, four, tolerance_px=4) == 1.0


def test_empty_masks_and_the_tiles_edge():
    empty = np.zeros((16, 16), bool)
    assert mask_iou(empty, empty) == 1.0 and boundary_f1(empty, empty) == 1.0
    assert mask_iou(empty, _square(16, 2, 2, 4)) == 0.0
    assert boundary_f1(empty, _square(16, 2, 2, 4)) == 0.0
    full = np.ones((16, 16), bool)
    edge = mask_boundary(full)  # the tile's edge counts as outside the mask
    assert edge.sum() == 4 * 16 - 4 and not edge[1:-1, 1:-1].any()
    with pytest.raises(ValueError, match="one shape"):
        mask_iou(empty, np.zeros((8, 8), bool))


masks = arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12)))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), a=masks, tolerance=st.floats(0, 5))
def test_both_measures_are_symmetric_in_zero_one_and_one_on_identity(data, a, tolerance):
    b = data.draw(arrays(bool, a.shape))
    for measure in (mask_iou, lambda x, y: boundary_f1(x, y, tolerance)):
        value = measure(a, b)
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(measure(b, a))
        assert measure(a, a) == 1.0
    if mask_iou(a, b) == 1.0 and (a.any() or b.any()):
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------- the file


@pytest.fixture(scope="module")
def tiny_segmenter():
    pytest.importorskip("segmentation_models_pytorch")
    from histosynth.synthesis.downstream import build_segmenter

    torch.manual_seed(0)
    return build_segmenter("unet", "tu-mobilenetv3_small_050").eval()


CONFIG = {"arch": "unet", "encoder": "tu-mobilenetv3_small_050", "mpp": 1.0, "tile_size": 64}


def test_a_saved_segmenter_loads_with_the_same_weights_and_config(tiny_segmenter, tmp_path):
    from histosynth.synthesis.downstream.saved import load_segmenter, save_segmenter

    path = save_segmenter(tiny_segmenter, CONFIG, tmp_path / "seg.pt")
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file
    model, config = load_segmenter(path)
    assert config == CONFIG and not model.training
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), tiny_segmenter(x))


def _torch_file(path, data):
    buffer = io.BytesIO()
    torch.save(data, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def test_a_bad_segmenter_file_is_one_clear_error(tiny_segmenter, tmp_path):
    from histosynth.synthesis.downstream.saved import load_segmenter

    state = tiny_segmenter.state_dict()
    good = {"format": "histosynth-segmenter", "format_version": 1,
            "config": json.dumps(CONFIG), "state_dict": state}
    cases = {
        "missing": (tmp_path / "none.pt", "no segmenter file here"),
        "garbage": (tmp_path / "g.pt", "cannot read the segmenter"),
        # a pickled object of another class: weights_only refuses to build it
        "object": (_torch_file(tmp_path / "o.pt", {"x": Fraction(1, 3)}),
                   "cannot read the segmenter"),
        "plain state dict": (_torch_file(tmp_path / "s.pt", state), "not a histosynth-segmenter"),
        "other arch": (_torch_file(tmp_path / "a.pt", {**good, "config": json.dumps(
            {**CONFIG, "arch": "fpn"})}), "does not fit"),
        "no config": (_torch_file(tmp_path / "c.pt", {**good, "config": "{"}), "config"),
        "version": (_torch_file(tmp_path / "v.pt", {**good, "format_version": 9}), "version 9"),
    }
    (tmp_path / "g.pt").write_bytes(b"not a torch file")
    for name, (path, match) in cases.items():
        with pytest.raises(EngineError, match=match) as caught:
            load_segmenter(path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value), name


# --------------------------------------------------------------------------- the gallery


def test_the_gallery_reads_adherence_json_or_warns(tmp_path, caplog):
    from histosynth.review.metrics_view import adherence_by_tile, adherence_section

    assert adherence_by_tile(tmp_path) == {} and adherence_section(tmp_path) == ""
    (tmp_path / "adherence.json").write_text(json.dumps({
        "boundary_tolerance_px": 2.0,
        "summary": {"inpainting": {"tiles": 1, "iou": 0.5, "iou_sd": 0.0, "boundary_f1": 0.25,
                                   "boundary_f1_sd": 0.0, "lowest": "t<1>"}},
        "tiles": {"t<1>": {"synthesis_type": "inpainting", "iou": 0.5, "boundary_f1": 0.25}},
    }))
    assert adherence_by_tile(tmp_path) == {
        "t<1>": [("mask IoU", "0.500"), ("boundary F1 (2 px)", "0.250")]}
    section = adherence_section(tmp_path)
    assert "t&lt;1&gt;" in section and "t<1>" not in section and "0.500 ± 0.00" in section
    (tmp_path / "adherence.json").write_text("{")
    with caplog.at_level(logging.WARNING):
        assert adherence_by_tile(tmp_path) == {}
    assert "not shown in the gallery" in caplog.text
