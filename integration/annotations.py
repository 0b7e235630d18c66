"""The annotation record shared by every reader and writer of the integration layer."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shapely.geometry.base import BaseGeometry

RGB = tuple[int, int, int]


@dataclass
class Annotation:
    """One annotated object.

    Attributes:
        geometry: shapely ``Polygon`` or ``MultiPolygon`` in full-resolution (level-0)
            pixels of its image, origin top-left, y down (QuPath's convention).
        class_name: full QuPath class name, derived classes joined by ``": "``
            (``"Vessel: Invasive"``); ``None`` when unclassified.
        color: class colour as (r, g, b) 0–255, or ``None`` when not known.
        id: UUID string.
        name: the object's own name, if any.
        measurements: name → value.
        properties: anything else worth keeping (provenance, QuPath metadata).
        object_type: QuPath object type (``"annotation"``, ``"detection"``, …).
    """

    geometry: BaseGeometry
    class_name: str | None = None
    color: RGB | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    name: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    object_type: str = "annotation"


def class_parts(class_name: str | None) -> list[str]:
    """Split a QuPath class name into its components: ``"A: B"`` → ``["A", "B"]``."""
    if not class_name:
        return []
    return [part.strip() for part in class_name.split(":") if part.strip()]


def normal_class_name(name: str) -> str | None:
    """``"Vessel:Invasive "`` → ``"Vessel: Invasive"``; blank → ``None``."""
    parts = class_parts(name)
    return ": ".join(parts) if parts else None


def class_matches(class_name: str | None, wanted: str) -> bool:
    """True when ``class_name`` is ``wanted`` or a class derived from it.

    ``class_matches("Vessel: Invasive", "Vessel")`` and
    ``class_matches("Vessel: Invasive", "Vessel: Invasive")`` are true;
    ``class_matches("Vessel", "Vessel: Invasive")`` is false.
    """
    have, want = class_parts(class_name), class_parts(wanted)
    return bool(want) and have[: len(want)] == want


def class_matches_any(class_name: str | None, wanted: Iterable[str] | str) -> bool:
    """True when ``class_name`` matches one of ``wanted`` (see :func:`class_matches`).

    >>> class_matches_any("Vessel: Invasive", ["Tumor", "Vessel"])
    True
    """
    if isinstance(wanted, str):
        wanted = [wanted]
    return any(class_matches(class_name, one) for one in wanted)


def of_classes(annotations: Iterable[Annotation], classes: Iterable[str] | str) -> list[Annotation]:
    """The annotations whose class is one of ``classes`` or derived from one of them."""
    classes = [classes] if isinstance(classes, str) else list(classes)
    return [a for a in annotations if class_matches_any(a.class_name, classes)]
