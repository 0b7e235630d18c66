"""TIAToolbox SQLiteStore <-> Annotation, with the real TIAToolbox store (no mocks)."""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box
from tiatoolbox.annotation import Annotation as StoreAnnotation
from tiatoolbox.annotation import SQLiteStore

from histosynth.integration.annotations import Annotation
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import write_annotations
from histosynth.integration.stores import (
    CompatSQLiteStore,
    annotations_to_store,
    has_load_extension,
    open_store,
    save_store,
    sqlite_compile_options,
    store_to_annotations,
    tiatoolbox_sqlite_compat,
)

RING = [(0, 0), (40, 0), (40, 30), (0, 30)]
HOLE = [(10, 10), (20, 10), (20, 20), (10, 20)]


def vessels() -> list[Annotation]:
    return [
        Annotation(
            geometry=Polygon(RING, [HOLE]),
            class_name="Vessel: Invasive",
            color=(200, 0, 0),
            name="v1",
            measurements={"Area µm^2": 812.5, "Count": 3},
            properties={"synthetic": True, "run": "r1", "source_entry_id": "3"},
        ),
        Annotation(
            geometry=MultiPolygon([box(100, 100, 120, 130), box(150.25, 90.5, 160.75, 99.0)]),
            class_name="Vessel",
            color=(0, 0, 255),
        ),
        Annotation(geometry=box(300, 300, 310, 310), class_name="Tumor", color=(200, 0, 0)),
        Annotation(geometry=box(400, 0, 410, 5), class_name=None),
    ]


def assert_same(read: list[Annotation], written: list[Annotation]) -> None:
    assert len(read) == len(written)
    for got, want in zip(read, written, strict=True):
        assert got.geometry.equals_exact(want.geometry, 0), (got.geometry, want.geometry)
        assert got.geometry.geom_type == want.geometry.geom_type
        assert (got.class_name, got.color, got.id, got.name, got.object_type) == (
            want.class_name,
            want.color,
            want.id,
            want.name,
            want.object_type,
        )
        assert got.measurements == {k: float(v) for k, v in want.measurements.items()}
        assert got.properties == want.properties


# --------------------------------------------------------------------------- the trap


@pytest.mark.skipif(has_load_extension(), reason="this Python's sqlite3 can load extensions")
def test_plain_sqlitestore_hits_the_trap_here() -> None:
    """Documents why open_store exists: TIAToolbox's own constructor fails on this build."""
    with pytest.raises(AttributeError, match="enable_load_extension"):
        SQLiteStore.compile_options()


def test_open_store_works_on_this_build(tmp_path: Path) -> None:
    store = open_store()
    assert isinstance(store, SQLiteStore) and len(store) == 0
    key = store.append(StoreAnnotation(box(0, 0, 2, 2), {"type": "Vessel"}))
    assert store[key].properties["type"] == "Vessel"
    path = tmp_path / "sub" / "a.db"
    on_disk = open_store(path)
    on_disk.append(StoreAnnotation(box(0, 0, 2, 2), {"type": "Vessel"}), key="k1")
    on_disk.close()
    again = open_store(path, create=False)
    assert list(again.keys()) == ["k1"]
    again.close()
    assert isinstance(CompatSQLiteStore.open(path), CompatSQLiteStore)


def test_compile_options_match_a_build_with_load_extension(monkeypatch) -> None:
    """Where sqlite3 has enable_load_extension, TIAToolbox's original code path runs; both
    give the same options and both stores work."""

    class LoadableConnection(sqlite3.Connection):
        calls = 0

        def enable_load_extension(self, enabled: bool) -> None:
            LoadableConnection.calls += 1

    monkeypatch.setattr(
        sqlite3, "connect", functools.partial(sqlite3.connect, factory=LoadableConnection)
    )
    theirs = SQLiteStore.compile_options()
    assert LoadableConnection.calls == 1
    assert theirs == sqlite_compile_options()
    assert "ENABLE_RTREE" in theirs
    original = SQLiteStore()  # TIAToolbox's own class, unpatched
    original.append(StoreAnnotation(box(0, 0, 1, 1), {"type": "x"}))
    assert len(original) == 1
    ours = open_store()
    ours.append(StoreAnnotation(box(0, 0, 1, 1), {"type": "x"}))
    assert len(ours) == 1


def test_compat_block_lets_tiatoolbox_build_its_own_stores() -> None:
    before = SQLiteStore.__dict__["compile_options"]
    with tiatoolbox_sqlite_compat(), tiatoolbox_sqlite_compat():  # re-entrant
        store = SQLiteStore()
        store.append(StoreAnnotation(box(0, 0, 1, 1), {"type": "x"}))
        assert len(store) == 1
    assert SQLiteStore.__dict__["compile_options"] is before
    if not has_load_extension():
        with pytest.raises(AttributeError):
            SQLiteStore.compile_options()


