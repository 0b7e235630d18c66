"""Fuzzing the readers of user files (issue: hostile input): whatever the bytes or the
JSON, the GeoJSON and QuPath project readers end in their result or one InputError —
never another exception, never a hang (each case under a time limit)."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager, suppress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histosynth.integration.errors import InputError
from histosynth.integration.geojson import read_annotations
from histosynth.integration.qupath import QuPathProject

CASES = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=5),
    max_leaves=40,
)
coordinate = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**9),
                       st.text(max_size=3), st.none())
ring = st.lists(st.lists(coordinate, min_size=0, max_size=3), max_size=8)
geometry = st.fixed_dictionaries({
    "type": st.sampled_from(["Polygon", "MultiPolygon", "Point", "LineString",
                             "GeometryCollection", "Nonsense", 3]),
    "coordinates": st.one_of(st.lists(ring, max_size=3), st.lists(st.lists(ring, max_size=2),
                                                                   max_size=2), json_values),
})
feature = st.fixed_dictionaries(
    {"type": st.sampled_from(["Feature", "feature", "Thing"]), "geometry": geometry},
    optional={"properties": st.one_of(
        json_values,
        st.fixed_dictionaries({}, optional={
            "classification": st.one_of(json_values, st.fixed_dictionaries(
                {"name": st.one_of(st.text(max_size=20), json_values)},
                optional={"color": json_values})),
            "name": st.one_of(st.text(max_size=20), json_values),
            "objectType": st.one_of(st.sampled_from(["annotation", "detection"]), json_values),
            "measurements": json_values,
        })),
        "id": json_values},
)
documents = st.one_of(
    json_values,
    st.lists(feature, max_size=4),
    st.fixed_dictionaries({"type": st.just("FeatureCollection"),
                           "features": st.one_of(st.lists(feature, max_size=4), json_values)}),
)


@contextmanager
def time_limit(seconds: int):
    def stop(*_):
        raise TimeoutError(f"a reader took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@CASES
@given(doc=documents)
def test_geojson_reader_gives_annotations_or_one_input_error(tmp_path, doc):
    path = tmp_path / "fuzz.geojson"
    path.write_text(json.dumps(doc, allow_nan=True))
    with time_limit(10):
        try:
            annotations = read_annotations(path)
        except InputError as exc:
            assert "\n" not in str(exc)
            return
    for annotation in annotations:
        assert annotation.geometry.geom_type in ("Polygon", "MultiPolygon")
        assert annotation.geometry.is_valid


@CASES
@given(data=st.binary(max_size=300))
def test_geojson_reader_survives_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "bytes.geojson"
    path.write_bytes(data)
    with time_limit(10), suppress(InputError):
        read_annotations(path)


project_docs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"version": st.one_of(st.just("0.5.1"), json_values),
         "images": st.one_of(st.lists(st.one_of(json_values, st.fixed_dictionaries(
             {"entryID": json_values, "serverBuilder": json_values},
             optional={"imageName": json_values, "metadata": json_values,
                       "randomizedName": json_values})), max_size=3), json_values)},
        optional={"lastID": json_values, "createTimestamp": json_values,
                  "uri": json_values},
    ),
)


@CASES
@given(doc=project_docs)
def test_project_reader_gives_a_project_or_one_input_error(tmp_path, doc):
    folder = tmp_path / "p"
    folder.mkdir(exist_ok=True)
    (folder / "project.qpproj").write_text(json.dumps(doc, allow_nan=True))
    with time_limit(10):
        try:
            project = QuPathProject(folder, use_paquo=False)
        except InputError as exc:
            assert "\n" not in str(exc)
            return
    assert isinstance(project.entries, list)


@pytest.mark.parametrize("depth", [50, 5000])
def test_deep_but_valid_nesting_in_properties_is_handled(tmp_path, depth):
    nested: object = 1
    for _ in range(depth):
        nested = [nested]
    doc = {"type": "Feature", "geometry": {"type": "Polygon",
           "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
           "properties": {"deep": nested, "classification": {"name": "Vessel"}}}
    path = tmp_path / "deep.geojson"
    path.write_text(json.dumps(doc) if depth < 900 else
                    '{"type": "Feature", "properties": {"deep": ' + "[" * depth + "]" * depth
                    + '}, "geometry": {"type": "Polygon", "coordinates": '
                    "[[[0, 0], [4, 0], [4, 4], [0, 0]]]}}")
    with time_limit(10):
        try:
            (annotation,) = read_annotations(path)
        except InputError as exc:
            assert depth > 900 and "nested too deeply" in str(exc)
        else:
            assert depth < 900 and annotation.class_name == "Vessel"
