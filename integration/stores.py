"""TIAToolbox annotation stores (``SQLiteStore``, ``.db`` files) ↔ our :class:`Annotation`.

Geometry stays in level-0 pixels on both sides. Properties written for each annotation:

=========================== ==========================================================
``type``                    full class name (``"Vessel: Invasive"``): the key TIAToolbox
                            engines write class labels to and its viewer colours by
``classification``          ``{"name", "color": [r, g, b]}`` as in QuPath GeoJSON, so that
                            ``store.to_geojson()`` stays importable into QuPath
``objectType``              ``"annotation"``, ``"detection"``, …
``name``                    the object's name (when set)
``histosynth_id``           our UUID (also the store key)
``<measurement name>``      each measurement, flattened to a top-level number (queryable
                            as ``props["Area"]``); ``histosynth_measurements`` lists
                            their names so that they read back as measurements (TIAToolbox
                            stores keys JSON-escaped, so SQLite cannot query non-ASCII
                            names such as ``"Area µm^2"``; they still read back)
anything else               ``Annotation.properties`` (provenance: ``synthetic``, ``run``,
                            ``source_entry_id`` …) and ``extra_properties``, unchanged
=========================== ==========================================================

Reading accepts stores written here, by TIAToolbox engines (class label in ``type``,
class index in ``class``) and by ``SQLiteStore.from_geojson`` on QuPath GeoJSON
(``classification``, ``measurements``, ``objectType``).

The ``enable_load_extension`` trap: ``SQLiteStore.__init__`` calls the static
``SQLiteStore.compile_options()``, which calls ``sqlite3.Connection.enable_load_extension
(True)`` before ``PRAGMA compile_options``. The call is unguarded and nothing is ever
loaded afterwards, but Python builds without loadable-extension support (this machine's
``python3`` among them) lack the method, so every ``SQLiteStore()`` fails with
``AttributeError``. :func:`open_store` uses :class:`CompatSQLiteStore`, a subclass whose
``compile_options`` reads the pragma without that call; :func:`tiatoolbox_sqlite_compat`
does the same for TIAToolbox's own code (engines, ``SQLiteStore.from_geojson``) while a
``with`` block runs. No SQLite feature is lost: TIAToolbox needs JSON1, RTREE (checked
by TIAToolbox itself) and math functions, all compiled in, never loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from shapely.geometry import MultiPolygon, Polygon
from tiatoolbox.annotation.storage import Annotation as StoreAnnotation
from tiatoolbox.annotation.storage import AnnotationStore, SQLiteStore

from histosynth.common.files import atomic_write_with
from histosynth.integration.annotations import (
    RGB,
    Annotation,
    class_matches_any,
    class_parts,
)
from histosynth.integration.class_colours import argb_to_rgb, default_color
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import OBJECT_TYPES
from histosynth.integration.geometry import polygonal

log = logging.getLogger(__name__)

__all__ = [
    "CompatSQLiteStore",
    "annotations_to_store",
    "has_load_extension",
    "open_store",
    "save_store",
    "sqlite_compile_options",
    "store_to_annotations",
    "tiatoolbox_sqlite_compat",
]

MEASUREMENTS_KEY = "histosynth_measurements"
ID_KEY = "histosynth_id"
_RESERVED = ("type", "classification", "objectType", "name", ID_KEY, MEASUREMENTS_KEY)
_STORE_TABLES = {"annotations", "metadata", "rtree"}


# --------------------------------------------------------------------------- the trap


def has_load_extension() -> bool:
    """True when this Python's ``sqlite3`` can load extensions (``enable_load_extension``)."""
    return hasattr(sqlite3.Connection, "enable_load_extension")


def sqlite_compile_options() -> list[str]:
    """``PRAGMA compile_options`` of the linked SQLite, without ``enable_load_extension``.

    Same result as TIAToolbox's ``SQLiteStore.compile_options()`` (enabling extension
    loading does not change the compile options), on every Python build.
    """
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        return [option for (option,) in conn.execute("PRAGMA compile_options")]


_noted = False


def _note_missing_load_extension() -> None:
    global _noted
    if not _noted and not has_load_extension():
        _noted = True
        log.debug(
            "this Python's sqlite3 has no enable_load_extension; TIAToolbox only calls it "
            "before reading compile options and loads no extension, so SQLiteStore works "
            "without it"
        )


