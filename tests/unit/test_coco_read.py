"""The COCO reader (``histosynth.integration.coco_read``) against pycocotools.

1. A COCO file made with pycocotools' own encoder (RLE) and polygons reads back: every
   instance's mask equals pycocotools' ``annToMask``, the images and classes are kept,
   and synthesize's slides carry the instances as annotations in image px.
2. Hostile COCO: one ``InputError`` line naming the file and the item, each kind.
3. Property tests (hypothesis): generated COCO documents read back equal to what
   pycocotools decodes; mutated ones are read or refused with an ``InputError`` — never
   anything else.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiLineString, Point

from histosynth.integration.coco_read import (
    coco_mpp,
    coco_slide_sources,
    image_mask,
    instance_mask,
    read_coco,
    read_coco_image,
)
from histosynth.integration.errors import InputError
from histosynth.integration.masks import rasterize

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as coco_mask  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

SIZES = ((12, 8), (16, 16), (20, 9))  # (width, height) px of the image files


def _write_images(folder: Path) -> dict[tuple[int, int], str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    rng = np.random.default_rng(0)
    for width, height in SIZES:
        name = f"tile-{width}x{height}.png"
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / name), pixels)
        names[(width, height)] = name
    return names


def _rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def dataset(tmp_path):
    """A COCO file of two images: an RLE instance with a hole (pycocotools' encoder), a
    polygon instance, two categories, info.mpp."""
    names = _write_images(tmp_path / "images")
    ring = np.zeros((16, 16), np.uint8)
    ring[2:12, 3:13] = 1
    ring[5:8, 6:9] = 0  # a hole: RLE keeps it
    document = {
        "info": {"mpp": 0.5, "description": "test"},
        "images": [
            {"id": 7, "file_name": names[(16, 16)], "width": 16, "height": 16,
             "histosynth": {"id": "row-a", "source_image": "/slides/s1.svs",
                            "has_mask": True, "mpp": 0.5, "qc": None}},
            {"id": 9, "file_name": names[(20, 9)], "width": 20, "height": 9},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 2, "segmentation": _rle(ring),
             "iscrowd": 1},
            {"id": 2, "image_id": 9, "category_id": 1,
             "segmentation": [[1, 1, 10.5, 1, 10.5, 7, 1, 7]], "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 2,
             "segmentation": [[12, 2, 18, 2, 15, 8]], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "Vessel"}, {"id": 2, "name": "Vessel: Invasive"}],
    }
    file = tmp_path / "vessels.json"
    file.write_text(json.dumps(document))
    return file, tmp_path / "images", document


def _with_area(document: dict) -> dict:
    """pycocotools' COCO() wants area on every annotation (only for its own filters)."""
    out = copy.deepcopy(document)
    for a in out["annotations"]:
        a.setdefault("area", 1.0)
        a.setdefault("bbox", [0, 0, 1, 1])
    return out


def _only_on_the_edge(ours: np.ndarray, theirs: np.ndarray, rings: list) -> bool:
    """Whether the masks differ only in pixels whose centre lies within 1 px of a ring's
    edge (the two rasterisers round edge pixels differently)."""
    edges = MultiLineString([[*np.asarray(r, float).reshape(-1, 2).tolist(), r[:2]]
                             for r in rings])
    rows, cols = np.nonzero(np.logical_xor(ours, theirs))
    return all(edges.distance(Point(c + 0.5, r + 0.5)) <= 1.0
               for r, c in zip(rows, cols, strict=True))


def test_a_pycocotools_file_reads_back_with_its_masks_classes_and_provenance(dataset, tmp_path):
    file, images, document = dataset
    data = read_coco(file, images)
    assert [i.id for i in data.images] == [7, 9]
    assert data.categories == {1: "Vessel", 2: "Vessel: Invasive"} and data.mpp == 0.5
    first, second = data.images
    assert first.tile_id == "row-a" and first.source_image == "/slides/s1.svs"
    assert first.attributes == {"id": "row-a", "source_image": "/slides/s1.svs",
                                "has_mask": "true", "mpp": "0.5"}  # histosynth's export
    assert second.tile_id == "tile-20x9" and second.source_image == str(images / "tile-20x9.png")
    assert [(n.id, n.class_name) for n in second.instances] == [(2, "Vessel"),
                                                               (3, "Vessel: Invasive")]
    # the reference library's own decoding of every annotation
    (tmp_path / "ref.json").write_text(json.dumps(_with_area(document)))
    reference = COCO(str(tmp_path / "ref.json"))
    for image in data.images:
        union = np.zeros((image.height, image.width), bool)
        for instance in image.instances:
            ours = instance_mask(instance, image.height, image.width)
            theirs = reference.annToMask(reference.anns[instance.id])
            assert ours.dtype == np.uint8 and ours.shape == theirs.shape
            if isinstance(instance.segmentation, dict):
                assert (ours == theirs).all()  # RLE: exact
            else:  # polygons: the two rasterisers agree up to pixels on an edge
                assert _only_on_the_edge(ours, theirs, instance.segmentation)
            union |= ours > 0
        assert (image_mask(image) == union * 255).all()
    assert image_mask(second, ["Vessel: Invasive"]).sum() < image_mask(second).sum()
    assert (image_mask(second, ["Vessel"]) == image_mask(second)).all()  # 'Vessel' ⊇ 'Vessel: …'
    pixels = read_coco_image(first)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8


def test_the_slides_of_synthesize_carry_the_instances_in_image_px(dataset):
    file, images, _ = dataset
    sources = coco_slide_sources(read_coco(file, images))
    assert [s.slide_path.name for s in sources] == ["tile-16x16.png", "tile-20x9.png"]
    ring = sources[0].annotations[0]
    assert ring.class_name == "Vessel: Invasive" and ring.id == "coco-1"
    assert len(ring.geometry.interiors) == 1  # the RLE's hole is a hole of the polygon
    data = read_coco(file, images)
    back = rasterize([ring.geometry], origin=(0, 0), scale=1, shape=(16, 16))
    assert (back == image_mask(data.images[0])).all()  # the exact outline of its pixels
    box = sources[1].annotations[0].geometry
    assert box.bounds == (1.0, 1.0, 10.5, 7.0)  # polygons as given


def test_the_mpp_is_the_option_else_info(dataset, tmp_path):
    file, images, document = dataset
    data = read_coco(file, images)
    assert coco_mpp(data, None) == 0.5 and coco_mpp(data, 0.25) == 0.25
    del document["info"]
    file.write_text(json.dumps(document))
    with pytest.raises(InputError, match=r"vessels\.json: info\.mpp: .*--slide-mpp"):
        coco_mpp(read_coco(file, images), None, "--slide-mpp")


def _mutations():
    """name → (change to the document, what the one line says)."""

    def set_(path, value):
        def change(doc):
            target = doc
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        return change

    def dup(key, k):
        return lambda doc: doc[key].append(copy.deepcopy(doc[key][k]))

    return {
        "missing image": (set_(["images", 1, "file_name"], "gone.png"),
                          r"image 9: image file not found"),
        "outside the folder": (set_(["images", 1, "file_name"], "../vessels.json"),
                               r"image 9: file_name .* outside the images folder"),
        "negative coordinate": (set_(["annotations", 1, "segmentation"],
                                     [[1, -2, 10, 1, 10, 7]]),
                                r"annotation 2: polygon 0 holds a negative coordinate"),
        "NaN coordinate": (set_(["annotations", 1, "segmentation"], [[1, math.nan, 10, 1, 5, 7]]),
                           r"annotation 2: polygon 0 holds nan, not a finite number"),
        "inf coordinate": (set_(["annotations", 2, "segmentation"],
                                [[1, 1, math.inf, 1, 5, 7]]),
                           r"annotation 3: polygon 0 holds inf"),
        "unknown category": (set_(["annotations", 0, "category_id"], 99),
                             r"annotation 1: unknown category id 99"),
        "unknown image": (set_(["annotations", 0, "image_id"], 8),
                          r"annotation 1: unknown image id 8"),
        "duplicated image id": (dup("images", 0), r"image 7: duplicated image id"),
        "duplicated annotation id": (dup("annotations", 2), r"annotation 3: duplicated"),
        "duplicated category id": (dup("categories", 1), r"category 2: duplicated"),
        "neither polygons nor RLE": (set_(["annotations", 0, "segmentation"], {"points": []}),
                                     r"annotation 1: segmentation is neither polygons nor RLE"),
        "a string segmentation": (set_(["annotations", 0, "segmentation"], "x"),
                                  r"annotation 1: segmentation is neither"),
        "RLE of another size": (set_(["annotations", 0, "segmentation", "size"], [16, 17]),
                                r"annotation 1: RLE size \[16, 17\] is not the image's"),
        "RLE runs that do not add up": (
            set_(["annotations", 0, "segmentation", "counts"], [10, 5]),
            r"annotation 1: invalid RLE: RLE counts add up to 15 pixels"),
        "RLE string garbage": (set_(["annotations", 0, "segmentation", "counts"], "\x7f\x7f"),
                               r"annotation 1: invalid RLE"),
        "width disagrees with the file": (set_(["images", 0, "width"], 17),
                                          r"image 7: the file says 17×16 px, the image .* 16×16"),
        "height not a number": (set_(["images", 0, "height"], "16"),
                                r"image 7: height must be an integer"),
        "a short polygon": (set_(["annotations", 1, "segmentation"], [[1, 1, 2, 2]]),
                            r"annotation 2: polygon 0 must be a list of at least 3"),
        "an id that is not an integer": (set_(["annotations", 1, "id"], "2"),
                                         r"annotations\[1\]: id must be an integer"),
        "info.mpp not positive": (set_(["info", "mpp"], -1), r"info\.mpp: must be a number"),
        "images not a list": (set_(["images"], {"a": 1}), r"images: 'images' must be a list"),
        "no images": (set_(["images"], []), r"images: holds no image"),
        "a category without a name": (set_(["categories", 0, "name"], ""),
                                      r"category 1: name must be a non-empty string"),
    }


MUTATIONS = _mutations()


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_hostile_coco_is_one_line_naming_the_file_and_the_item(dataset, name):
    file, images, document = dataset
    change, message = MUTATIONS[name]
    change(document)
    file.write_text(json.dumps(document))  # NaN / inf as JSON's NaN, Infinity
    with pytest.raises(InputError) as err:
        read_coco(file, images)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{file}: ")
    assert __import__("re").search(message, line), line


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"not valid JSON"),
        (b"{\"images\": [", r"not valid JSON"),
        (b"[1, 2]", r"not a COCO object \(a JSON list\)"),
        (b"\"images\"", r"not a COCO object"),
        (b"[" * 100_000, r"not valid JSON|nested too deeply"),
    ],
)
def test_not_json_or_not_an_object_is_one_line(tmp_path, content, message):
    (tmp_path / "images").mkdir()
    file = tmp_path / "c.json"
    file.write_bytes(content)
    with pytest.raises(InputError, match=message) as err:
        read_coco(file, tmp_path / "images")
    assert str(err.value).startswith(str(file))


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path):
    (tmp_path / "images").mkdir()
    big = tmp_path / "huge.json"
    with open(big, "wb") as handle:  # a sparse 1 GiB file: no disk, no memory
        handle.truncate(2**30)
    assert os.stat(big).st_size == 2**30
    with pytest.raises(InputError, match=r"huge\.json: is 1024 MiB, more than the 256 MiB"):
        read_coco(big, tmp_path / "images")


