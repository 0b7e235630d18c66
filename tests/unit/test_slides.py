"""Slides through TIAToolbox: opening, units, tile geometry and exact tile reads.

Real files only: pyramidal OME-TIFFs written with tifffile (the demo package), a generic TIFF,
PNGs; read with TIAToolbox's ``WSIReader``.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histosynth.integration.demo.data import (
    he_source_image,
    write_pyramidal_ome_tiff,
    write_uncalibrated_tiff,
)
from histosynth.integration.errors import InputError
from histosynth.integration.slides import (
    _best_level,
    centred_tile_origin,
    open_slide,
    read_tile,
    slide_mpp,
    slide_size,
    tile_extent,
)

RAMP_STEP = 4  # grey levels per level-0 pixel of the ramp slide


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small real slides shared by the tests of this module."""
    folder = tmp_path_factory.mktemp("slides")
    he = he_source_image()
    out = {}
    # H&E, JPEG, 0.25 µm/px, levels 1000 / 500 / 250 px
    out["he"] = write_pyramidal_ome_tiff(folder / "he.ome.tif", he, mpp=0.25)
    # lossless ramps: red = 4·x, green = 4·y (level-0 px), so every level and every
    # resampling of it is still a linear ramp whose value says where a pixel came from
    yy, xx = np.mgrid[0:64, 0:64]
    ramp = np.stack([RAMP_STEP * xx, RAMP_STEP * yy, np.full_like(xx, 128)], axis=-1)
    out["ramp"] = write_pyramidal_ome_tiff(
        folder / "ramp.ome.tif", ramp.astype(np.uint8), mpp=0.25, tile=16, levels=3,
        compression="zlib",
    )
    out["uncalibrated"] = write_uncalibrated_tiff(folder / "plain.tif", he[:512, :512])
    out["png"] = folder / "he.png"
    cv2.imwrite(str(out["png"]), cv2.cvtColor(he[:300, :400], cv2.COLOR_RGB2BGR))
    rgba = np.dstack([he[:200, :200], np.full((200, 200), 255, np.uint8)])
    out["rgba"] = folder / "rgba.png"
    cv2.imwrite(str(out["rgba"]), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    out["corrupt"] = folder / "corrupt.ome.tif"
    out["corrupt"].write_bytes(b"II*\x00" + b"\x17" * 2000)
    out["garbage_svs"] = folder / "garbage.svs"
    out["garbage_svs"].write_bytes(b"not a slide at all")
    out["text"] = folder / "notes.txt"
    out["text"].write_text("hello")
    # anisotropic pixels: 0.25 µm wide, 0.5 µm high (generic tiled TIFF, cm units)
    out["anisotropic"] = folder / "aniso.tif"
    tifffile.imwrite(
        out["anisotropic"], he[:256, :256], tile=(128, 128), photometric="rgb",
        resolution=(1e4 / 0.25, 1e4 / 0.5), resolutionunit="CENTIMETER", metadata=None,
    )
    return out


@pytest.fixture(scope="module")
def he_reader(files):
    return open_slide(files["he"])


@pytest.fixture(scope="module")
def ramp_reader(files):
    return open_slide(files["ramp"])


@pytest.fixture(scope="module")
def he_level0(he_reader):
    width, height = slide_size(he_reader)
    return he_reader.read_rect((0, 0), (width, height), resolution=0, units="level")


# ----------------------------------------------------------------------------- opening


def test_open_reads_size_mpp_and_pyramid(he_reader):
    assert type(he_reader).__name__ == "TIFFWSIReader"
    assert slide_mpp(he_reader) == pytest.approx(0.25)
    assert slide_size(he_reader) == (1000, 1000)
    assert he_reader.info.level_count == 3
    assert [tuple(d) for d in he_reader.info.level_dimensions] == [
        (1000, 1000), (500, 500), (250, 250),
    ]


def test_mpp_argument_overrides_metadata(files):
    reader = open_slide(files["he"], mpp=0.3)
    assert slide_mpp(reader) == pytest.approx(0.3)
    assert tile_extent(100, 0.6, slide_mpp(reader)) == pytest.approx(200)


def test_missing_file_is_an_input_error_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "slide.svs"
    with pytest.raises(InputError) as info:
        open_slide(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["corrupt", "garbage_svs", "text"])
def test_unreadable_file_is_an_input_error_naming_it(files, name):
    with pytest.raises(InputError) as info:
        open_slide(files[name])
    message = str(info.value)
    assert message.startswith(str(files[name]))
    assert "cannot open as a slide" in message
    assert "\n" not in message


def test_uncalibrated_slide_needs_mpp(files):
    with pytest.raises(InputError, match="--mpp") as info:
        open_slide(files["uncalibrated"])
    assert str(files["uncalibrated"]) in str(info.value)
    reader = open_slide(files["uncalibrated"], mpp=0.5)
    assert slide_mpp(reader) == pytest.approx(0.5)
    assert slide_size(reader) == (512, 512)
    tile = read_tile(reader, 0, 0, 128, 1.0)
    assert tile.shape == (128, 128, 3)


@pytest.mark.parametrize("bad", [0, -0.25, math.nan, math.inf, "fast"])
def test_bad_mpp_argument(files, bad):
    with pytest.raises(InputError, match="µm per pixel"):
        open_slide(files["he"], mpp=bad)


def test_anisotropic_pixels_are_refused(files):
    with pytest.raises(InputError, match="not square"):
        open_slide(files["anisotropic"])
    # an explicit --mpp states square pixels
    assert slide_mpp(open_slide(files["anisotropic"], mpp=0.25)) == pytest.approx(0.25)


def test_png_needs_mpp_and_reads_rgb(files):
    with pytest.raises(InputError, match="--mpp"):
        open_slide(files["png"])
    reader = open_slide(files["png"], mpp=0.5)
    assert slide_size(reader) == (400, 300)
    tile = read_tile(reader, 10, 20, 64, 0.5)
    expected = he_source_image()[20:84, 10:74]
    assert tile.dtype == np.uint8
    assert np.array_equal(tile, expected)


def test_rgba_image_gives_rgb_tiles(files):
    reader = open_slide(files["rgba"], mpp=0.25)
    tile = read_tile(reader, 0, 0, 50, 0.5)
    assert tile.shape == (50, 50, 3)
    assert tile.dtype == np.uint8


# ----------------------------------------------------------------------------- geometry


def test_tile_extent_units():
    assert tile_extent(1024, 0.5, 0.25) == pytest.approx(2048)
    assert tile_extent(512, 0.25, 0.25) == pytest.approx(512)
    assert tile_extent(1000, 0.5, 0.2465) == pytest.approx(1000 * 0.5 / 0.2465)


def test_centred_tile_origin_inside(he_reader):
    # 100 px at 1 µm/px = 400 level-0 px, centred on (500, 500)
    assert centred_tile_origin(500, 500, 100, 1.0, he_reader) == (300, 300)
    assert centred_tile_origin(500.4, 499.6, 100, 1.0, he_reader) == (300, 300)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cx=st.floats(-200, 1200),
    cy=st.floats(-200, 1200),
    size=st.integers(1, 600),
    mpp=st.sampled_from([0.25, 0.5, 0.77, 1.0, 2.0]),
)
def test_centred_tile_stays_inside(he_reader, cx, cy, size, mpp):
    x, y = centred_tile_origin(cx, cy, size, mpp, he_reader)
    extent = tile_extent(size, mpp, 0.25)
    # the corner lies on the grid of the level read_tile reads (downsample `step`)
    step = round(_best_level(he_reader, mpp / 0.25)[1])
    assert isinstance(x, int) and isinstance(y, int)
    for origin, centre in ((x, cx), (y, cy)):
        assert origin % step == 0
        if extent <= 1000:
            assert origin >= 0 and origin + extent <= 1000 + 1e-9
            # as centred as the slide and the level grid allow
            wanted = centre - extent / 2
            if extent / 2 + step <= centre <= 1000 - extent / 2 - step:
                assert abs(origin - wanted) <= step / 2 + 1e-9
        else:
            assert origin == 0