class CompatSQLiteStore(SQLiteStore):
    """TIAToolbox :class:`SQLiteStore` that also works where ``sqlite3`` cannot load
    extensions. Identical otherwise (``isinstance(store, SQLiteStore)`` holds)."""

    @staticmethod
    def compile_options() -> list[str]:
        """SQLite compile options (see :func:`sqlite_compile_options`)."""
        _note_missing_load_extension()
        return sqlite_compile_options()

    @classmethod
    def open(cls, fp: Path | str) -> CompatSQLiteStore:  # SQLiteStore.open hardcodes its class
        """Open a store from a path."""
        return cls(fp)


_patch_lock = threading.Lock()
_patch_depth = 0
_patch_saved: Any = None


@contextlib.contextmanager
def tiatoolbox_sqlite_compat() -> Iterator[None]:
    """Let TIAToolbox's own code create ``SQLiteStore`` objects while the block runs.

    Use around TIAToolbox calls that build stores internally (engines with
    ``output_type="annotationstore"``, ``SQLiteStore.from_geojson``, ``SQLiteStore(path)``).
    Where ``sqlite3`` has ``enable_load_extension`` this does nothing; otherwise it
    replaces ``SQLiteStore.compile_options`` by :func:`sqlite_compile_options` until the
    outermost block exits (re-entrant, thread-safe counting).
    """
    global _patch_depth, _patch_saved
    if has_load_extension():
        yield
        return
    with _patch_lock:
        if _patch_depth == 0:
            _patch_saved = SQLiteStore.__dict__["compile_options"]
            SQLiteStore.compile_options = CompatSQLiteStore.__dict__["compile_options"]
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                SQLiteStore.compile_options = _patch_saved
                _patch_saved = None


# --------------------------------------------------------------------------- files