def test_a_missing_file_or_images_folder_is_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match=r"nothing\.json: file not found"):
        read_coco(tmp_path / "nothing.json", tmp_path / "images")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(InputError, match=r"not a folder"):
        read_coco(tmp_path / "c.json", tmp_path / "nope")


# --------------------------------------------------------------------------- properties



@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco-images")
    return folder, _write_images(folder)


@st.composite
def coco_documents(draw, names):
    """A valid COCO document over the image files ``names`` ((w, h) → file name), with
    random RLE and polygon instances, and the masks pycocotools makes of them."""
    categories = draw(st.lists(st.sampled_from(["Vessel", "Vessel: Invasive", "Artery", "x y"]),
                               min_size=1, max_size=3, unique=True))
    category_ids = draw(st.lists(st.integers(0, 10**6), min_size=len(categories),
                                 max_size=len(categories), unique=True))
    image_sizes = draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3))
    image_ids = draw(st.lists(st.integers(-(10**9), 10**9), min_size=len(image_sizes),
                              max_size=len(image_sizes), unique=True))
    document = {
        "images": [{"id": i, "file_name": names[s], "width": s[0], "height": s[1]}
                   for i, s in zip(image_ids, image_sizes, strict=True)],
        "annotations": [],
        "categories": [{"id": c, "name": n} for c, n in zip(category_ids, categories,
                                                             strict=True)],
    }
    expected = {}
    count = draw(st.integers(0, 5))
    annotation_ids = draw(st.lists(st.integers(0, 10**9), min_size=count, max_size=count,
                                   unique=True))
    for annotation_id in annotation_ids:
        k = draw(st.integers(0, len(image_ids) - 1))
        width, height = image_sizes[k]
        if draw(st.booleans()):
            bits = draw(st.lists(st.booleans(), min_size=width * height,
                                 max_size=width * height))
            mask = np.array(bits, np.uint8).reshape(height, width)
            rle = coco_mask.encode(np.asfortranarray(mask))
            compressed = draw(st.booleans())
            counts = rle["counts"].decode() if compressed else _uncompressed(mask)
            segmentation = {"size": [height, width], "counts": counts}
        else:
            coords = st.floats(0, max(width, height) + 2, allow_nan=False)
            rings = draw(st.lists(st.lists(coords, min_size=6, max_size=12).filter(
                lambda r: len(r) % 2 == 0), min_size=1, max_size=2))
            segmentation = rings
            mask = None
        document["annotations"].append({
            "id": annotation_id, "image_id": image_ids[k],
            "category_id": draw(st.sampled_from(category_ids)), "segmentation": segmentation,
        })
        expected[annotation_id] = mask
    return document, expected