# --------------------------------------------------------------------------- round trip


def test_round_trip_keeps_geometry_classes_and_properties() -> None:
    written = vessels()
    store = annotations_to_store(written)
    assert type(store) is CompatSQLiteStore
    assert list(store.keys()) == [a.id for a in written]
    assert_same(store_to_annotations(store), written)


def test_store_properties_follow_tiatoolbox_and_qupath_conventions() -> None:
    first = vessels()[0]
    store = annotations_to_store([first], extra_properties={"run": "ignored", "model": "m1"})
    props = store[first.id].properties
    assert props["type"] == "Vessel: Invasive"  # TIAToolbox's class key
    assert props["classification"] == {"name": "Vessel: Invasive", "color": [200, 0, 0]}
    assert props["objectType"] == "annotation" and props["name"] == "v1"
    assert props["histosynth_id"] == first.id
    assert props["Area µm^2"] == 812.5 and props["Count"] == 3.0  # flattened measurements
    assert props["synthetic"] is True and props["source_entry_id"] == "3"
    assert props["run"] == "r1" and props["model"] == "m1"  # own properties win
    # TIAToolbox's query language sees them
    hits = store.query(where='props["type"] == "Vessel: Invasive"')
    assert list(hits) == [first.id]
    assert list(store.query(where='props["Count"] >= 3')) == [first.id]
    (back,) = store_to_annotations(store)
    assert back.properties == {
        "synthetic": True,
        "run": "r1",
        "source_entry_id": "3",
        "model": "m1",
    }


def test_measurements_named_like_reserved_keys_round_trip() -> None:
    vessel = Annotation(
        geometry=box(0, 0, 3, 3),
        class_name="Vessel",
        color=(1, 2, 3),
        name="n",
        measurements={"type": 1.0, "name": 2.5, "Area": 9.0},
    )
    store = annotations_to_store([vessel])
    props = store[vessel.id].properties
    assert props["type"] == "Vessel" and props["name"] == "n"
    assert props["measurement: type"] == 1.0 and props["Area"] == 9.0
    assert_same(store_to_annotations(store), [vessel])


def test_db_file_is_written_atomically_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "out" / "vessels.db"
    written = vessels()
    store = annotations_to_store(written, path)
    assert len(store) == len(written)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vessels.db"]
    assert_same(store_to_annotations(path), written)
    assert_same(store_to_annotations(str(path)), written)
    # overwriting replaces the whole file
    annotations_to_store(written[:1], path)
    assert len(store_to_annotations(path)) == 1
    reopened = open_store(path, create=False)
    assert reopened[written[0].id].properties["type"] == "Vessel: Invasive"
    reopened.close()
    # save_store copies any store
    assert save_store(store, tmp_path / "copy.db") == tmp_path / "copy.db"
    assert len(store_to_annotations(tmp_path / "copy.db")) == len(written)


def test_a_store_from_tiatoolbox_from_geojson_reads_back(tmp_path: Path) -> None:
    written = vessels()
    geojson = tmp_path / "vessels.geojson"
    write_annotations(geojson, written)
    with tiatoolbox_sqlite_compat():
        store = SQLiteStore.from_geojson(geojson)
    assert isinstance(store, SQLiteStore) and len(store) == len(written)
    read = store_to_annotations(store)
    for got, want in zip(read, written, strict=True):
        assert got.geometry.equals(want.geometry)
        assert got.geometry.geom_type == want.geometry.geom_type
        assert (got.class_name, got.color, got.name) == (want.class_name, want.color, want.name)
        assert got.measurements == {k: float(v) for k, v in want.measurements.items()}
        assert got.object_type == "annotation"
    assert len(read[0].geometry.interiors) == 1
    # our own subclass runs the same TIAToolbox method without the compat block
    assert len(CompatSQLiteStore.from_geojson(geojson)) == len(written)


def test_filter_by_derived_class(tmp_path: Path) -> None:
    store = annotations_to_store(vessels())
    names = [a.class_name for a in store_to_annotations(store, classes=["Vessel"])]
    assert names == ["Vessel: Invasive", "Vessel"]
    names = [a.class_name for a in store_to_annotations(store, classes="Vessel: Invasive")]
    assert names == ["Vessel: Invasive"]
    assert [a.class_name for a in store_to_annotations(store, classes=["Tumor", "Nope"])] == [
        "Tumor"
    ]


