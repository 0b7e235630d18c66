"""Property tests of the GeoJSON reader and writer (hypothesis).

1. Any JSON value, random bytes, and QuPath documents with random parts replaced or
   removed: ``read_annotations`` returns a list of Annotations or raises InputError —
   never anything else.
2. Random polygons (with holes, multi-part) survive write → read within 0.01 px, with
   their class, colour and id; also through an offset/scale transform.
"""

from __future__ import annotations

import copy
import json
import math
import uuid

import shapely
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon

from histosynth.integration.annotations import Annotation
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import (
    default_color,
    read_annotations,
    to_feature_collection,
    write_annotations,
)

# A QuPath 0.4+ FeatureCollection plus the older flavours, as the mutation seed.
SEED_DOCUMENT = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "id": "6e6f0a3c-24c1-4a7e-9d2b-0f5b2c3e9a11",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
                    [[20, 20], [40, 20], [40, 40], [20, 40], [20, 20]],
                ],
            },
            "properties": {
                "objectType": "annotation",
                "name": "v1",
                "classification": {"name": "Vessel", "color": [200, 0, 0]},
                "measurements": {"a": 1.5},
                "metadata": {"k": "v"},
            },
        },
        {
            "type": "Feature",
            "id": "PathAnnotationObject",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]],
                    [[[20, 20], [30, 20], [30, 30], [20, 20]]],
                ],
            },
            "properties": {
                "classification": {
                    "parentClass": {"name": "Vessel", "colorRGB": -3670016},
                    "name": "Invasive",
                    "colorRGB": -16744448,
                },
                "measurements": [{"name": "b", "value": 2}],
            },
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "GeometryCollection",
                "geometries": [
                    {"type": "Point", "coordinates": [1, 2]},
                    {"type": "Polygon", "coordinates": [[[0, 0], [5, 5], [5, 0], [0, 5], [0, 0]]]},
                ],
            },
            "properties": {
                "object_type": "detection",
                "classification": {"names": ["Vessel", "Small"], "color": [1, 2, 3]},
                "childObjects": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1]]]},
                        "properties": {"type": "Vessel"},
                    }
                ],
            },
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [1, 2]},
            "properties": {"classification": "Marker"},
        },
    ],
}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "Feature",
            "FeatureCollection",
            "Polygon",
            "MultiPolygon",
            "GeometryCollection",
            "Point",
            "LineString",
            "annotation",
            "PathAnnotationObject",
            "Vessel",
            "NaN",
            "6e6f0a3c-24c1-4a7e-9d2b-0f5b2c3e9a11",
        ]
    )
)
json_keys = st.sampled_from(
    [
        "type",
        "features",
        "geometry",
        "geometries",
        "coordinates",
        "properties",
        "id",
        "classification",
        "name",
        "names",
        "color",
        "colorRGB",
        "parentClass",
        "measurements",
        "objectType",
        "object_type",
        "value",
        "childObjects",
        "class",
        "label",
        "plane",
    ]
) | st.text(max_size=6)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(json_keys, children, max_size=5)
    ),
    max_leaves=30,
)

COMMON = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_reader(doc) -> None:
    """The one property of the reader: a list of Annotations, or an InputError."""
    try:
        result = read_annotations(doc, origin="fuzz.geojson")
    except InputError as err:
        assert str(err).startswith("fuzz.geojson")
        return
    assert isinstance(result, list)
    for ann in result:
        assert isinstance(ann, Annotation)
        assert ann.geometry.geom_type in ("Polygon", "MultiPolygon")
        assert ann.geometry.is_valid and not ann.geometry.is_empty
        assert str(uuid.UUID(ann.id)) == ann.id
        assert all(math.isfinite(v) for v in ann.measurements.values())


@COMMON
@given(json_values)
def test_random_json_gives_annotations_or_input_error(doc):
    check_reader(doc)


