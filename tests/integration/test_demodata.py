"""Demo data end to end: a real pyramidal slide read by TIAToolbox, its annotations in
every QuPath GeoJSON flavour read back by our reader, and a QuPath project that matches
the files real QuPath writes (the samples in ``tests/fixtures/qupath``)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
import tifffile
from shapely import affinity
from shapely.geometry import box

from histosynth.integration.annotations import Annotation, class_matches
from histosynth.integration.demo.data import (
    CLASS_INVASIVE,
    CLASS_TUMOR,
    CLASS_VESSEL,
    GEOJSON_VARIANTS,
    DemoSlide,
    build_demo_project,
    build_demo_slide,
    he_source_image,
    write_qupath_geojson_variants,
    write_uncalibrated_tiff,
)
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import read_annotations
from histosynth.integration.masks import rasterize, tissue_mask
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.slides import (
    centred_tile_origin,
    open_slide,
    read_tile,
    slide_mpp,
    slide_size,
    tile_extent,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qupath"

# Key order of what QuPath itself writes (from the real project files in FIXTURES).
QPPROJ_KEYS = ["version", "createTimestamp", "modifyTimestamp", "uri", "lastID", "images"]
ENTRY_KEYS = ["serverBuilder", "entryID", "randomizedName", "imageName", "metadata"]
BUILDER_KEYS = ["builderType", "providerClassName", "uri", "args", "metadata"]
SERVER_METADATA_KEYS = [
    "name", "width", "height", "sizeZ", "sizeT", "channelType", "isRGB", "pixelType",
    "levels", "channels", "pixelCalibration", "preferredTileWidth", "preferredTileHeight",
]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[DemoSlide]:
    """The two demo slides of the default project, built once for the module."""
    folder = tmp_path_factory.mktemp("demo") / "project" / "slides"
    return [
        build_demo_slide(folder / "demo-slide-1.ome.tif", seed=0),
        build_demo_slide(folder / "demo-slide-2.ome.tif", width=2048, height=1536, seed=1),
    ]


@pytest.fixture(scope="module")
def project(slides) -> Path:
    return build_demo_project(slides[0].path.parent.parent, slide=slides)


@pytest.fixture(scope="module")
def reader(slides):
    return open_slide(slides[0].path)


@pytest.fixture(scope="module")
def level0(reader):
    return reader.read_rect((0, 0), slide_size(reader), resolution=0, units="level")


def _vessels(slide: DemoSlide) -> list[Annotation]:
    return [a for a in slide.annotations if class_matches(a.class_name, CLASS_VESSEL)]


def _eq_diameter_um(annotation: Annotation, mpp: float) -> float:
    return 2 * math.sqrt(shapely.Polygon(annotation.geometry.exterior).area / math.pi) * mpp


# ----------------------------------------------------------------------------- the slide


def test_slide_opens_with_tiatoolbox(slides, reader):
    from tiatoolbox.wsicore.wsireader import TIFFWSIReader, WSIReader

    plain = WSIReader.open(slides[0].path)  # TIAToolbox's own entry point
    assert isinstance(plain, TIFFWSIReader)
    assert np.allclose(plain.info.mpp, [0.25, 0.25])
    assert tuple(plain.info.slide_dimensions) == (4096, 3072)
    assert plain.info.level_count == 5
    assert [tuple(d) for d in plain.info.level_dimensions] == [
        (4096 >> i, 3072 >> i) for i in range(5)
    ]
    assert slide_mpp(reader) == pytest.approx(0.25)
    second = open_slide(slides[1].path)
    assert slide_size(second) == (2048, 1536)
    assert second.info.level_count == 4


def test_slide_file_layout(slides):
    with tifffile.TiffFile(slides[0].path) as tif:
        assert tif.is_ome
        page = tif.pages.first
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        x_res = page.tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / 0.25)  # pixels per cm
        assert len(page.subifds) == 4
        sub = tif.pages.first.pages[0]
        assert sub.subfiletype == 1 and (sub.imagewidth, sub.imagelength) == (2048, 1536)
        ome = tif.ome_metadata
    assert 'PhysicalSizeX="0.25"' in ome and 'PhysicalSizeXUnit="µm"' in ome


def test_tile_at_half_resolution_matches_level0(reader, level0):
    tile = read_tile(reader, 1000, 800, 512, 0.5)
    expected = cv2.resize(level0[800:1824, 1000:2024], (512, 512), interpolation=cv2.INTER_AREA)
    assert tile.shape == (512, 512, 3) and tile.dtype == np.uint8
    assert np.abs(tile.astype(float) - expected).mean() < 6  # JPEG of two levels


def test_tile_from_a_lower_pyramid_level(reader, level0):
    tile = read_tile(reader, 512, 256, 256, 2.0)  # 8× down: level 3's own pixels
    level3 = reader.read_rect((512, 256), (256, 256), resolution=3, units="level")
    assert np.array_equal(tile, level3[..., :3])
    expected = cv2.resize(level0[256:2304, 512:2560], (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(tile.astype(float) - expected).mean() < 10


def test_border_vessel_tile_stays_inside(slides, reader):
    slide = slides[0]
    width, height = slide_size(reader)

    def border_distance(a):
        minx, miny, maxx, maxy = a.geometry.bounds
        return min(minx, miny, width - maxx, height - maxy)

    vessel = min(_vessels(slide), key=border_distance)
    assert border_distance(vessel) <= 16
    minx, miny, maxx, maxy = vessel.geometry.bounds
    x, y = centred_tile_origin((minx + maxx) / 2, (miny + maxy) / 2, 1024, 0.5, reader)
    extent = tile_extent(1024, 0.5, slide_mpp(reader))
    assert x >= 0 and y >= 0 and x + extent <= width and y + extent <= height
    assert box(x, y, x + extent, y + extent).contains(vessel.geometry)
    tile = read_tile(reader, x, y, 1024, 0.5)
    white = np.all(tile == 255, axis=2)
    assert not white.all(axis=0).any() and not white.all(axis=1).any()  # no padding


def test_uncalibrated_slide_needs_mpp(tmp_path):
    path = write_uncalibrated_tiff(tmp_path / "scan.tif", he_source_image()[:300, :400])
    with pytest.raises(InputError, match="--mpp") as info:
        open_slide(path)
    assert str(path) in str(info.value)
    assert slide_mpp(open_slide(path, mpp=0.5)) == 0.5


def test_missing_and_corrupt_slides_name_the_file(tmp_path):
    with pytest.raises(InputError) as info:
        open_slide(tmp_path / "gone.ome.tif")
    assert "gone.ome.tif" in str(info.value)
    corrupt = tmp_path / "broken.ome.tif"
    corrupt.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(InputError) as info:
        open_slide(corrupt)
    assert str(corrupt) in str(info.value)


# ----------------------------------------------------------------------------- contents


def test_annotation_classes_and_sizes(slides):
    slide = slides[0]
    classes = {a.class_name for a in slide.annotations}
    assert {CLASS_VESSEL, CLASS_INVASIVE, CLASS_TUMOR} <= classes
    tumour = [a for a in slide.annotations if a.class_name == CLASS_TUMOR]
    assert len(tumour) == 1 and not class_matches(tumour[0].class_name, CLASS_VESSEL)
    diameters = [_eq_diameter_um(a, slide.mpp) for a in _vessels(slide)]
    assert min(diameters) <= 35 and max(diameters) >= 250
    assert all(25 <= d <= 320 for d in diameters)
    for a in slide.annotations:
        uuid.UUID(a.id)
        assert a.color is not None and a.geometry.is_valid
        assert box(0, 0, slide.width, slide.height).contains(a.geometry)
    assert len({a.id for a in slide.annotations}) == len(slide.annotations)
    assert any(len(a.geometry.interiors) == 1 for a in _vessels(slide))


def test_objects_do_not_overlap(slides):
    for slide in slides:
        geoms = [shapely.Polygon(a.geometry.exterior) for a in slide.annotations]
        for i, a in enumerate(geoms):
            for b in geoms[i + 1 :]:
                assert not a.intersects(b)


def test_two_vessels_share_one_tile(slides):
    """Two vessels fit in one 1024 px tile at 0.5 µm/px (2048 level-0 px)."""
    for slide in slides:
        extent = tile_extent(1024, 0.5, slide.mpp)
        vessels = _vessels(slide)
        pairs = [
            (a, b)
            for i, a in enumerate(vessels)
            for b in vessels[i + 1 :]
            if _fits_one_tile(a, b, extent)
        ]
        assert pairs


def _fits_one_tile(a: Annotation, b: Annotation, extent: float) -> bool:
    minx, miny, maxx, maxy = shapely.union_all([a.geometry, b.geometry]).bounds
    return maxx - minx <= extent and maxy - miny <= extent


def test_second_slide_has_the_required_objects(slides):
    classes = {a.class_name for a in slides[1].annotations}
    assert {CLASS_VESSEL, CLASS_INVASIVE, CLASS_TUMOR} <= classes


def test_painted_vessels_look_like_vessels(slides, reader):
    """Lumen pale and unsaturated, wall stained; the whole vessel masks cleanly."""
    slide = slides[0]
    vessel = max(_vessels(slide), key=lambda a: a.geometry.area)
    minx, miny, maxx, maxy = vessel.geometry.bounds
    x, y = centred_tile_origin((minx + maxx) / 2, (miny + maxy) / 2, 1024, 1.0, reader)
    tile = read_tile(reader, x, y, 1024, 1.0)
    scale = slide.mpp / 1.0
    centre = vessel.geometry.centroid
    lumen = affinity.scale(vessel.geometry, 0.4, 0.4, origin=centre)
    ring = vessel.geometry.difference(affinity.scale(vessel.geometry, 0.9, 0.9, origin=centre))
    lumen_mask = rasterize([lumen], origin=(x, y), scale=scale, shape=(1024, 1024)) > 0
    ring_mask = rasterize([ring], origin=(x, y), scale=scale, shape=(1024, 1024)) > 0
    hsv = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)
    assert hsv[..., 2][lumen_mask].mean() > 215
    assert hsv[..., 1][lumen_mask].mean() < 40
    assert hsv[..., 1][ring_mask].mean() > 50
    assert tissue_mask(tile)[lumen_mask].mean() < 0.5


def test_same_seed_same_slide(tmp_path):
    a = build_demo_slide(tmp_path / "a.ome.tif", width=1024, height=768, seed=7)
    b = build_demo_slide(tmp_path / "b.ome.tif", width=1024, height=768, seed=7)
    c = build_demo_slide(tmp_path / "c.ome.tif", width=1024, height=768, seed=8)
    assert [x.id for x in a.annotations] == [x.id for x in b.annotations]
    pairs = zip(a.annotations, b.annotations, strict=True)
    assert all(x.geometry.equals(y.geometry) for x, y in pairs)
    assert [x.id for x in a.annotations] != [x.id for x in c.annotations]
    pa = tifffile.imread(a.path)
    assert np.array_equal(pa, tifffile.imread(b.path))
    assert pa.shape == (768, 1024, 3)
    assert {x.class_name for x in a.annotations} >= {CLASS_VESSEL, CLASS_INVASIVE, CLASS_TUMOR}


# ----------------------------------------------------------------------------- GeoJSON


def test_every_geojson_flavour_reads_back(slides, tmp_path):
    expected = slides[0].annotations
    paths = write_qupath_geojson_variants(expected, tmp_path)
    assert set(paths) == set(GEOJSON_VARIANTS)
    for variant, path in paths.items():
        got = read_annotations(path)
        want = expected[:1] if variant == "v0.4_single_feature" else expected
        assert len(got) == len(want), variant
        for g, w in zip(got, want, strict=True):
            assert g.class_name == w.class_name, variant
            assert g.geometry.equals_exact(w.geometry, 1e-6), variant
            assert g.name == w.name, variant
            assert g.object_type == "annotation", variant
            if variant != "plain":
                assert g.color == w.color, variant
                assert g.measurements == pytest.approx(w.measurements), variant
            if variant.startswith("v0.4") or variant in ("derived_names", "joined_name"):
                assert g.id == w.id, variant
    by_class = read_annotations(paths["v0.3"], classes=["Vessel"])
    assert len(by_class) == len(_vessels(slides[0]))


def test_geojson_flavours_as_qupath_writes_them(slides, tmp_path):
    paths = write_qupath_geojson_variants(slides[0].annotations, tmp_path)
    invasive = next(a for a in slides[0].annotations if a.class_name == CLASS_INVASIVE)

    def find(features, ann_index):
        return features[ann_index]

    index = slides[0].annotations.index(invasive)
    fc = json.loads(paths["v0.4_feature_collection"].read_text())
    assert fc["type"] == "FeatureCollection"
    f = find(fc["features"], index)
    assert f["id"] == invasive.id and f["properties"]["objectType"] == "annotation"
    assert f["properties"]["classification"] == {
        "names": ["Vessel", "Invasive"], "color": list(invasive.color),
    }
    plain_vessel = fc["features"][0]["properties"]["classification"]
    assert set(plain_vessel) == {"name", "color"}
    assert isinstance(fc["features"][0]["properties"]["measurements"], dict)
    array = json.loads(paths["v0.4_feature_array"].read_text())
    assert isinstance(array, list) and array == fc["features"]
    single = json.loads(paths["v0.4_single_feature"].read_text())
    assert single == fc["features"][0]
    v03 = find(json.loads(paths["v0.3"].read_text()), index)
    assert "id" not in v03 and v03["properties"]["object_type"] == "annotation"
    cls = v03["properties"]["classification"]
    assert cls["name"] == "Invasive" and cls["parentClass"]["name"] == "Vessel"
    assert isinstance(cls["colorRGB"], int) and cls["colorRGB"] < 0
    assert isinstance(v03["properties"]["measurements"], list)
    v02 = find(json.loads(paths["v0.2"].read_text()), index)
    assert v02["id"] == "PathAnnotationObject" and "object_type" not in v02["properties"]
    names = json.loads(paths["derived_names"].read_text())["features"][0]
    assert names["properties"]["classification"]["names"] == ["Vessel"]
    joined = find(json.loads(paths["joined_name"].read_text())["features"], index)
    assert joined["properties"]["classification"]["name"] == "Vessel: Invasive"
    plain = find(json.loads(paths["plain"].read_text())["features"], index)
    assert plain["properties"] == {"classification": "Vessel: Invasive"}
    assert "id" not in plain


# ----------------------------------------------------------------------------- project


def test_qupath_key_order_is_what_qupath_writes():
    """The key lists used below are those of real QuPath files."""
    for version in ("v0.3.2", "v0.4.0", "v0.6.0-rc3"):
        path = FIXTURES / version / "project.qpproj"
        assert path.is_file(), path
        real = json.loads(path.read_text(encoding="utf-8"))
        assert list(real) == QPPROJ_KEYS
        entry = real["images"][0]
        assert list(entry) == ENTRY_KEYS
        assert list(entry["serverBuilder"]) == BUILDER_KEYS
        keys = [k for k in entry["serverBuilder"]["metadata"] if k != "magnification"]
        assert keys == SERVER_METADATA_KEYS


def test_default_project_has_two_slides(tmp_path):
    project_file = build_demo_project(tmp_path / "p")
    data = json.loads(project_file.read_text())
    assert [e["imageName"] for e in data["images"]] == [
        "demo-slide-1.ome.tif", "demo-slide-2.ome.tif",
    ]
    assert (tmp_path / "p" / "slides" / "demo-slide-2.ome.tif").is_file()
    assert (tmp_path / "p" / "annotations" / "2.geojson").is_file()


def test_project_file_like_qupath(project):
    data = json.loads(project.read_text())
    assert list(data) == QPPROJ_KEYS
    assert data["version"] == "0.5.1"
    assert data["uri"] == "file:" + str(project)
    assert data["createTimestamp"] == data["modifyTimestamp"] > 0
    assert data["lastID"] == max(e["entryID"] for e in data["images"]) == 2
    for entry in data["images"]:
        assert list(entry) == ENTRY_KEYS
        assert list(entry["serverBuilder"]) == BUILDER_KEYS
        assert list(entry["serverBuilder"]["metadata"]) == SERVER_METADATA_KEYS
        builder = entry["serverBuilder"]
        assert builder["builderType"] == "uri"
        assert builder["providerClassName"].endswith("BioFormatsServerBuilder")
        assert builder["args"] == ["--series", "0"]
        assert builder["uri"].startswith("file:/") and not builder["uri"].startswith("file://")
        assert Path(builder["uri"][len("file:") :]).is_file()
        uuid.UUID(entry["randomizedName"])
        assert entry["metadata"] == {}
        assert entry["imageName"].endswith(".ome.tif")
        calibration = builder["metadata"]["pixelCalibration"]
        assert calibration["pixelWidth"] == {"value": 0.25, "unit": "µm"}
    assert "tags" not in data["images"][0]


def test_project_classes_and_annotations(project, slides):
    classes = json.loads((project.parent / "classifiers" / "classes.json").read_text())
    names = {c["name"]: c["color"] for c in classes["pathClasses"]}
    assert names["Tumor"] == -3670016
    assert CLASS_VESSEL in names and CLASS_INVASIVE in names
    assert all(isinstance(v, int) and v < 0 for v in names.values())
    for entry_id, slide in ((1, slides[0]), (2, slides[1])):
        path = project.parent / "annotations" / f"{entry_id}.geojson"
        doc = json.loads(path.read_text())
        assert doc["type"] == "FeatureCollection"
        assert all(f["properties"]["objectType"] == "annotation" for f in doc["features"])
        assert len(read_annotations(path)) == len(slide.annotations)


def test_project_reads_with_our_project_reader(project):
    qp = QuPathProject(project, use_paquo=False)
    entries = list(qp)
    assert [e.entry_id for e in entries] == [1, 2]
    assert all(e.exists for e in entries)
    annotations = qp.annotations(1)
    assert {a.class_name for a in annotations} >= {CLASS_VESSEL, CLASS_INVASIVE, CLASS_TUMOR}


def test_project_versions_and_overwrite(tmp_path):
    slide = build_demo_slide(tmp_path / "s.ome.tif", width=1024, height=768, seed=2)
    p6 = build_demo_project(tmp_path / "p6", slide=slide, qupath_version="0.6.0")
    assert json.loads(p6.read_text())["images"][0]["tags"] == []
    rc3 = build_demo_project(tmp_path / "rc3", slide=slide, qupath_version="0.6.0-rc3")
    assert "tags" not in json.loads(rc3.read_text())["images"][0]
    with pytest.raises(InputError, match="already exists"):
        build_demo_project(tmp_path / "p6", slide=slide)
    again = build_demo_project(tmp_path / "p6", slide=[slide, slide], overwrite=True)
    assert [e["entryID"] for e in json.loads(again.read_text())["images"]] == [1, 2]


def test_source_image_is_real_he():
    image = he_source_image()
    assert image.shape == (1000, 1000, 3) and image.dtype == np.uint8
    assert tissue_mask(image).mean() > 0.85
    image[:] = 0  # a copy: the cached source is untouched
    assert he_source_image().any()


def test_demo_background_has_no_mirror_axis():
    """The background is quilted from turned real patches: no column band is the mirror
    image of its neighbour (a mirror-tiled background has such an axis every 1000 px)."""
    from histosynth.integration.demo.data import _quilted_background

    image = _quilted_background(2600, 600, np.random.default_rng(3)).astype(np.int16)
    band = 24
    differences = [
        np.abs(image[:, x - band : x] - image[:, x : x + band][:, ::-1]).mean()
        for x in range(band, image.shape[1] - band, 2)
    ]
    assert min(differences) > 8  # a mirror axis would give ~0
    assert image.shape == (600, 2600, 3)
