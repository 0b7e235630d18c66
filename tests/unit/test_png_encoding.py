"""The PNG files tiles and masks are written as: lossless, valid for every decoder we
ship (OpenCV, Pillow, both of which check the chunk CRCs), at any size."""

from __future__ import annotations

import io

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from histosynth.integration.images import PNG_SETTINGS, encode_mask_png, encode_rgb_png


def _decode_both(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    by_cv2 = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        by_pil = np.asarray(image)
    return by_cv2, by_pil


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    png=st.sampled_from(sorted(PNG_SETTINGS)),
)
def test_rgb_png_round_trips_at_any_size(height, width, seed, png):
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    by_cv2, by_pil = _decode_both(encode_rgb_png(image, "t", PNG_SETTINGS[png]))
    assert np.array_equal(cv2.cvtColor(by_cv2, cv2.COLOR_BGR2RGB), image)
    assert np.array_equal(by_pil, image)


def test_fast_png_spans_many_stored_blocks_and_is_stored():
    """A 1024² tile's rows (3 MiB) span 49 stored deflate blocks; the file is the raw rows
    plus a small, fixed overhead (no compression), and a view (non-contiguous) encodes as
    its copy does."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8)[:, ::2]
    data = encode_rgb_png(image, "t", PNG_SETTINGS["fast"])
    raw = 1024 * (1 + 1024 * 3)
    assert raw < len(data) < raw + 400
    by_cv2, by_pil = _decode_both(data)
    assert np.array_equal(by_pil, image)
    assert np.array_equal(cv2.cvtColor(by_cv2, cv2.COLOR_BGR2RGB), image)
    assert data == encode_rgb_png(np.ascontiguousarray(image), "t", PNG_SETTINGS["fast"])


@settings(max_examples=30, deadline=None)
@given(height=st.integers(1, 200), width=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_mask_png_is_single_channel_0_or_255(height, width, seed):
    mask = np.random.default_rng(seed).integers(0, 3, (height, width)).astype(np.int32)
    by_cv2, by_pil = _decode_both(encode_mask_png(mask, None, "m"))
    expected = np.where(mask != 0, 255, 0).astype(np.uint8)
    assert by_cv2.dtype == np.uint8 and by_cv2.ndim == 2
    assert np.array_equal(by_cv2, expected)
    assert np.array_equal(by_pil, expected)
