"""GeoJSON reading (every QuPath flavour, plain GeoJSON) and QuPath-importable writing.

The sample documents are written by hand exactly as each QuPath version writes them
(``PathObjectTypeAdapters`` 0.2.3 / 0.3.2, ``QuPathTypeAdapters`` 0.4.4 / 0.7.0).
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import uuid
from pathlib import Path

import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

from histosynth.integration.annotations import Annotation, of_classes
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import (
    argb_to_rgb,
    class_names,
    default_color,
    read_annotations,
    rgb_to_argb,
    to_feature_collection,
    write_annotations,
)

# QuPath 0.2.x: a JSON array; the Java class name in "id"; PathClass serialised by Gson
# (name + colorRGB, derived classes nest their parent); measurements as a list.
QUPATH_0_2 = """[
  {
    "type": "Feature",
    "id": "PathAnnotationObject",
    "geometry": {
      "type": "Polygon",
      "coordinates": [
        [
          [1000, 2000],
          [1100, 2000],
          [1100, 2100],
          [1000, 2100],
          [1000, 2000]
        ]
      ]
    },
    "properties": {
      "classification": {
        "name": "Vessel",
        "colorRGB": -3670016
      },
      "isLocked": false,
      "measurements": [
        {
          "name": "Area px^2",
          "value": 10000.0
        },
        {
          "name": "Mean OD",
          "value": "NaN"
        }
      ]
    }
  },
  {
    "type": "Feature",
    "id": "PathAnnotationObject",
    "geometry": {
      "type": "Polygon",
      "coordinates": [
        [
          [3000, 3000],
          [3050, 3000],
          [3050, 3050],
          [3000, 3050],
          [3000, 3000]
        ]
      ]
    },
    "properties": {
      "name": "invasive 1",
      "color": [255, 0, 0],
      "classification": {
        "parentClass": {
          "name": "Vessel",
          "colorRGB": -3670016
        },
        "name": "Invasive",
        "colorRGB": -16744448
      },
      "isLocked": true,
      "measurements": []
    }
  },
  {
    "type": "Feature",
    "id": "PathDetectionObject",
    "geometry": {
      "type": "Polygon",
      "coordinates": [
        [
          [10, 10],
          [20, 10],
          [20, 20],
          [10, 10]
        ]
      ]
    },
    "properties": {
      "classification": {
        "name": "Tumor",
        "colorRGB": -3670016
      },
      "isLocked": false,
      "measurements": []
    }
  }
]"""

# QuPath 0.3.x: no id, "object_type", classification still {name, colorRGB}.
QUPATH_0_3 = """[
  {
    "type": "Feature",
    "geometry": {
      "type": "Polygon",
      "coordinates": [
        [
          [500.5, 600.25],
          [700, 600.25],
          [700, 800],
          [500.5, 800],
          [500.5, 600.25]
        ]
      ]
    },
    "properties": {
      "object_type": "annotation",
      "classification": {
        "name": "Vessel",
        "colorRGB": -16711936
      },
      "isLocked": false,
      "measurements": [
        {
          "name": "Lumen area",
          "value": 1234.5
        }
      ]
    }
  }
]"""

# QuPath 0.4.x, exportObjectsToGeoJson(..., "FEATURE_COLLECTION").
QUPATH_0_4 = """{
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "id": "6e6f0a3c-24c1-4a7e-9d2b-0f5b2c3e9a11",
      "geometry": {
        "type": "Polygon",
        "coordinates": [
          [
            [0, 0],
            [100, 0],
            [100, 100],
            [0, 100],
            [0, 0]
          ],
          [
            [20, 20],
            [40, 20],
            [40, 40],
            [20, 40],
            [20, 20]
          ],
          [
            [60, 60],
            [70, 60],
            [70, 70],
            [60, 70],
            [60, 60]
          ]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "name": "vessel with lumen",
        "classification": {
          "name": "Vessel",
          "color": [200, 0, 0]
        },
        "isLocked": true,
        "measurements": {
          "Wall thickness": 12.5,
          "Bad": "NaN",
          "Inf": "Infinity"
        }
      }
    },
    {
      "type": "Feature",
      "id": "0d1f47b2-7c1e-4a53-b86e-54f9a1d2c3e4",
      "geometry": {
        "type": "MultiPolygon",
        "coordinates": [
          [
            [
              [1000, 1000],
              [1010, 1000],
              [1010, 1010],
              [1000, 1010],
              [1000, 1000]
            ]
          ],
          [
            [
              [2000, 2000],
              [2020, 2000],
              [2020, 2020],
              [2000, 2020],
              [2000, 2000]
            ]
          ]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "classification": {
          "names": [
            "Vessel",
            "Invasive"
          ],
          "color": [0, 128, 0]
        }
      }
    },
    {
      "type": "Feature",
      "id": "9a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
      "geometry": {
        "type": "Polygon",
        "coordinates": [
          [
            [5000, 5000],
            [6000, 5000],
            [6000, 6000],
            [5000, 6000],
            [5000, 5000]
          ]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "classification": {
          "name": "Stroma",
          "color": [150, 200, 150]
        }
      }
    },
    {
      "type": "Feature",
      "id": "3c2b1a09-8f7e-4d6c-9b5a-4f3e2d1c0b9a",
      "geometry": {
        "type": "Polygon",
        "coordinates": [
          [
            [7000, 7000],
            [7100, 7000],
            [7100, 7100],
            [7000, 7000]
          ]
        ]
      },
      "properties": {
        "objectType": "annotation"
      }
    }
  ]
}"""

# QuPath 0.5 – 0.7: a single Feature (no FEATURE_COLLECTION option), with metadata.
QUPATH_0_7_FEATURE = """{
  "type": "Feature",
  "id": "b7a5d8e2-1f3c-4b6a-9e8d-7c6b5a4f3e2d",
  "geometry": {
    "type": "Polygon",
    "coordinates": [
      [
        [10.5, 20.25],
        [30, 20.25],
        [30, 40],
        [10.5, 40],
        [10.5, 20.25]
      ]
    ]
  },
  "properties": {
    "objectType": "annotation",
    "color": [0, 0, 255],
    "classification": {
      "name": "Vessel",
      "color": [200, 0, 0]
    },
    "metadata": {
      "reviewer": "jd"
    }
  }
}"""

SQUARE = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]


def feature(geometry=None, props=None, fid=None) -> dict:
    """A minimal 0.4+ Feature."""
    f = {
        "type": "Feature",
        "geometry": geometry or {"type": "Polygon", "coordinates": SQUARE},
        "properties": {"objectType": "annotation", **(props or {})},
    }
    if fid is not None:
        f["id"] = fid
    return f


def write(tmp_path: Path, text: str, name: str = "objects.geojson") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- QuPath flavours


def test_qupath_0_2_array_with_legacy_ids(tmp_path):
    anns = read_annotations(write(tmp_path, QUPATH_0_2))
    assert [a.object_type for a in anns] == ["annotation", "annotation", "detection"]
    first, derived, _ = anns
    # the legacy "id" is an object type: every feature gets its own fresh UUID
    assert len({a.id for a in anns}) == 3
    assert all(str(uuid.UUID(a.id)) == a.id for a in anns)
    assert "original_id" not in first.properties
    assert first.class_name == "Vessel"
    assert first.color == (200, 0, 0)  # colorRGB -3670016
    assert first.measurements == {"Area px^2": 10000.0}  # "NaN" skipped
    assert first.geometry.area == pytest.approx(100 * 100)
    assert derived.class_name == "Vessel: Invasive"
    assert derived.color == (0, 128, 0)
    assert derived.name == "invasive 1"
    assert derived.properties["isLocked"] is True
    assert derived.properties["color"] == [255, 0, 0]  # the object's own colour


def test_qupath_0_3_object_type(tmp_path):
    (ann,) = read_annotations(write(tmp_path, QUPATH_0_3))
    assert ann.object_type == "annotation"
    assert ann.class_name == "Vessel"
    assert ann.color == (0, 255, 0)
    assert ann.measurements == {"Lumen area": 1234.5}
    assert ann.geometry.bounds == (500.5, 600.25, 700.0, 800.0)
    assert "object_type" not in ann.properties


def test_qupath_0_4_feature_collection(tmp_path):
    anns = read_annotations(write(tmp_path, QUPATH_0_4))
    assert [a.class_name for a in anns] == ["Vessel", "Vessel: Invasive", "Stroma", None]
    holed, multi, _, unclassified = anns
    assert holed.id == "6e6f0a3c-24c1-4a7e-9d2b-0f5b2c3e9a11"
    assert holed.name == "vessel with lumen"
    assert holed.color == (200, 0, 0)
    assert holed.measurements == {"Wall thickness": 12.5}
    # holes preserved: area = outer - holes
    assert isinstance(holed.geometry, Polygon)
    assert len(holed.geometry.interiors) == 2
    assert holed.geometry.area == pytest.approx(100 * 100 - 20 * 20 - 10 * 10)
    assert isinstance(multi.geometry, MultiPolygon)
    assert multi.geometry.area == pytest.approx(10 * 10 + 20 * 20)
    assert multi.color == (0, 128, 0)
    assert unclassified.color is None
    assert unclassified.geometry.area == pytest.approx(100 * 100 / 2)


def test_qupath_0_7_single_feature_with_metadata(tmp_path):
    (ann,) = read_annotations(write(tmp_path, QUPATH_0_7_FEATURE))
    assert ann.id == "b7a5d8e2-1f3c-4b6a-9e8d-7c6b5a4f3e2d"
    assert ann.class_name == "Vessel"
    assert ann.properties["metadata"] == {"reviewer": "jd"}
    assert ann.properties["color"] == [0, 0, 255]
    assert ann.geometry.area == pytest.approx(19.5 * 19.75)


def test_parsed_objects_and_containers_are_accepted():
    single = feature(props={"classification": {"name": "Vessel", "color": [1, 2, 3]}})
    for doc in (
        single,
        [single],
        {"type": "FeatureCollection", "features": [single]},
        {"type": "Polygon", "coordinates": SQUARE},  # a bare geometry, as QuPath accepts
    ):
        (ann,) = read_annotations(doc)
        assert ann.geometry.area == pytest.approx(100)
    assert read_annotations({"type": "FeatureCollection", "features": []}) == []


def test_gzipped_file(tmp_path):
    path = tmp_path / "objects.geojson.gz"
    path.write_bytes(gzip.compress(QUPATH_0_4.encode()))
    assert len(read_annotations(path)) == 4


def test_type_alias_of_object_type_and_legacy_tma_spelling():
    anns = read_annotations(
        [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": SQUARE},
                "properties": {"type": "detection", "classification": "Vessel"},
            },
            feature(props={"objectType": "tma_core"}),
            feature(props={"objectType": "somethingNew"}),
        ]
    )
    assert [a.object_type for a in anns] == ["detection", "tmaCore", "annotation"]
    assert anns[0].class_name == "Vessel"
    assert "type" not in anns[0].properties


@pytest.mark.parametrize(
    ("classification", "name", "color"),
    [
        ({"name": "Vessel", "color": [10, 20, 30]}, "Vessel", (10, 20, 30)),
        ({"name": "Vessel", "color": [10, 20, 30, 128]}, "Vessel", (10, 20, 30)),
        ({"names": ["Vessel", "Invasive"], "color": [1, 2, 3]}, "Vessel: Invasive", (1, 2, 3)),
        ({"name": "Vessel", "colorRGB": -3670016}, "Vessel", (200, 0, 0)),
        ({"name": "Vessel", "colorRGB": 0xFF00FF00}, "Vessel", (0, 255, 0)),  # unsigned ARGB
        ({"name": "Vessel", "colorRGB": 0x0000FF}, "Vessel", (0, 0, 255)),  # RGB, no alpha
        ("Vessel", "Vessel", None),
        ("Vessel:Invasive", "Vessel: Invasive", None),
        ({"name": "Vessel: Invasive", "color": [1, 2, 3]}, "Vessel: Invasive", (1, 2, 3)),
        ({"name": "Vessel"}, "Vessel", None),
        ({"name": "Vessel", "color": "red"}, "Vessel", None),  # unusable colour ignored
        ({}, None, None),  # QuPath's null class
        (None, None, None),
    ],
)
def test_classification_forms(classification, name, color):
    (ann,) = read_annotations([feature(props={"classification": classification})])
    assert ann.class_name == name
    assert ann.color == color


def test_bad_classification_is_an_input_error():
    with pytest.raises(InputError, match="classification"):
        read_annotations([feature(props={"classification": 3.5})], origin="x.geojson")
    with pytest.raises(InputError, match="names"):
        read_annotations([feature(props={"classification": {"names": [1, 2]}})])


def test_plain_geojson_class_keys():
    docs = {
        "class": {"class": "Vessel"},
        "label": {"label": "Vessel"},
        "tiatoolbox type": {"type": "Vessel", "prob": 0.93},
        "integer class": {"type": 3},
        "plain classification": {"classification": "Vessel"},
    }
    anns = {
        key: read_annotations(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": SQUARE},
                        "properties": props,
                    }
                ],
            }
        )[0]
        for key, props in docs.items()
    }
    assert anns["class"].class_name == "Vessel"
    assert anns["label"].class_name == "Vessel"
    assert anns["tiatoolbox type"].class_name == "Vessel"
    assert anns["tiatoolbox type"].properties == {"prob": 0.93}
    assert anns["integer class"].class_name == "3"
    assert anns["plain classification"].class_name == "Vessel"
    assert all(a.object_type == "annotation" for a in anns.values())


def test_tiatoolbox_store_geojson_is_read():
    storage = pytest.importorskip("tiatoolbox.annotation.storage")
    store = storage.DictionaryStore()
    store.append(storage.Annotation(box(0, 0, 50, 40), {"type": "Vessel", "prob": 0.5}))
    store.append(storage.Annotation(box(100, 100, 110, 110), {"type": "Stroma"}))
    doc = json.loads(store.to_geojson())
    anns = read_annotations(doc, classes=["Vessel"], origin="store.geojson")
    assert [a.class_name for a in anns] == ["Vessel"]
    assert anns[0].geometry.area == pytest.approx(50 * 40)
    assert anns[0].properties == {"prob": 0.5}


def test_measurements_map_and_list():
    anns = read_annotations(
        [
            feature(
                props={
                    "measurements": {
                        "a": 1,
                        "b": "2.5",
                        "c": "NaN",
                        "d": None,
                        "e": True,
                        "f": 1e400,
                        "g": "text",
                    }
                }
            ),
            feature(
                props={
                    "measurements": [
                        {"name": "a", "value": 1},
                        {"name": "b"},
                        {"value": 3},
                        "junk",
                        {"name": "c", "value": "x"},
                    ]
                }
            ),
            feature(props={"measurements": "not a map"}),
        ]
    )
    assert anns[0].measurements == {"a": 1.0, "b": 2.5}
    assert anns[1].measurements == {"a": 1.0}
    assert anns[2].measurements == {}


def test_ids_and_other_properties():
    good = "6E6F0A3C-24C1-4A7E-9D2B-0F5B2C3E9A11"
    anns = read_annotations(
        [
            feature(fid=good, props={"custom": {"nested": [1, 2]}, "isLocked": True}),
            feature(fid="vessel-17"),
            feature(fid=42),
            feature(),
        ]
    )
    assert anns[0].id == good.lower()
    assert anns[0].properties == {"custom": {"nested": [1, 2]}, "isLocked": True}
    assert anns[1].properties["original_id"] == "vessel-17"
    assert anns[2].properties["original_id"] == 42
    assert "original_id" not in anns[3].properties
    for ann in anns[1:]:
        assert str(uuid.UUID(ann.id)) == ann.id
    assert len({a.id for a in anns}) == 4


def test_geometry_collection_keeps_polygonal_parts():
    geometry = {
        "type": "GeometryCollection",
        "geometries": [
            {"type": "Point", "coordinates": [5, 5]},
            {"type": "Polygon", "coordinates": SQUARE},
            {"type": "LineString", "coordinates": [[0, 0], [50, 50]]},
        ],
    }
    (ann,) = read_annotations([feature(geometry)])
    assert isinstance(ann.geometry, Polygon)
    assert ann.geometry.area == pytest.approx(100)


def test_child_objects_are_flattened():
    parent = feature(props={"classification": "Tissue"})
    parent["properties"]["childObjects"] = [
        feature(props={"classification": "Vessel"}),
        feature(props={"classification": "Stroma"}),
    ]
    anns = read_annotations([parent])
    assert [a.class_name for a in anns] == ["Tissue", "Vessel", "Stroma"]
    assert "childObjects" not in anns[0].properties
    assert [a.class_name for a in read_annotations([parent], classes=["Vessel"])] == ["Vessel"]


def test_plane_is_kept_and_written_back():
    geometry = {"type": "Polygon", "coordinates": SQUARE, "plane": {"c": -1, "z": 3, "t": 0}}
    (ann,) = read_annotations([feature(geometry)])
    assert ann.properties["plane"] == {"c": -1, "z": 3, "t": 0}
    written = to_feature_collection([ann])["features"][0]["geometry"]
    assert written["plane"] == {"c": -1, "z": 3, "t": 0}


# --------------------------------------------------------------------------- classes


def test_derived_classes_filter(tmp_path):
    path = write(tmp_path, QUPATH_0_4)
    assert [a.class_name for a in read_annotations(path, classes=["Vessel"])] == [
        "Vessel",
        "Vessel: Invasive",
    ]
    assert [a.class_name for a in read_annotations(path, classes=["Vessel: Invasive"])] == [
        "Vessel: Invasive"
    ]
    assert [a.class_name for a in read_annotations(path, classes=["Stroma", "Tumor"])] == ["Stroma"]
    assert read_annotations(path, classes=["Vess"]) == []
    assert read_annotations(path, classes=["Invasive"]) == []
    assert [a.class_name for a in read_annotations(path, classes="Stroma")] == ["Stroma"]


def test_of_classes_and_class_names():
    anns = [
        Annotation(box(0, 0, 1, 1), class_name=name)
        for name in ["Vessel: Invasive", "Stroma", None, "Vessel", "Stroma"]
    ]
    assert [a.class_name for a in of_classes(anns, ["Vessel"])] == [
        "Vessel: Invasive",
        "Vessel",
    ]
    assert of_classes(anns, []) == []
    assert class_names(anns) == ["Stroma", "Vessel", "Vessel: Invasive"]


# --------------------------------------------------------------------------- repair / errors


def test_bowtie_is_repaired():
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    (ann,) = read_annotations([feature(bowtie)])
    assert ann.geometry.is_valid
    assert ann.geometry.geom_type in ("Polygon", "MultiPolygon")
    assert ann.geometry.area == pytest.approx(50)


def test_overlapping_multipolygon_is_merged():
    a = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    b = [[[5, 0], [15, 0], [15, 10], [5, 10], [5, 0]]]
    (ann,) = read_annotations([feature({"type": "MultiPolygon", "coordinates": [a, b]})])
    assert ann.geometry.is_valid
    assert ann.geometry.area == pytest.approx(150)


def test_empty_after_repair_is_skipped_with_warning(tmp_path, caplog):
    doc = {
        "type": "FeatureCollection",
        "features": [
            feature(),
            feature(
                {"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [10, 0], [0, 0]]]},
                props={"name": "flat one", "classification": "Vessel"},
                fid="11111111-2222-4333-8444-555555555555",
            ),
        ],
    }
    path = write(tmp_path, json.dumps(doc), "flat.geojson")
    with caplog.at_level(logging.WARNING, logger="histosynth.integration.geojson"):
        anns = read_annotations(path)
    assert len(anns) == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "flat.geojson" in message
    assert "feature 1" in message
    assert "11111111-2222-4333-8444-555555555555" in message
    assert "flat one" in message
    assert "empty after repair" in message


def test_point_geometry_error_names_file_and_feature(tmp_path):
    doc = [
        feature(props={"classification": "Vessel"}),
        feature(
            {"type": "Point", "coordinates": [1, 2]},
            props={"classification": "Vessel"},
            fid="aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee",
        ),
    ]
    path = write(tmp_path, json.dumps(doc), "points.geojson")
    with pytest.raises(InputError) as info:
        read_annotations(path)
    err = info.value
    assert err.path == str(path)
    assert err.item.startswith("feature 1")
    assert "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee" in err.item
    assert "'Point'" in err.message
    assert str(err).startswith(f"{path}: feature 1")
    # a point of a class that was not asked for is ignored
    assert len(read_annotations(path, classes=["Stroma"])) == 0
    doc[1]["properties"]["classification"] = "Detection marker"
    assert len(read_annotations(doc, classes=["Vessel"])) == 1
    # ... and of one that was, is an error, whatever the type
    line = feature(
        {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, props={"classification": "Vessel"}
    )
    with pytest.raises(InputError, match="'LineString' is not a polygon"):
        read_annotations([line], classes=["Vessel"], origin="lines.json")


def test_null_geometry_is_not_a_polygon():
    doc = [{"type": "Feature", "geometry": None, "properties": {"classification": "Vessel"}}]
    with pytest.raises(InputError, match="not a polygon"):
        read_annotations(doc)
    assert read_annotations(doc, classes=["Stroma"]) == []


@pytest.mark.parametrize(
    ("geometry", "message"),
    [
        ({"type": "Polygon"}, "no rings"),
        ({"type": "Polygon", "coordinates": []}, "no rings"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}, "at least 3"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, "a"], [1, 0], [0, 0]]]}, "finite"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, True], [1, 0]]]}, "finite"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1], [1, 0], [0, 0]]]}, "position"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1e400, 1], [1, 0]]]}, "finite"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [10**400, 1], [1, 0]]]}, "finite"),
        ({"type": "Polygon", "coordinates": [[0, 0, 1]]}, "position"),
        ({"type": "Polygon", "coordinates": "x"}, "no rings"),
        ({"type": "MultiPolygon", "coordinates": []}, "no polygons"),
        ({"type": "MultiPolygon", "coordinates": [[[[0, 0], [1, 0]]]]}, "at least 3"),
        ("Polygon", "not an object"),
    ],
)
def test_bad_coordinates_are_input_errors(geometry, message):
    doc = {
        "type": "FeatureCollection",
        "features": [feature(), feature(), feature(), feature(geometry, fid="v-3")],
    }
    with pytest.raises(InputError, match=message) as info:
        read_annotations(doc, origin="bad.geojson")
    assert info.value.path == "bad.geojson"
    assert info.value.item == "feature 3 (id v-3)"


def test_nan_coordinates_in_a_file(tmp_path):
    text = (
        '{"type":"Feature","geometry":{"type":"Polygon","coordinates":'
        '[[[0,0],[NaN,1],[1,0],[0,0]]]},"properties":{}}'
    )
    with pytest.raises(InputError, match="finite") as info:
        read_annotations(write(tmp_path, text))
    assert info.value.item == "feature 0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"type": "FeatureCollection", "features": [', "not valid JSON"),
        ("", "empty"),
        ("42", "not GeoJSON"),
        ('{"foo": 1}', "not GeoJSON"),
        ('{"type": "Topology"}', "not GeoJSON"),
        ('{"type": "FeatureCollection", "features": {}}', "'features'"),
        ('{"type": "FeatureCollection", "features": [1]}', "not a GeoJSON Feature"),
        ('[{"type": "Feature", "geometry": null, "properties": 3}]', "properties"),
        ("\xff\xfe garbage", "not valid JSON"),
    ],
)
def test_malformed_documents(tmp_path, text, message):
    path = tmp_path / "broken.geojson"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match=message) as info:
        read_annotations(path)
    assert info.value.path == str(path)


def test_deeply_nested_input(tmp_path):
    path = tmp_path / "deep.geojson"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError):
        read_annotations(path)
    doc: list = []
    for _ in range(5000):
        doc = [doc]
    with pytest.raises(InputError, match="nested too deeply"):
        read_annotations(doc)


def test_missing_file_and_wrong_source(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_annotations(tmp_path / "nope.geojson")
    with pytest.raises(InputError, match="is a folder, not a file"):
        read_annotations(tmp_path)  # a folder
    with pytest.raises(InputError, match="expected a GeoJSON file path"):
        read_annotations(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- colours


# classifiers/classes.json of two real QuPath projects (0.4.0 and 0.6.0-rc3,
# tests' fixture README names them): QuPath's default colours, including the
# pseudo-random ones it gave the project's own classes.
QUPATH_CLASSES_JSON = {
    "Tumor": -3670016,
    "Stroma": -6895466,
    "Immune cells": -6268256,
    "Necrosis": -13487566,
    "Other": -14336,
    "Region*": -16777036,
    "Ignore*": -4934476,
    "Positive": -377282,
    "Negative": -9408287,
    "Training": -15346395,
    "muscle": -5072420,
    "fat": -2936423,
    "Tissue": -11325665,
    "Steatosis": -10425573,
}


@pytest.mark.parametrize(("name", "packed"), sorted(QUPATH_CLASSES_JSON.items()))
def test_default_color_matches_qupath(name, packed):
    assert default_color(name) == argb_to_rgb(packed)
    assert rgb_to_argb(default_color(name)) == packed


def test_default_color_of_derived_and_new_classes():
    assert default_color("Tumor: Positive") == (200, 50, 50)
    assert default_color("Tumor: Negative") == (90, 90, 180)
    assert default_color("Stroma: Positive") == (112, 150, 112)  # parent colour * 0.75
    assert default_color("3+") == (250, 62, 62)
    vessel = default_color("Vessel")
    assert vessel == default_color(" Vessel ")  # deterministic, stripped
    assert all(0 <= c <= 255 for c in vessel) and max(vessel) >= 40
    assert default_color("Vessel: Invasive") != vessel


def test_argb_packing():
    assert argb_to_rgb(-3670016) == (200, 0, 0)
    assert argb_to_rgb(0xFFC80000) == (200, 0, 0)
    assert rgb_to_argb((200, 0, 0)) == -3670016
    assert rgb_to_argb((255, 255, 255)) == -1
    for bad in ((256, 0, 0), (-1, 0, 0), (1, 2)):
        with pytest.raises(ValueError):
            rgb_to_argb(bad)
    with pytest.raises(ValueError):
        argb_to_rgb(1 << 33)
    with pytest.raises(TypeError):
        argb_to_rgb(1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- writing


def _uuid_ok(text: str) -> bool:
    return str(uuid.UUID(text)) == text


def test_written_collection_is_qupath_importable(tmp_path):
    anns = [
        *read_annotations(write(tmp_path, QUPATH_0_4)),
        Annotation(
            box(0, 0, 5, 5),
            class_name="Vessel",
            id="not-a-uuid",
            measurements={"ok": 1, "nan": float("nan"), "inf": float("inf")},
            properties={"source": "slide 1", "score": 0.5, "tags": ["a"], "obj": object()},
        ),
    ]
    path = tmp_path / "out" / "written.geojson"
    write_annotations(path, anns)
    assert [p.name for p in path.parent.iterdir()] == ["written.geojson"]  # no temp left
    doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=pytest.fail)
    assert doc["type"] == "FeatureCollection"
    assert len(doc["features"]) == 5
    for f in doc["features"]:
        assert f["type"] == "Feature"
        assert _uuid_ok(f["id"])
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        assert f["properties"]["objectType"] == "annotation"
        if "classification" in f["properties"]:
            cls = f["properties"]["classification"]
            assert set(cls) == {"name", "color"}
            assert len(cls["color"]) == 3 and all(0 <= c <= 255 for c in cls["color"])
        for value in f["properties"].get("metadata", {}).values():
            assert isinstance(value, str)
    assert "classification" not in doc["features"][3]["properties"]  # unclassified
    assert doc["features"][1]["properties"]["classification"] == {
        "name": "Vessel: Invasive",
        "color": [0, 128, 0],
    }
    last = doc["features"][4]["properties"]
    assert last["classification"] == {"name": "Vessel", "color": list(default_color("Vessel"))}
    assert last["measurements"] == {"ok": 1.0}
    assert last["metadata"] == {
        "source": "slide 1",
        "score": "0.5",
        "tags": '["a"]',
        "original_id": "not-a-uuid",
    }
    first = doc["features"][0]["properties"]
    assert first["isLocked"] is True
    assert first["name"] == "vessel with lumen"


def test_round_trip_keeps_geometry_class_colour_and_ids(tmp_path):
    original = read_annotations(write(tmp_path, QUPATH_0_4)) + read_annotations(
        write(tmp_path, QUPATH_0_2, "v02.geojson")
    )
    path = tmp_path / "round.geojson"
    write_annotations(path, original)
    again = read_annotations(path)
    assert len(again) == len(original)
    for a, b in zip(original, again, strict=True):
        assert b.id == a.id
        assert b.class_name == a.class_name
        assert b.color == (a.color or (default_color(a.class_name) if a.class_name else None))
        assert b.name == a.name
        assert b.measurements == a.measurements
        assert b.object_type == a.object_type
        assert b.geometry.geom_type == a.geometry.geom_type
        assert shapely.hausdorff_distance(a.geometry, b.geometry) <= 0.01
        assert b.geometry.area == pytest.approx(a.geometry.area, abs=1.0)


def test_coordinates_rounded_and_rings_closed():
    ann = Annotation(Polygon([(0.123456, 0.0), (10.987654, 0.0), (10.5, 7.77777)]), "Vessel")
    (f,) = to_feature_collection([ann])["features"]
    (ring,) = f["geometry"]["coordinates"]
    assert ring[0] == ring[-1]
    assert len(ring) == 4
    flat = [c for xy in ring for c in xy]
    assert all(round(c, 2) == c for c in flat)
    assert sorted(map(tuple, ring[:-1])) == [(0.12, 0.0), (10.5, 7.78), (10.99, 0.0)]


def test_offset_scale_and_clip():
    anns = [
        Annotation(box(1000, 2000, 1100, 2100), "Vessel"),  # straddles the tile edge
        Annotation(box(1200, 2200, 1210, 2210), "Vessel"),  # inside
        Annotation(box(5000, 5000, 5010, 5010), "Vessel"),  # outside: dropped
        Annotation(
            MultiPolygon([box(1000, 2000, 1010, 2010), box(9000, 9000, 9010, 9010)]), "Vessel"
        ),  # half outside: becomes a Polygon
    ]
    doc = to_feature_collection(
        anns, offset=(1050.0, 2050.0), scale=0.5, clip_to=(0.0, 0.0, 256.0, 256.0)
    )
    geoms = [shapely.geometry.shape(f["geometry"]) for f in doc["features"]]
    assert len(geoms) == 2
    assert geoms[0].equals(box(0, 0, 25, 25))
    assert geoms[1].equals(box(75, 75, 80, 80))
    assert [f["id"] for f in doc["features"]] == [anns[0].id, anns[1].id]
    # without clipping every feature is kept, transformed
    doc = to_feature_collection(anns, offset=(1050.0, 2050.0), scale=0.5)
    assert len(doc["features"]) == 4
    assert shapely.geometry.shape(doc["features"][2]["geometry"]).bounds == (
        1975.0,
        1475.0,
        1980.0,
        1480.0,
    )
    assert doc["features"][3]["geometry"]["type"] == "MultiPolygon"


def test_clip_keeps_only_polygonal_parts_and_holes():
    # a box whose right edge touches the clip box only along a line: nothing left
    touching = Annotation(box(100, 0, 120, 50), "Vessel")
    holed = Annotation(box(0, 0, 80, 80).difference(box(20, 20, 40, 40)), "Vessel")
    doc = to_feature_collection([touching, holed], clip_to=(0, 0, 100, 100))
    (f,) = doc["features"]
    geom = shapely.geometry.shape(f["geometry"])
    assert geom.area == pytest.approx(80 * 80 - 20 * 20)
    assert len(geom.interiors) == 1


def test_writer_rejects_bad_arguments():
    ann = Annotation(box(0, 0, 1, 1), "Vessel")
    for scale in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            to_feature_collection([ann], scale=scale)
    with pytest.raises(ValueError, match="clip_to"):
        to_feature_collection([ann], clip_to=(10, 0, 0, 10))
    with pytest.raises(ValueError, match="polygonal"):
        to_feature_collection([Annotation(shapely.Point(0, 0), "Vessel")])


def test_writer_repairs_invalid_and_drops_empty():
    bowtie = Annotation(Polygon([(0, 0), (10, 10), (10, 0), (0, 10)]), "Vessel")
    tiny = Annotation(box(0, 0, 0.001, 0.001), "Vessel")  # vanishes on the 0.01 px grid
    (f,) = to_feature_collection([bowtie, tiny])["features"]
    assert shapely.geometry.shape(f["geometry"]).area == pytest.approx(50)


def test_detection_object_type_is_kept_and_unknown_becomes_annotation():
    anns = [
        Annotation(box(0, 0, 1, 1), "Vessel", object_type="detection"),
        Annotation(box(0, 0, 1, 1), "Vessel", object_type="root"),
    ]
    types = [f["properties"]["objectType"] for f in to_feature_collection(anns)["features"]]
    assert types == ["detection", "annotation"]


def test_features_without_uuid_get_the_same_id_on_every_read():
    """QuPath 0.2/0.3 files carry no UUIDs; tile ids built from annotation ids must survive
    --resume, so the id given to such a feature is stable across reads."""
    doc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "id": "PathAnnotationObject",
             "geometry": {"type": "Polygon",
                          "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]},
             "properties": {"classification": {"name": "Vessel", "colorRGB": -65536}}},
            {"type": "Feature", "id": "PathAnnotationObject",
             "geometry": {"type": "Polygon",
                          "coordinates": [[[20, 0], [30, 0], [30, 10], [20, 10], [20, 0]]]},
             "properties": {"classification": {"name": "Vessel", "colorRGB": -65536}}},
        ],
    }
    first = [a.id for a in read_annotations(doc, origin="a.geojson")]
    second = [a.id for a in read_annotations(copy.deepcopy(doc), origin="a.geojson")]
    assert first == second
    assert len(set(first)) == 2
    assert all(uuid.UUID(i) for i in first)