def test_tile_larger_than_slide_starts_at_zero(he_reader):
    assert centred_tile_origin(900, 100, 2048, 0.5, he_reader) == (0, 0)


# ----------------------------------------------------------------------------- reading


def _ramp_expected(x: float, y: float, size: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Red and green of an exact read of the ramp: the value at each tile pixel centre."""
    ds = mpp / 0.25
    centres = np.arange(size) + 0.5
    # level-0 pixel k holds 4·k at its centre k + 0.5
    red = RAMP_STEP * (x + centres * ds - 0.5)
    green = RAMP_STEP * (y + centres * ds - 0.5)
    shape = (size, size)
    return np.broadcast_to(red[None, :], shape), np.broadcast_to(green[:, None], shape)


@pytest.mark.parametrize(
    ("x", "y", "size", "mpp"),
    [
        (8, 12, 16, 0.25),  # native level, integer origin
        (8.5, 11.25, 16, 0.25),  # native level, sub-pixel origin
        (9, 7, 16, 0.5),  # level 1, odd origin (not on the level's grid)
        (8.3, 10.7, 16, 0.5),
        (6.2, 5.9, 16, 0.75),  # level 1, non-integer scale
        (10, 9, 8, 1.0),  # level 2
        (9.6, 13.1, 20, 0.125),  # finer than level 0: enlarged
    ],
)
def _check_placement(tile: np.ndarray, x: float, y: float, mpp: float) -> None:
    """The tile reads the ramp where it should.

    No bias: a shift of a quarter level-0 pixel would be a bias of 1 grey level, while
    rounding to uint8 and OpenCV's 1/32-pixel interpolation weights allow less. Only a
    non-integer scale from the pyramid level adds an error: the level holds whole pixels
    (a staircase), and averaging a staircase over an interval of s level pixels is off
    the line by at most slope / (8 s).
    """
    size = tile.shape[0]
    red, green = _ramp_expected(x, y, size, mpp)
    level_ds = max(d for d in (1, 2, 4) if d <= mpp / 0.25 + 1e-9) if mpp >= 0.25 else 1
    slope = RAMP_STEP * level_ds  # grey levels per pixel of the level read
    scale = mpp / 0.25 / level_ds
    staircase = slope / (8 * scale) if scale > 1 and abs(scale - round(scale)) > 1e-6 else 0
    tolerance = 1.01 + slope / 4 + staircase
    bias = 0.51 + slope / 64 + staircase
    for channel, expected in ((0, red), (1, green)):
        error = tile[..., channel].astype(float) - expected
        assert abs(error.mean()) <= bias
        assert np.abs(error).max() <= tolerance
    assert np.all(tile[..., 2] == 128)


@pytest.mark.parametrize(
    ("x", "y", "size", "mpp"),
    [
        (8, 12, 16, 0.25),  # native level, integer origin
        (8.5, 11.25, 16, 0.25),  # native level, sub-pixel origin
        (9, 7, 16, 0.5),  # level 1, odd origin (not on the level's grid)
        (8.3, 10.7, 16, 0.5),
        (6.2, 5.9, 16, 0.75),  # level 1, non-integer scale
        (10, 9, 8, 1.0),  # level 2
        (9.6, 13.1, 20, 0.125),  # finer than level 0: enlarged
    ],
)
def test_read_tile_is_exactly_placed(ramp_reader, x, y, size, mpp):
    tile = read_tile(ramp_reader, x, y, size, mpp)
    assert tile.shape == (size, size, 3)
    assert tile.dtype == np.uint8
    _check_placement(tile, x, y, mpp)
    if mpp in (0.25, 0.5) and float(x).is_integer() and float(y).is_integer():
        red, green = _ramp_expected(x, y, size, mpp)
        assert np.abs(tile[..., 0] - red).max() <= 0.51  # whole level pixels: exact
        assert np.abs(tile[..., 1] - green).max() <= 0.51


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(x=st.floats(4, 20), y=st.floats(4, 20), mpp=st.floats(0.2, 1.2))
def test_read_tile_placement_property(ramp_reader, x, y, mpp):
    size = max(int(30 * 0.25 / mpp), 2)  # stays inside the 64 px slide
    _check_placement(read_tile(ramp_reader, x, y, size, mpp), x, y, mpp)


@pytest.mark.parametrize(("x", "y"), [(100, 100), (101, 333), (250.5, 77.25)])
def test_read_tile_matches_resized_level0(he_reader, he_level0, x, y):
    """0.5 µm/px of a 0.25 µm/px slide (from level 1) = level 0 shrunk by 2, within JPEG."""
    tile = read_tile(he_reader, x, y, 256, 0.5)
    ix, iy = math.floor(x), math.floor(y)
    warp = np.array([[1.0, 0.0, x - ix], [0.0, 1.0, y - iy]])
    region = he_level0[iy : iy + 520, ix : ix + 520]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    shifted = cv2.warpAffine(region, warp, (514, 514), flags=flags)
    expected = cv2.resize(shifted[:512, :512], (256, 256), interpolation=cv2.INTER_AREA)
    assert tile.shape == (256, 256, 3)
    assert tile.dtype == np.uint8
    assert np.abs(tile.astype(float) - expected).mean() < 6


def test_read_tile_uses_the_pyramid(he_reader):
    """At 1 µm/px the tile is level 2's own pixels (no resampling of level 0)."""
    tile = read_tile(he_reader, 400, 200, 64, 1.0)
    level2 = he_reader.read_rect((400, 200), (64, 64), resolution=2, units="level")
    assert np.array_equal(tile, level2[..., :3])


def test_read_tile_outside_is_white(he_reader):
    tile = read_tile(he_reader, -200, 900, 100, 1.0)  # 400 level-0 px: x < 0, y > 1000
    assert np.all(tile[:, :45] == 255)  # left of the slide
    assert np.all(tile[30:, :] == 255)  # below the slide
    assert tile[:20, 60:].std() > 5  # tissue inside


@pytest.mark.parametrize(("x", "y"), [(1000, 0), (0, 1000), (-400, 10), (10, -401.5), (5000, 5000)])
def test_read_tile_wholly_outside_the_slide_says_so(he_reader, x, y):
    """A 100 px tile at 1 µm/px spans 400 level-0 px of the 1000² px, 0.25 µm/px slide."""
    with pytest.raises(InputError, match=r"lies outside the slide \(1000×1000 px\)"):
        read_tile(he_reader, x, y, 100, 1.0)
    assert read_tile(he_reader, 999, -399, 100, 1.0).shape == (100, 100, 3)  # one pixel in


def test_read_tile_rejects_bad_arguments(he_reader):
    with pytest.raises(ValueError):
        read_tile(he_reader, 0, 0, 0, 0.5)
    with pytest.raises(ValueError):
        read_tile(he_reader, 0, 0, 10.5, 0.5)
    with pytest.raises(InputError):
        read_tile(he_reader, 0, 0, 10, -1)
    with pytest.raises(ValueError):
        read_tile(he_reader, math.nan, 0, 10, 0.5)


def test_integer_shrink_on_the_grid_equals_exact_area_averaging(files, tmp_path):
    """A slide without the needed pyramid level: an aligned 2× / 4× shrink takes OpenCV's
    block means, which must equal the exact area average of the general path."""
    from histosynth.integration.slides import _area_resample

    he = he_source_image()
    single = write_pyramidal_ome_tiff(tmp_path / "single.ome.tif", he, mpp=0.25, levels=1,
                                      compression="zlib")
    reader = open_slide(single)
    assert len(reader.info.level_downsamples) == 1
    for factor, (x, y) in ((2, (100, 36)), (4, (200, 400))):
        tile = read_tile(reader, x, y, 96, 0.25 * factor)
        block = he[y : y + 96 * factor, x : x + 96 * factor]
        exact = _area_resample(block, 0.0, 0.0, float(factor), 96)
        assert np.abs(tile.astype(int) - exact.astype(int)).max() <= 1


def test_a_tile_far_coarser_than_the_pyramid_is_refused_before_reading(he_reader):
    """A 512 px tile at 100 µm/px of a slide whose coarsest level is 1 µm/px would read a
    51 200² px window (7.3 GiB): refused with one line naming the slide and the level."""
    with pytest.raises(InputError, match=r"51[0-9]{3}×51[0-9]{3} px read from level 2") as err:
        read_tile(he_reader, 0, 0, 512, 100.0)
    assert "he.ome.tif" in str(err.value) and "finer --mpp" in str(err.value)
    assert read_tile(he_reader, 0, 0, 64, 16.0).shape == (64, 64, 3)  # 1024² px: fine


@pytest.mark.parametrize("fraction", [0.001, 0.05, 0.3, 0.5, 0.8, 0.97, 0.999])
def test_a_truncated_tiff_is_refused_when_opened(files, tmp_path, fraction, capsys):
    """A copy cut short at any point is one InputError naming the file at open — not a
    codec error later, and not silently wrong tiles (at 50–99.9 % it used to open)."""
    data = Path(files["he"]).read_bytes()
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[: max(8, int(len(data) * fraction))])
    expected = r"cannot open as a slide: (the file is truncated|the TIFF structure is damaged)"
    with pytest.raises(InputError, match=expected) as err:
        open_slide(cut)
    assert str(cut) in str(err.value) and "\n" not in str(err.value)
    assert "tifffile" not in capsys.readouterr().err  # its warnings are not printed


def test_damaged_tile_data_is_an_error_naming_the_slide(files, tmp_path):
    """Bytes overwritten inside a JPEG tile (same file size): the read is one InputError
    naming the slide, not a codec traceback."""
    data = bytearray(Path(files["he"]).read_bytes())
    with tifffile.TiffFile(files["he"]) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
        assert page.compression == tifffile.COMPRESSION.JPEG
    data[offset : offset + count] = bytes(count)  # the first tile zeroed
    bad = tmp_path / "bad.ome.tif"
    bad.write_bytes(bytes(data))
    reader = open_slide(bad)
    with pytest.raises(InputError, match="may be damaged") as err:
        read_tile(reader, 0, 0, 64, 0.25)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