def _check_store_file(path: Path) -> None:
    """Raise InputError unless ``path`` is a TIAToolbox SQLite store (opened read-only)."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise InputError(f"not an SQLite annotation store: {exc}", path=path) from exc
    missing = _STORE_TABLES - tables
    if missing:
        raise InputError(
            "an SQLite database but not a TIAToolbox annotation store "
            f"(no table {', '.join(sorted(missing))})",
            path=path,
        )


def open_store(path: str | os.PathLike = ":memory:", *, create: bool = True) -> SQLiteStore:
    """Open (or create) a TIAToolbox ``SQLiteStore``, on any Python build.

    Args:
        path: ``":memory:"`` or a ``.db`` file.
        create: create the file when it does not exist; otherwise a missing file is an
            :class:`InputError`.

    Raises:
        InputError: missing file (``create=False``), a file that is not a TIAToolbox
            store (it is left untouched), or a damaged database.
    """
    if str(path) == ":memory:":
        return CompatSQLiteStore(":memory:")
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder, expected an annotation store (.db)", path=path)
    if path.is_file() and path.stat().st_size > 0:
        _check_store_file(path)
    elif not create:
        raise InputError("annotation store not found", path=path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return CompatSQLiteStore(path)
    except (sqlite3.DatabaseError, KeyError) as exc:
        raise InputError(f"cannot open the annotation store: {exc}", path=path) from exc


def save_store(store: SQLiteStore, path: str | os.PathLike) -> Path:
    """Copy ``store`` into the ``.db`` file ``path`` atomically (temp file + rename).

    Does what ``SQLiteStore.dump`` does (an SQLite backup of the store's connection) but
    closes the copy before renaming it into place. Returns the path.
    """
    store.commit()

    def write(tmp: str) -> None:
        with contextlib.closing(sqlite3.connect(tmp)) as target:
            store.con.backup(target)

    return atomic_write_with(path, write)


# --------------------------------------------------------------------------- writing


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _measurement_key(name: str) -> str:
    """Property key of a flattened measurement (``"measurement: type"`` if reserved)."""
    return f"measurement: {name}" if name in _RESERVED else name


def _store_properties(
    annotation: Annotation, extra: Mapping[str, Any], label: str
) -> dict[str, Any]:
    props: dict[str, Any] = {}
    props.update(_jsonable(dict(extra)))
    props.update(_jsonable(dict(annotation.properties)))
    measurements = {}
    for key, value in annotation.measurements.items():
        number = float(value) if isinstance(value, int | float) else math.nan
        if not math.isfinite(number):
            log.warning("%s: measurement %r is not a finite number; not stored", label, key)
            continue
        measurements[_measurement_key(str(key))] = number
    clash = sorted(set(measurements) & set(props))
    if clash:
        log.warning("%s: measurement(s) %s replace properties of the same name", label, clash)
    props.update(measurements)
    clash = sorted(set(props) & set(_RESERVED))
    if clash:
        log.warning("%s: properties %s are replaced by histosynth's own keys", label, clash)
    for key in _RESERVED:
        props.pop(key, None)
    if measurements:
        props[MEASUREMENTS_KEY] = [
            str(key)
            for key in annotation.measurements
            if _measurement_key(str(key)) in measurements
        ]
    props["objectType"] = annotation.object_type or "annotation"
    if annotation.class_name:
        color = annotation.color or default_color(annotation.class_name)
        props["type"] = annotation.class_name
        props["classification"] = {
            "name": annotation.class_name,
            "color": [int(c) for c in color],
        }
    if annotation.name:
        props["name"] = str(annotation.name)
    props[ID_KEY] = annotation.id
    return props


def annotations_to_store(
    annotations: Iterable[Annotation],
    path: str | os.PathLike | None = None,
    *,
    extra_properties: Mapping[str, Any] | None = None,
) -> SQLiteStore:
    """An in-memory TIAToolbox ``SQLiteStore`` holding ``annotations``; keys are their ids.

    Args:
        annotations: polygonal annotations (level-0 pixels).
        path: when given, the store is also saved there as a ``.db`` file, atomically.
        extra_properties: added to every annotation (e.g. ``{"synthetic": True, "run":
            "r1"}``); an annotation's own properties win.

    Raises:
        InputError: an annotation that is not polygonal or an id used twice.
    """
    extra = dict(extra_properties or {})
    items: list[StoreAnnotation] = []
    keys: list[str] = []
    seen: set[str] = set()
    for index, annotation in enumerate(annotations):
        label = f"annotation {index} ({annotation.id})"
        geom = annotation.geometry
        if not isinstance(geom, Polygon | MultiPolygon) or geom.is_empty:
            raise InputError(
                f"geometry must be a non-empty Polygon or MultiPolygon, got {geom.geom_type}",
                item=label,
            )
        if annotation.id in seen:
            raise InputError("the id is used by an earlier annotation", item=label)
        seen.add(annotation.id)
        items.append(StoreAnnotation(geom, _store_properties(annotation, extra, label)))
        keys.append(annotation.id)
    store = open_store()
    if items:
        store.append_many(items, keys)
    if path is not None:
        save_store(store, path)
    return store


# --------------------------------------------------------------------------- reading


def _color(value: Any) -> RGB | None:
    if isinstance(value, list | tuple) and len(value) in (3, 4):
        if all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value[:3]):
            return (value[0], value[1], value[2])
        if all(isinstance(c, float) and 0 <= c <= 1 for c in value[:3]):  # TIAToolbox 0–1
            return tuple(round(c * 255) for c in value[:3])  # type: ignore[return-value]
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            return argb_to_rgb(value)
    return None


def _class_name(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | str):
        text = str(value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ": ".join(value)
    else:
        return None
    parts = class_parts(text)
    return ": ".join(parts) if parts else None


def _classification(value: Any) -> tuple[str | None, RGB | None]:
    if isinstance(value, dict):
        name = value.get("names", value.get("name"))
        return _class_name(name), _color(value.get("color", value.get("colorRGB")))
    return _class_name(value), None


def _measurements(props: dict[str, Any]) -> dict[str, float]:
    names = props.pop(MEASUREMENTS_KEY, None)
    if isinstance(names, list):
        result = {}
        for name in names:
            value = props.pop(_measurement_key(name), None) if isinstance(name, str) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                result[name] = float(value)
        return result
    value = props.pop("measurements", None)  # QuPath GeoJSON via SQLiteStore.from_geojson
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = [(m.get("name"), m.get("value")) for m in value if isinstance(m, dict)]
    else:
        return {}
    return {
        str(k): float(v)
        for k, v in pairs
        if isinstance(k, str)
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _is_uuid(value: Any) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _selected(class_name: str | None, classes: Sequence[str] | None) -> bool:
    return classes is None or class_matches_any(class_name, classes)


_NON_POLYGONAL = ("Point", "MultiPoint", "LineString", "MultiLineString", "LinearRing")


def _to_annotation(
    key: str,
    item: StoreAnnotation,
    path: Path | None,
    classes: Sequence[str] | None,
    ignored: Counter[str],
) -> Annotation | None:
    props = dict(item.properties or {})
    object_type = None
    for name in ("objectType", "object_type"):
        value = props.pop(name, None)
        if object_type is None and isinstance(value, str):
            object_type = OBJECT_TYPES.get(value)
    class_name, color = None, None
    type_value = props.get("type")
    if isinstance(type_value, str) and type_value in OBJECT_TYPES:
        props.pop("type")  # QuPath 0.6+ alias of objectType, not a class
        object_type = object_type or OBJECT_TYPES[type_value]
    elif type_value is not None:
        class_name = _class_name(props.pop("type"))
    if "classification" in props:
        other, other_color = _classification(props["classification"])
        if class_name is None or other == class_name:
            props.pop("classification")
            class_name, color = other, other_color
    if class_name is None and "class_name" in props:
        class_name = _class_name(props.pop("class_name"))

    item_label = f"annotation {key}" + (f" ({class_name})" if class_name else "")
    selected = _selected(class_name, classes)
    geom = item.geometry
    if geom is not None and geom.geom_type in _NON_POLYGONAL:
        if selected and classes is not None:
            raise InputError(
                f"geometry type {geom.geom_type!r} is not a polygon; only Polygon and "
                "MultiPolygon annotations can be used",
                path=path,
                item=item_label,
            )
        if selected:
            ignored[geom.geom_type] += 1
        return None
    if not selected:
        return None
    area = polygonal(geom)
    if area is None:
        log.warning(
            "%s%s: geometry is empty after repair; skipped", f"{path}: " if path else "", item_label
        )
        return None

    name = props.pop("name", None)
    stored_id = props.pop(ID_KEY, None)
    if _is_uuid(stored_id):
        ann_id = stored_id.lower()
    elif _is_uuid(key):
        ann_id = key.lower()
    else:
        ann_id = str(uuid.uuid4())
        props["store_key"] = key
    measurements = _measurements(props)
    return Annotation(
        geometry=area,
        class_name=class_name,
        color=color,
        id=ann_id,
        name=name if isinstance(name, str) or name is None else str(name),
        measurements=measurements,
        properties=props,
        object_type=object_type or "annotation",
    )


def store_to_annotations(
    store_or_path: AnnotationStore | str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
) -> list[Annotation]:
    """Polygonal annotations of a TIAToolbox store (object or ``.db`` file), in store order.

    Class comes from ``type`` (TIAToolbox), else ``classification`` (QuPath GeoJSON
    imported with ``from_geojson``), else ``class_name``. Points and lines are ignored with
    one warning, unless ``classes`` selects them: then :class:`InputError`.

    Args:
        store_or_path: an ``AnnotationStore`` or the path of a ``.db`` file.
        classes: keep these classes and classes derived from them (``"Vessel"`` keeps
            ``"Vessel: Invasive"``); ``None`` keeps every class and unclassified objects.

    Raises:
        InputError: missing or damaged file, or a selected non-polygonal annotation.
    """
    if isinstance(classes, str):
        classes = [classes]
    if isinstance(store_or_path, str | os.PathLike):
        path = Path(store_or_path)
        store = open_store(path, create=False)
        try:
            return _read(store, path, classes)
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cannot read the annotation store: {exc}", path=path) from exc
        finally:
            store.close()
    return _read(store_or_path, None, classes)


def _read(
    store: AnnotationStore, path: Path | None, classes: Sequence[str] | None
) -> list[Annotation]:
    result: list[Annotation] = []
    ignored: Counter[str] = Counter()
    for key, item in store.items():
        annotation = _to_annotation(str(key), item, path, classes, ignored)
        if annotation is not None:
            result.append(annotation)
    if ignored:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(ignored.items()))
        log.warning("%s: ignored %s: not polygons", path or "annotation store", counts)
    return result
