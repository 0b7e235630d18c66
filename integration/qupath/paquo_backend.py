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

from shapely.geometry.base import BaseGeometry

from histosynth.integration.annotations import RGB, Annotation, class_matches_any
from histosynth.integration.errors import InputError
from histosynth.integration.geometry import polygonal

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

__all__ = [
    "QUPATH_HINT",
    "annotation_from_parts",
    "qupath_available",
    "read_annotations_with_paquo",
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
                if wanted is not None and not class_matches_any(annotation.class_name, wanted):
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
    area = polygonal(geometry)
    if area is None:
        log.warning("%s: skipped: its ROI (%s) is not an area", label, geometry.geom_type)
        return None
    kwargs: dict[str, Any] = {}
    if object_id:
        kwargs["id"] = object_id
    clean = {k: float(v) for k, v in (measurements or {}).items() if _is_number(v)}
    return Annotation(
        geometry=area,
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


# ----------------------------------------------------------------------- writing