def _uncompressed(mask: np.ndarray) -> list[int]:
    flat = mask.ravel(order="F")
    runs, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            runs.append(run)
            value, run = v, 1
    runs.append(run)
    return runs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_generated_coco_reads_back_as_pycocotools_decodes_it(image_folder, tmp_path_factory,
                                                              data):
    folder, names = image_folder
    document, expected = data.draw(coco_documents(names))
    file = tmp_path_factory.mktemp("doc") / "c.json"
    file.write_text(json.dumps(document))
    coco = read_coco(file, folder)
    assert [i.id for i in coco.images] == [i["id"] for i in document["images"]]
    assert len({i.tile_id for i in coco.images}) == len(coco.images)
    instances = {n.id: (n, image) for image in coco.images for n in image.instances}
    assert sorted(instances) == sorted(expected)
    names_of = {c["id"]: c["name"] for c in document["categories"]}
    for annotation in document["annotations"]:
        instance, image = instances[annotation["id"]]
        assert image.id == annotation["image_id"]
        assert instance.class_name == names_of[annotation["category_id"]]
        ours = instance_mask(instance, image.height, image.width)
        if expected[annotation["id"]] is not None:
            assert (ours == expected[annotation["id"]]).all()
        else:  # polygons: pycocotools' rasteriser, up to pixels on an edge
            rles = coco_mask.frPyObjects(annotation["segmentation"], image.height, image.width)
            theirs = coco_mask.decode(coco_mask.merge(rles))
            assert ours.shape == theirs.shape
            assert _only_on_the_edge(ours, theirs, annotation["segmentation"])
    assert len(coco_slide_sources(coco)) == len(coco.images)


def _mutate(value, draw):
    """``value`` with one part replaced by a random JSON value, or removed."""
    junk = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                     max_size=3),
        max_leaves=6,
    )
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        if draw(st.booleans()):
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _mutate(value[key], draw)}
    if isinstance(value, list) and value and draw(st.booleans()):
        k = draw(st.integers(0, len(value) - 1))
        return [*value[:k], _mutate(value[k], draw), *value[k + 1:]]
    return draw(junk)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_coco_is_read_or_refused_with_one_line(image_folder, tmp_path_factory, data):
    folder, names = image_folder
    document, _ = data.draw(coco_documents(names))
    mutated = _mutate(document, data.draw)
    file = tmp_path_factory.mktemp("doc") / "c.json"
    file.write_text(json.dumps(mutated))
    try:
        coco = read_coco(file, folder)
    except InputError as err:
        assert "\n" not in str(err) and str(err).startswith(str(file))
        return
    for image in coco.images:  # what was accepted decodes
        assert image_mask(image).shape == (image.height, image.width)
    coco_slide_sources(coco)
