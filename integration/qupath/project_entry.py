"""One image entry of a QuPath project: the record (:class:`ProjectEntry`), how it is read
from an item of ``images`` in ``project.qpproj``, and where its image is on this machine.

Image locations are resolved like QuPath does when a project has moved: a missing image
is looked for at its path relative to the project's old folder (the stored ``uri``),
applied to the project's current folder (``UriUpdater.relative``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

from histosynth.integration.errors import InputError
from histosynth.integration.qupath.uris import is_file_uri, relocate, uri_to_path

__all__ = ["ProjectEntry", "is_json_int", "locate_image", "parse_entry"]


def is_json_int(value: Any) -> bool:
    """True for a JSON integer (an ``int`` that is not a ``bool``)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ProjectEntry:
    """One image entry of a QuPath project.

    Attributes:
        entry_id: QuPath's ``entryID`` (the folder name under ``data/``).
        name: ``imageName`` (``None`` when the entry has none).
        description: the entry's description, if any.
        metadata: key -> value strings (QuPath's per-entry metadata).
        tags: entry tags (QuPath 0.6+; empty before).
        uri: the image URI of the server builder (the innermost one for wrapping
            builders such as ``rotated`` or ``pyramidize``); ``None`` when the builder
            combines several images (``sparse``, ``channels``, ...) or has no URI.
        uris: every URI found in the server builder, in order.
        builder_type: the outermost ``builderType`` (``"uri"`` for a plain image).
        provider: ``providerClassName`` of the builder holding the URI, if given.
        args: that builder's reader arguments (``["--series", "0"]``).
        randomized_name: QuPath's ``randomizedName`` UUID, if any.
        raw: the entry's JSON object exactly as read (do not modify).
        image_path: the image file found on this machine, or ``None``.
        stored_path: the path the URI names (possibly of another machine).
        tried_paths: every path looked at, in order.
        notes: why the image could not be found, or how it was found.
    """

    entry_id: int
    name: str | None
    description: str | None
    metadata: dict[str, str]
    tags: list[str]
    uri: str | None
    uris: list[str]
    builder_type: str | None
    provider: str | None
    args: list[str]
    randomized_name: str | None
    raw: dict[str, Any] = field(repr=False)
    image_path: Path | None = None
    stored_path: PurePath | None = None
    tried_paths: list[PurePath] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list, repr=False)

    @property
    def exists(self) -> bool:
        """True when the image file was found and is still there."""
        return self.image_path is not None and self.image_path.exists()

    @property
    def relocated(self) -> bool:
        """True when the image was found somewhere other than its stored path."""
        return self.image_path is not None and PurePath(self.image_path) != self.stored_path

    @property
    def server_metadata(self) -> dict[str, Any]:
        """The server builder's stored image metadata (size, levels, pixel size...)."""
        meta = self.raw.get("serverBuilder", {}).get("metadata")
        return meta if isinstance(meta, dict) else {}

    def label(self) -> str:
        """``entry 3 'slide.svs'`` for messages."""
        return f"entry {self.entry_id}" + (f" {self.name!r}" if self.name else "")


def _collect_uris(node: Any, uris: list[str], holders: list[dict[str, Any]]) -> None:
    """Every string ``uri`` in a server builder tree (depth first, like QuPath)."""
    if isinstance(node, dict):
        uri = node.get("uri")
        if isinstance(uri, str):
            uris.append(uri)
            holders.append(node)
        for value in node.values():
            if isinstance(value, dict | list):
                _collect_uris(value, uris, holders)
    elif isinstance(node, list):
        for value in node:
            _collect_uris(value, uris, holders)


