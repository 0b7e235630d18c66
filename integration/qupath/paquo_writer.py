"""``--write-project paquo``: apply the write-back plan through QuPath itself (paquo).

Needs a QuPath installation (``PAQUO_QUPATH_DIR``); the entries, names, metadata and
descriptions are those of :mod:`histosynth.integration.qupath.plan`, the annotations go
into each entry's QuPath data.
"""

from __future__ import annotations

import os
from typing import Any

from histosynth.integration.annotations import RGB, class_parts
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import read_annotations
from histosynth.integration.qupath.paquo_backend import QUPATH_HINT, qupath_available
from histosynth.integration.qupath.plan import (
    WrittenTile,
    make_plan,
    record_mapping,
    write_entry_images,
)
from histosynth.integration.qupath.project import QuPathProject, locked_project
from histosynth.integration.qupath.writeback import WriteBackResult

__all__ = ["write_run_with_paquo"]


def _paquo_class(class_name: str | None, color: RGB | None, cache: dict[str, Any]) -> Any:
    """paquo's ``QuPathPathClass`` for a full name ``"Vessel: Invasive"`` (parents first)."""
    from paquo.classes import QuPathPathClass

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
    wait_s: float = 0.0,
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
            :func:`write_run_to_project` refuses (also its project lock, waited for up
            to ``wait_s`` seconds).
    """
    with locked_project(project_path, wait_s=wait_s) as project:
        return _write_locked(project, run_dir, run_name)


def _write_locked(
    project: QuPathProject, run_dir: str | os.PathLike, run_name: str | None
) -> WriteBackResult:
    available, reason = qupath_available()
    if not available:
        raise InputError(f"cannot write the project through paquo: {reason}", path=project.file)
    plan = make_plan(project, run_dir, run_name)
    project.check_unchanged()
    run, name = plan.run, plan.run_name
    result = WriteBackResult(project.file, run, name, skipped=plan.skipped)
    if not plan.entries:
        return result
    try:
        from paquo.images import QuPathImageType
        from paquo.projects import QuPathProject as PaquoProject
    except Exception as exc:  # ValueError: no valid qupath installation found; JVM errors
        raise InputError(
            f"cannot start QuPath through paquo ({exc}); {QUPATH_HINT}", path=project.file
        ) from None
    write_entry_images(plan)
    added: list[WrittenTile] = []
    classes: dict[str, Any] = {}
    try:
        with PaquoProject(project.file, mode="r+") as qp:
            for tile in plan.entries:
                image = qp.add_image(
                    tile.tiff, image_type=QuPathImageType.BRIGHTFIELD_H_E, allow_duplicates=False
                )
                image.image_name = tile.image_name
                image.description = tile.description
                image.metadata = dict(tile.metadata)
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
                    WrittenTile(
                        tile.tile_id, int(image.entry_id), image.image_name, tile.tiff, None
                    )
                )
            known = {pc.id for pc in qp.path_classes}
            new_classes = [pc for key, pc in classes.items() if key not in known]
            if new_classes:
                qp.path_classes = [*qp.path_classes, *new_classes]
            qp.save()
    except InputError:
        raise
    except Exception as exc:  # Java exceptions surface as many types
        raise InputError(f"QuPath could not write the project: {exc}", path=project.file) from exc
    result.added = added
    result.mapping = record_mapping(run, QuPathProject(project.file, use_paquo=False), name, added)
    return result