def test_tiatoolbox_engine_style_store() -> None:
    """Class label in "type", class index in "class", keys "0", "1" (as TIAToolbox engines
    write them), plus a QuPath 0.6 "type": "annotation" alias and a 0-1 colour."""
    store = open_store()
    store.append_many(
        [
            StoreAnnotation(box(0, 0, 5, 5), {"type": "Vessel", "class": 1, "prob": 0.9}),
            StoreAnnotation(box(5, 5, 9, 9), {"type": 2, "class": 2}),
            StoreAnnotation(
                box(1, 1, 2, 2),
                {
                    "type": "annotation",
                    "classification": {"names": ["Vessel", "Small"], "color": [1.0, 0.5, 0.0]},
                },
            ),
        ],
        ["0", "1", "2"],
    )
    first, second, third = store_to_annotations(store)
    assert first.class_name == "Vessel" and first.color is None
    assert first.properties == {"class": 1, "prob": 0.9, "store_key": "0"}
    assert len(first.id) == 36 and first.measurements == {}
    assert second.class_name == "2"
    assert third.class_name == "Vessel: Small" and third.color == (255, 128, 0)
    assert third.object_type == "annotation"


def test_points_and_lines_are_ignored_unless_selected(caplog) -> None:
    store = open_store()
    store.append_many(
        [
            StoreAnnotation(Point(3, 3), {"type": "Nucleus"}),
            StoreAnnotation(LineString([(0, 0), (5, 5)]), {"type": "Nucleus"}),
            StoreAnnotation(box(0, 0, 4, 4), {"type": "Vessel"}),
        ]
    )
    with caplog.at_level(logging.WARNING):
        (only,) = store_to_annotations(store)
    assert only.class_name == "Vessel"
    assert "1 LineString, 1 Point" in caplog.text
    assert [a.class_name for a in store_to_annotations(store, classes=["Vessel"])] == ["Vessel"]
    with pytest.raises(InputError, match="Point") as info:
        store_to_annotations(store, classes=["Nucleus"])
    assert "Nucleus" in str(info.value)


def test_invalid_geometry_is_repaired() -> None:
    store = open_store()
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    store.append(StoreAnnotation(bowtie, {"type": "Vessel"}))
    (read,) = store_to_annotations(store)
    assert read.geometry.is_valid and read.geometry.area == pytest.approx(50)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as info:
        store_to_annotations(tmp_path / "missing.db")
    assert "missing.db" in str(info.value)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InputError, match=r"junk\.db"):
        store_to_annotations(junk)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE t (x)")
    before = other.read_bytes()
    with pytest.raises(InputError, match="not a TIAToolbox annotation store"):
        store_to_annotations(other)
    assert other.read_bytes() == before
    with pytest.raises(InputError, match="folder"):
        open_store(tmp_path)
    with pytest.raises(InputError, match="Point"):
        annotations_to_store([Annotation(geometry=Point(1, 1))])
    twice = vessels()[0]
    with pytest.raises(InputError, match="id"):
        annotations_to_store([twice, twice])
    assert not (tmp_path / "out.db").exists()


# --------------------------------------------------------------------------- properties

COORD = st.integers(0, 10_000).map(lambda v: v / 4)
NAME = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters=":"), min_size=1, max_size=12
).filter(lambda s: s.strip() == s and s != "")


@st.composite
def annotations(draw) -> Annotation:
    x, y = draw(COORD), draw(COORD)
    w, h = draw(st.integers(4, 200)), draw(st.integers(4, 200))
    outer = box(x, y, x + w, y + h)
    holes = (
        [list(box(x + 1, y + 1, x + w / 2, y + h / 2).exterior.coords)]
        if draw(st.booleans())
        else []
    )
    parts = draw(st.lists(NAME, min_size=0, max_size=3))
    return Annotation(
        geometry=Polygon(outer.exterior.coords, holes),
        class_name=": ".join(parts) or None,
        color=draw(st.tuples(*[st.integers(0, 255)] * 3)) if parts else None,
        name=draw(st.none() | NAME),
        measurements=draw(st.dictionaries(NAME, st.floats(-1e9, 1e9, allow_nan=False), max_size=3)),
        properties=draw(
            st.dictionaries(
                NAME.map(lambda s: "p_" + s),
                st.none() | st.booleans() | NAME | st.integers(),
                max_size=3,
            )
        ),
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(annotations(), max_size=5))
def test_any_annotations_round_trip(written: list[Annotation]) -> None:
    for a in written:  # a measurement name may not shadow a property of the same name
        a.properties = {k: v for k, v in a.properties.items() if k not in a.measurements}
    assert_same(store_to_annotations(annotations_to_store(written)), written)
    assert json.dumps([a.properties for a in written])  # stays JSON
