"""Synthetic background mode (condition tile, generation from noise) and the background bank."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.pipelines.background import (
    dihedral,
    histogram_distance,
    lab_histogram,
    rank_backgrounds,
    synthetic_condition_tile,
)

H_AND_E = [(200, 120, 170), (120, 60, 140), (235, 200, 220)]  # eosin, haematoxylin, pale


def random_tile(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def stained(colours: list[tuple[int, int, int]], side: int = 64, seed: int = 0) -> np.ndarray:
    """A tile of noisy patches of the given colours."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(colours), (side // 8, side // 8)).repeat(8, 0).repeat(8, 1)
    image = np.asarray(colours, np.float64)[labels] + rng.normal(0, 4, (side, side, 3))
    return image.clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- condition tile


def transforms_of(tile: np.ndarray) -> list[np.ndarray]:
    return [dihedral(tile, k, flip) for k in range(4) for flip in (False, True)]


def test_condition_tile_is_sixteen_turned_copies_of_the_source() -> None:
    source = random_tile(256)
    condition = synthetic_condition_tile(source, np.random.default_rng(3))
    assert condition.shape == (1024, 1024, 3) and condition.dtype == np.uint8
    candidates = transforms_of(source)
    # the 8 symmetries of a random tile are all different, so each block names one
    assert len({c.tobytes() for c in candidates}) == 8
    used = []
    for r in range(4):
        for c in range(4):
            block = condition[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
            matches = [i for i, t in enumerate(candidates) if np.array_equal(block, t)]
            assert len(matches) == 1, (r, c)
            used.append(matches[0])
    assert len(set(used)) >= 4  # random, not one transform repeated
    # a rotation by 90° really is one: the top row becomes the left column
    assert np.array_equal(dihedral(source, 1, False)[:, 0], source[0][::-1])
    # reproducible from the seed; another seed gives another arrangement
    assert np.array_equal(synthetic_condition_tile(source, 3), condition)
    assert not np.array_equal(synthetic_condition_tile(source, 4), condition)


def test_condition_tile_other_grid_and_bad_inputs() -> None:
    small = random_tile(8)
    assert synthetic_condition_tile(small, 0, grid=2).shape == (16, 16, 3)
    with pytest.raises(EngineError, match="square RGB tile"):
        synthetic_condition_tile(np.zeros((8, 16, 3), np.uint8), 0)
    with pytest.raises(EngineError, match="grid"):
        synthetic_condition_tile(small, 0, grid=0)


def test_background_generation_from_the_condition_rows() -> None:
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.pipelines.background import generate_background

    engine = load_engine("tiny", device="cpu")  # 256 px tiles, 64 px encoder crops
    condition = synthetic_condition_tile(random_tile(64), np.random.default_rng(1))
    assert condition.shape == (256, 256, 3)
    assert engine.encoder.encode(condition).shape == (1, 16, 32)  # 16 rows, as at 1024²
    tiles = generate_background(engine, condition, seeds=[1, 2], steps=2, guidance=2.0)
    assert tiles.shape == (2, 256, 256, 3) and tiles.dtype == np.uint8
    assert not np.array_equal(tiles[0], tiles[1])
    # the same as the variation pipeline on the condition image, from noise
    pipe = engine.variation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    again = generate_background(pipe, condition, seeds=[2], steps=2, guidance=2.0)
    reference = pipe(condition, seeds=[2], num_inference_steps=2, guidance_scale=2.0).images
    assert np.array_equal(again[0], reference[0])
    assert np.abs(again[0].astype(int) - tiles[1].astype(int)).max() <= 1  # batch-invariant
    with pytest.raises(EngineError, match="256×256 px"):
        generate_background(engine, random_tile(64), seeds=[1], steps=1)


# --------------------------------------------------------------------------- bank


def test_lab_histogram_counts_tissue_pixels_only() -> None:
    image = stained(H_AND_E)
    hist = lab_histogram(image, None)
    assert hist.shape == (16, 16, 16) and hist.dtype == np.float64
    assert np.isclose(hist.sum(), 1.0)
    white = np.full((4, 4, 3), 255, np.uint8)
    only_white = lab_histogram(white, np.ones((4, 4), bool))
    assert only_white[15, 7:9, 7:9].sum() == pytest.approx(1.0)  # L* = 100, a* = b* ≈ 0
    # pixels outside the tissue mask do not count
    tissue = np.zeros(image.shape[:2], bool)
    tissue[:, :32] = True
    changed = image.copy()
    changed[:, 32:] = (0, 255, 0)
    assert np.array_equal(lab_histogram(image, tissue), lab_histogram(changed, tissue))
    assert not np.array_equal(lab_histogram(image, None), lab_histogram(changed, None))
    assert lab_histogram(image, tissue, bins=4).shape == (4, 4, 4)
    with pytest.raises(EngineError, match="no tissue"):
        lab_histogram(image, np.zeros(image.shape[:2], bool))
    with pytest.raises(EngineError, match="tissue mask of shape"):
        lab_histogram(image, np.ones((3, 3), bool))


@settings(max_examples=100, deadline=None)
@given(
    arrays(np.float64, (4, 4, 4), elements=st.floats(0, 10)),
    arrays(np.float64, (4, 4, 4), elements=st.floats(0, 10)),
)
def test_histogram_distance_is_a_symmetric_bounded_divergence(
    a: np.ndarray, b: np.ndarray
) -> None:
    a[0, 0, 0] += 1  # some mass
    b[0, 0, 0] += 1
    d = histogram_distance(a, b)
    assert d == pytest.approx(histogram_distance(b, a), abs=1e-12)
    assert -1e-12 <= d <= 1 + 1e-12
    assert histogram_distance(a, a) == 0.0
    assert histogram_distance(a, 3 * a) == pytest.approx(0.0, abs=1e-12)  # normalised


def test_histogram_distance_disjoint_is_one_and_shapes_must_match() -> None:
    a, b = np.zeros(8), np.zeros(8)
    a[0], b[1] = 1, 1
    assert histogram_distance(a, b) == pytest.approx(1.0)
    with pytest.raises(EngineError, match="shapes"):
        histogram_distance(np.ones(8), np.ones(9))


def test_bank_ranks_the_same_colours_first_and_very_different_ones_last() -> None:
    donor = stained(H_AND_E, seed=0)
    same_colours = stained(H_AND_E, side=96, seed=5)  # other layout and size, same stains
    paler = stained([(225, 170, 205), (170, 120, 190), (240, 215, 230)], seed=1)
    green = stained([(40, 160, 60), (20, 120, 40)], seed=2)
    nothing = stained(H_AND_E, seed=3)
    candidates = [
        (green, None),
        (paler, None),
        (nothing, np.zeros((64, 64), bool)),  # no tissue: last
        (same_colours, np.ones((96, 96), bool)),
    ]
    assert rank_backgrounds(donor, None, candidates) == [3, 1, 0, 2]
    # ties keep the candidates' order
    twins = [(same_colours, None), (green, None), (same_colours, None)]
    assert rank_backgrounds(donor, None, twins) == [0, 2, 1]
    assert rank_backgrounds(donor, None, []) == []
    # the histograms of many candidates, computed once, rank every donor the same way
    from histosynth.synthesis.pipelines.background import (
        candidate_histograms,
        lab_histogram,
        rank_histograms,
    )

    once = candidate_histograms(candidates)
    assert not once[2].any()  # no tissue
    for other in (donor, paler, green):
        assert rank_histograms(lab_histogram(other, None), once) == rank_backgrounds(
            other, None, candidates
        )


def test_the_bank_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from histosynth.synthesis.pipelines import background as b\n"
        "x = np.zeros((8, 8, 3), np.uint8)\n"
        "b.rank_backgrounds(x, None, [(x, None)])\n"
        "b.synthetic_condition_tile(x, 0)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