def _paths(node, prefix=()):
    """Every (container path) in a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


ALL_PATHS = list(_paths(SEED_DOCUMENT))[1:]


@st.composite
def mutated_documents(draw):
    doc = copy.deepcopy(SEED_DOCUMENT)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if not isinstance(parent, (dict, list)):
                continue
            old = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced it
        action = draw(st.sampled_from(["replace", "delete", "scalar", "wrap"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "scalar":
            parent[path[-1]] = draw(json_scalars)
        else:
            parent[path[-1]] = [old]
    return doc


@COMMON
@given(mutated_documents())
def test_mutated_qupath_documents_give_annotations_or_input_error(doc):
    check_reader(doc)


@COMMON
@given(mutated_documents(), st.sampled_from([None, ["Vessel"], ["Vessel: Invasive"]]))
def test_mutated_documents_with_class_filter(doc, classes):
    try:
        result = read_annotations(doc, classes=classes, origin="fuzz.geojson")
    except InputError:
        return
    if classes:
        assert all(a.class_name and a.class_name.startswith(classes[0]) for a in result)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_in_a_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.geojson"
    path.write_bytes(data)
    try:
        result = read_annotations(path)
    except InputError as err:
        assert err.path == str(path)
        return
    assert isinstance(result, list)


# --------------------------------------------------------------------------- round trip

coordinate = st.floats(min_value=0, max_value=50_000, allow_nan=False, allow_infinity=False)


@st.composite
def polygons(draw):
    """A convex polygon of 3–12 random points, optionally with a hole."""
    points = draw(st.lists(st.tuples(coordinate, coordinate), min_size=3, max_size=12))
    hull = shapely.MultiPoint(points).convex_hull
    assume(isinstance(hull, Polygon) and hull.area > 50 and hull.length < 1e6)
    # keep vertices well apart from each other compared with the 0.01 px grid
    assume(hull.minimum_clearance > 0.5)
    if draw(st.booleans()):
        hole = affinity.scale(hull, 0.3, 0.3, origin=hull.centroid)
        assume(hole.minimum_clearance > 0.5)
        hull = Polygon(hull.exterior.coords, [hole.exterior.coords])
    return hull


@st.composite
def geometries(draw):
    first = draw(polygons())
    if not draw(st.booleans()):
        return first
    second = affinity.translate(draw(polygons()), first.bounds[2] + 10, 0)
    return MultiPolygon([first, second])


class_names_st = st.sampled_from([None, "Vessel", "Vessel: Invasive", "Tumor", "Ignore*"])
colors = st.none() | st.tuples(*[st.integers(0, 255)] * 3)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(geometries(), class_names_st, colors)
def test_round_trip_random_polygons(tmp_path_factory, geom, class_name, color):
    ann = Annotation(geom, class_name=class_name, color=color if class_name else None)
    path = tmp_path_factory.mktemp("rt") / "rt.geojson"
    write_annotations(path, [ann])
    (back,) = read_annotations(path)
    assert back.id == ann.id
    assert back.class_name == class_name
    if class_name:
        assert back.color == (color or default_color(class_name))
    else:
        assert back.color is None
    assert back.geometry.geom_type == geom.geom_type
    assert shapely.hausdorff_distance(geom, back.geometry) <= 0.01
    assert abs(back.geometry.area - geom.area) <= 0.01 * geom.length + 1e-6


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    polygons(),
    st.tuples(coordinate, coordinate),
    st.sampled_from([0.25, 0.5, 1.0, 2.0]),
)
def test_round_trip_through_offset_and_scale(geom, offset, scale):
    doc = json.loads(
        json.dumps(to_feature_collection([Annotation(geom, "Vessel")], offset=offset, scale=scale))
    )
    (back,) = read_annotations(doc)
    restored = affinity.affine_transform(
        back.geometry, [1 / scale, 0, 0, 1 / scale, offset[0], offset[1]]
    )
    assert shapely.hausdorff_distance(geom, restored) <= 0.01 / scale
