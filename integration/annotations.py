"""The annotation record shared by every reader and writer of the integration layer."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shapely.geometry.base import BaseGeometry

RGB = tuple[int, int, int]

#: Lone UTF-16 surrogates (no UTF-8 encoding) and C0 / C1 control characters but tab,
#: line feed and carriage return.
_UNSAFE = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def safe_text(value: Any) -> Any:
    """``value`` with every lone surrogate and control character (but tab, LF and CR)
    replaced by U+FFFD, so that it can be written as UTF-8 JSON, CSV or XML; lists and
    dicts (keys too) are cleaned throughout, other values returned as they are."""
    if isinstance(value, str):
        return _UNSAFE.sub("\ufffd", value)
    if isinstance(value, list | tuple):
        return type(value)(safe_text(v) for v in value)
    if isinstance(value, dict):
        return {safe_text(k): safe_text(v) for k, v in value.items()}
    return value


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

    def __post_init__(self) -> None:
        # a name read from a file may hold a lone surrogate ("\udfff" in JSON) or control
        # characters: cleaned once here, every writer can encode them
        self.class_name = safe_text(self.class_name)
        self.name = safe_text(self.name)
        self.id = safe_text(self.id)
        self.measurements = safe_text(self.measurements)
        self.properties = safe_text(self.properties)
        self.object_type = safe_text(self.object_type)


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
