"""Annotations of a QuPath project through paquo (needs a QuPath installation).

QuPath keeps objects in Java-serialised ``data/<id>/data.qpdata`` that only QuPath can
read; paquo runs QuPath's own classes in a JVM. ``import paquo`` works without QuPath,
``paquo.projects`` does not, so everything here is imported lazily and a missing QuPath
becomes an :class:`InputError` that says how to point paquo at one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import shapely
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from histosynth.integration.annotations import RGB, Annotation, class_matches
from histosynth.integration.errors import InputError

if TYPE_CHECKING:
    from histosynth.integration.qupath.writeback import WriteBackResult

log = logging.getLogger(__name__)

__all__ = [
    "QUPATH_HINT",
    "annotation_from_parts",
    "qupath_available",
    "read_annotations_with_paquo",
    "write_run_with_paquo",
]

QUPATH_HINT = (
    "set PAQUO_QUPATH_DIR to the folder of a QuPath installation (the one holding lib/app "
    "on Linux), or export the annotations as GeoJSON into <project>/annotations/"
)


def qupath_available() -> tuple[bool, str]:
    """Whether paquo can run QuPath here, and a one-line reason (where it is, or why not).

    Looks where paquo looks (``PAQUO_QUPATH_DIR``, paquo's search folders, conda) without
    starting the JVM.
    """
    try:
        import jpype  # noqa: F401
        from paquo._config import settings, to_kwargs
        from paquo.jpype_backend import find_qupath
    except ImportError as exc:
        return False, f"paquo is not installed ({exc}); pip install paquo, then {QUPATH_HINT}"
    try:
        kwargs = to_kwargs(settings)
        env_dir = os.environ.get("PAQUO_QUPATH_DIR")
        if env_dir:
            kwargs["qupath_dir"] = env_dir
        info = find_qupath(**kwargs)
    except Exception as exc:  # paquo raises ValueError / FileNotFoundError / OSError
        where = os.environ.get("PAQUO_QUPATH_DIR")
        detail = f" in PAQUO_QUPATH_DIR={where}" if where else ""
        why = str(exc).strip()
        why = "" if not why or "no valid qupath installation" in why.lower() else f" ({why})"
        return False, f"no valid QuPath installation found{detail}{why}; {QUPATH_HINT}"
    return True, f"QuPath found at {info.app_dir}"


def _require_qupath(project_file: Path, entry_id: int) -> None:
    available, reason = qupath_available()
    if not available:
        raise InputError(
            f"cannot read QuPath objects: {reason}", path=project_file, item=f"entry {entry_id}"
        )


def read_annotations_with_paquo(
    project_file: str | os.PathLike,
    entry_id: int,
    classes: Iterable[str] | None = None,
) -> list[Annotation]:
    """Annotations of one entry, read by QuPath through paquo (level-0 pixels).

    Args:
        project_file: ``project.qpproj`` or its folder.
        entry_id: QuPath ``entryID``.
        classes: keep only these classes and the classes derived from them.

    Raises:
        InputError: QuPath not found (with how to point paquo at it), no such entry,
            or QuPath failed to read the project.
    """
    project_file = Path(project_file)
    _require_qupath(project_file, entry_id)
    try:
        from paquo.projects import QuPathProject as PaquoProject
    except Exception as exc:  # ValueError: no valid qupath installation found; JVM errors
        raise InputError(
            f"cannot start QuPath through paquo ({exc}); {QUPATH_HINT}",
            path=project_file,
            item=f"entry {entry_id}",
        ) from None
    wanted = None if classes is None else list(classes)
    result: list[Annotation] = []
    try:
        with PaquoProject(project_file, mode="r") as project:
            image = next((im for im in project.images if int(im.entry_id) == entry_id), None)
            if image is None:
                raise InputError(
                    "no entry with this id", path=project_file, item=f"entry {entry_id}"
                )
            for index, obj in enumerate(image.hierarchy.annotations):
                annotation = _from_paquo(obj, f"entry {entry_id} annotation {index}")
                if annotation is None:
                    continue
                if wanted is not None and not any(
                    class_matches(annotation.class_name, w) for w in wanted
                ):
                    continue
                result.append(annotation)
    except InputError:
        raise
    except Exception as exc:  # Java exceptions surface as many types
        raise InputError(
            f"QuPath could not read the project: {exc}", path=project_file, item=f"entry {entry_id}"
        ) from exc
    return result


def _from_paquo(obj: Any, label: str) -> Annotation | None:
    """Convert one paquo annotation object."""
    path_class = obj.path_class
    class_name = None if path_class is None else path_class.id  # "Vessel: Invasive"
    color = None
    if path_class is not None and path_class.color is not None:
        color = tuple(int(c) for c in path_class.color.to_rgb())
    object_id = None
    try:
        object_id = str(obj.java_object.getID())  # QuPath 0.4+: the object's UUID
    except Exception:
        object_id = None
    description = getattr(obj, "description", None)
    return annotation_from_parts(
        obj.roi,
        class_name=class_name,
        color=color,
        object_id=object_id,
        name=obj.name,
        measurements=dict(obj.measurements),
        properties={
            k: v for k, v in (("description", description), ("isLocked", bool(obj.locked))) if v
        },
        label=label,
    )


def annotation_from_parts(
    geometry: BaseGeometry,
    *,
    class_name: str | None,
    color: RGB | tuple[int, ...] | None,
    object_id: str | None = None,
    name: str | None = None,
    measurements: dict[str, float] | None = None,
    properties: dict[str, Any] | None = None,
    label: str = "annotation",
) -> Annotation | None:
    """An :class:`Annotation` from a QuPath object's parts; ``None`` (with a warning) when
    its ROI has no area (points, lines) or nothing is left after repair."""
    polygonal = _polygonal(geometry)
    if polygonal is None:
        log.warning("%s: skipped: its ROI (%s) is not an area", label, geometry.geom_type)
        return None
    kwargs: dict[str, Any] = {}
    if object_id:
        kwargs["id"] = object_id
    clean = {k: float(v) for k, v in (measurements or {}).items() if _is_number(v)}
    return Annotation(
        geometry=polygonal,
        class_name=class_name,
        color=None if color is None else (int(color[0]), int(color[1]), int(color[2])),
        name=name,
        measurements=clean,
        properties=dict(properties or {}),
        object_type="annotation",
        **kwargs,
    )


def _is_number(value: Any) -> bool:
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _polygonal(geometry: BaseGeometry) -> Polygon | MultiPolygon | None:
    """The areal part of a geometry, repaired; ``None`` when there is none."""
    if geometry is None or geometry.is_empty:
        return None
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    if isinstance(geometry, Polygon | MultiPolygon):
        parts = [geometry]
    elif isinstance(geometry, GeometryCollection):
        parts = [g for g in geometry.geoms if isinstance(g, Polygon | MultiPolygon)]
    else:
        return None
    polygons = [p for g in parts for p in getattr(g, "geoms", [g]) if not p.is_empty]
    if not polygons:
        return None
    if len(polygons) == 1:
        return polygons[0]
    return MultiPolygon(polygons)


# ----------------------------------------------------------------------- writing


def _paquo_class(class_name: str | None, color: RGB | None, cache: dict[str, Any]) -> Any:
    """paquo's ``QuPathPathClass`` for a full name ``"Vessel: Invasive"`` (parents first)."""
    from paquo.classes import QuPathPathClass

    from histosynth.integration.annotations import class_parts

    parts = class_parts(class_name)
    if not parts:
        return None
    parent = None
    for depth in range(1, len(parts) + 1):
        key = ": ".join(parts[:depth])
        if key not in cache:
            last = depth == len(parts)
            cache[key] = QuPathPathClass(
                parts[depth - 1], color=color if last and color else None, parent=parent
            )
        parent = cache[key]
    return parent


def write_run_with_paquo(
    project_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    run_name: str | None = None,
) -> WriteBackResult:
    """``--write-project paquo``: add the run's synthetic tiles through QuPath itself.

    Same rows, TIFFs, entry names, metadata, description and duplicate check as
    :func:`histosynth.integration.qupath.writeback.write_run_to_project`, but the entries
    are added by paquo (``add_image(..., image_type=BRIGHTFIELD_H_E)``) and each tile's
    annotations go straight into the entry's QuPath data (``hierarchy.add_annotation``),
    so no GeoJSON sidecar is needed. QuPath saves the project (tags are not set: paquo has
    no API for them).

    Raises:
        InputError: no QuPath installation (with how to point paquo at one), or anything
            :func:`write_run_to_project` refuses.
    """
    from histosynth.integration.dataset import REVIEW_STATUSES
    from histosynth.integration.geojson import read_annotations
    from histosynth.integration.qupath.project import (
        META_ID,
        META_REVIEW,
        META_RUN,
        META_SOURCE_ENTRY,
        META_SYNTHETIC,
        META_TYPE,
        QuPathProject,
    )
    from histosynth.integration.qupath.writeback import (
        WriteBackResult,
        WrittenTile,
        _check_run_name,
        _check_targets,
        _description,
        _read_rgb,
        _record_mapping,
        _run_folder,
        default_run_name,
        plan_write_back,
        write_calibrated_tiff,
    )

    project = QuPathProject(project_path, use_paquo=False)
    available, reason = qupath_available()
    if not available:
        raise InputError(f"cannot write the project through paquo: {reason}", path=project.file)
    run = _run_folder(run_dir)
    name = _check_run_name(run_name if run_name is not None
                           else default_run_name(run, project.file))
    planned, skipped = plan_write_back(project, run, name)
    _check_targets(project, run, planned)
    project.check_unchanged()
    result = WriteBackResult(project.file, run, name, skipped=skipped)
    if not planned:
        return result
    try:
        from paquo.images import QuPathImageType
        from paquo.projects import QuPathProject as PaquoProject
    except Exception as exc:  # ValueError: no valid qupath installation found; JVM errors
        raise InputError(
            f"cannot start QuPath through paquo ({exc}); {QUPATH_HINT}", path=project.file
        ) from None
    for tile in planned:
        write_calibrated_tiff(tile.tiff, _read_rgb(tile.png, tile.tile_id), tile.mpp)
    added: list[WrittenTile] = []
    classes: dict[str, Any] = {}
    try:
        with PaquoProject(project.file, mode="r+") as qp:
            for tile in planned:
                image = qp.add_image(
                    tile.tiff, image_type=QuPathImageType.BRIGHTFIELD_H_E, allow_duplicates=False
                )
                image.image_name = f"synthetic-{name}-{tile.tile_id}"
                image.description = _description(tile.row, name)
                status = tile.row.get("review_status") or "pending"
                image.metadata = {
                    META_SYNTHETIC: "true",
                    META_RUN: name,
                    META_ID: tile.tile_id,
                    META_TYPE: tile.row["synthesis_type"],
                    META_SOURCE_ENTRY: tile.row.get("source_entry_id", ""),
                    META_REVIEW: status if status in REVIEW_STATUSES else "pending",
                }
                if tile.geojson is not None:
                    for annotation in read_annotations(tile.geojson):
                        obj = image.hierarchy.add_annotation(
                            roi=annotation.geometry,
                            path_class=_paquo_class(
                                annotation.class_name, annotation.color, classes
                            ),
                        )
                        if annotation.name:
                            obj.name = annotation.name
                added.append(
                    WrittenTile(tile.tile_id, int(image.entry_id), image.image_name, tile.tiff,
                                None)
                )
            known = {pc.id for pc in qp.path_classes}
            new_classes = [pc for key, pc in classes.items() if key not in known]
            if new_classes:
                qp.path_classes = [*qp.path_classes, *new_classes]
            qp.save()
    except InputError:
        raise
    except Exception as exc:  # Java exceptions surface as many types
        raise InputError(f"QuPath could not write the project: {exc}", path=project.file
                         ) from exc
    result.added = added
    result.mapping = _record_mapping(run, QuPathProject(project.file, use_paquo=False), name,
                                     added)
    return result