def parse_entry(item: Any, index: int, file: Path) -> ProjectEntry:
    """Image ``index`` of the project file ``file`` (its JSON object ``item``) as an entry
    (image not yet looked for); InputError naming the image when a key is wrong."""
    where = f"image {index}"
    if not isinstance(item, dict):
        raise InputError(
            f"expected a JSON object, found {type(item).__name__}", path=file, item=where
        )
    for key in ("serverBuilder", "entryID"):
        if key not in item:
            raise InputError(f"missing key {key!r}", path=file, item=where)
    entry_id = item["entryID"]
    if not is_json_int(entry_id):
        raise InputError(f"'entryID' must be an integer, not {entry_id!r}", path=file, item=where)
    where = f"image {index} (entry {entry_id})"
    builder = item["serverBuilder"]
    if not isinstance(builder, dict):
        raise InputError("'serverBuilder' must be a JSON object", path=file, item=where)

    def text(key: str) -> str | None:
        value = item.get(key)
        if value is not None and not isinstance(value, str):
            raise InputError(f"{key!r} must be a string, not {value!r}", path=file, item=where)
        return value

    metadata = item.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise InputError("'metadata' must be a JSON object", path=file, item=where)
    clean_meta: dict[str, str] = {}
    for key, value in metadata.items():
        if isinstance(value, str):
            clean_meta[key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            clean_meta[key] = json.dumps(value)  # Gson reads a JSON number as its text
        else:
            raise InputError(
                f"metadata value of {key!r} must be a string, not {value!r}", path=file, item=where
            )
    tags = item.get("tags")
    tags = [] if tags is None else tags
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InputError("'tags' must be a list of strings", path=file, item=where)

    uris: list[str] = []
    holders: list[dict[str, Any]] = []
    _collect_uris(builder, uris, holders)
    distinct = list(dict.fromkeys(uris))
    holder = holders[0] if len(distinct) == 1 else {}
    provider = holder.get("providerClassName")
    args = holder.get("args") or []
    builder_type = builder.get("builderType")
    return ProjectEntry(
        entry_id=entry_id,
        name=text("imageName"),
        description=text("description"),
        metadata=clean_meta,
        tags=list(tags),
        uri=distinct[0] if len(distinct) == 1 else None,
        uris=distinct,
        builder_type=builder_type if isinstance(builder_type, str) else None,
        provider=provider if isinstance(provider, str) else None,
        args=[str(a) for a in args] if isinstance(args, list) else [],
        randomized_name=text("randomizedName"),
        raw=item,
    )


def locate_image(entry: ProjectEntry, old_folder: PurePath | None, folder: Path) -> None:
    """Find the entry's image on this machine, as QuPath would: at its stored path, else
    at its path relative to the project's ``old_folder`` (where it was saved) applied to
    its current ``folder``. Sets ``image_path`` / ``stored_path`` and adds to
    ``tried_paths`` and ``notes``."""
    if entry.uri is None:
        if len(entry.uris) > 1:
            entry.notes.append(
                f"server builder '{entry.builder_type}' combines {len(entry.uris)} images;"
                " not resolved to one file"
            )
        else:
            entry.notes.append("server builder has no image URI")
        return
    if not is_file_uri(entry.uri):
        entry.notes.append("not a local file URI")
        return
    try:
        stored = uri_to_path(entry.uri)
    except InputError as exc:
        entry.notes.append(exc.message)
        return
    entry.stored_path = stored
    entry.tried_paths.append(stored)
    if isinstance(stored, Path) and stored.exists():
        entry.image_path = stored
        return
    if not isinstance(stored, Path):
        flavour = "Windows" if isinstance(stored, PureWindowsPath) else "POSIX"
        entry.notes.append(f"stored path is a {flavour} path of another machine")
    if old_folder is None:
        entry.notes.append("the project has no stored uri to resolve moved images with")
        return
    if PurePath(old_folder) == PurePath(folder):
        entry.notes.append("the project is where it was saved, so nothing to relocate")
        return
    moved = relocate(stored, old_folder, folder)
    if moved is None:
        entry.notes.append(f"not on the drive/root of the project's old folder {old_folder}")
        return
    if moved not in entry.tried_paths:
        entry.tried_paths.append(moved)
    if moved.exists():
        entry.image_path = moved
        entry.notes.append(f"found relative to the moved project (was {stored})")
    else:
        entry.notes.append(
            f"the last path keeps its place relative to the project's old folder {old_folder}"
        )
