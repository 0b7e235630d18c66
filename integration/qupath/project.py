"""Read a QuPath project (``project.qpproj``) without QuPath.

What QuPath's ``DefaultProject`` loads: the image entries (server builder URI, id, name,
description, metadata, tags), the project classes (``classifiers/classes.json``) and,
for each entry, its annotations - through paquo when a QuPath installation is found,
otherwise from GeoJSON exported beside the project (``annotations/<entryID>.geojson``).

Image locations are resolved like QuPath does when a project has moved: a missing image
is looked for at its path relative to the project's old folder (the stored ``uri``),
applied to the project's current folder (``UriUpdater.relative``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

from histosynth.integration.annotations import RGB, Annotation
from histosynth.integration.errors import InputError
from histosynth.integration.qupath.uris import is_file_uri, relocate, uri_to_path

log = logging.getLogger(__name__)

__all__ = ["ProjectEntry", "QuPathProject"]

PROJECT_FILE = "project.qpproj"


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


class QuPathProject:
    """A QuPath project read from disk (QuPath 0.2 - 0.7).

    Args:
        path: the ``project.qpproj`` file or the folder holding it.
        use_paquo: read annotations through paquo: ``None`` when a QuPath installation
            is found, ``False`` never (GeoJSON only), ``True`` always (an error when
            QuPath is missing).

    Raises:
        InputError: no such file, not JSON, or a required key is missing or wrong
            (naming the file and the image / key).
    """

    def __init__(self, path: str | os.PathLike, *, use_paquo: bool | None = None) -> None:
        given = Path(path).expanduser()
        if given.is_dir():
            given = given / PROJECT_FILE
            if not given.is_file():
                raise InputError(f"no {PROJECT_FILE} in this folder", path=given.parent)
        elif not given.exists():
            raise InputError("no such file or folder", path=given)
        self.file: Path = given.absolute()
        self.folder: Path = self.file.parent
        self._use_paquo = use_paquo
        self._paquo_state: tuple[bool, str] | None = None
        self._classes: dict[str, RGB] | None = None
        self.raw: dict[str, Any] = _read_json_object(self.file)
        self._parse()

    # ------------------------------------------------------------------ reading
    def _parse(self) -> None:
        raw, file = self.raw, self.file
        version = raw.get("version")
        if version is not None and not isinstance(version, str):
            raise InputError(f"'version' must be a string, not {version!r}", path=file)
        last_id = raw.get("lastID")
        if last_id is not None and not _is_int(last_id):
            raise InputError(f"'lastID' must be an integer, not {last_id!r}", path=file)
        if version is None and last_id is None:
            raise InputError(
                "not a QuPath project: it has neither 'version' nor 'lastID'", path=file
            )
        uri = raw.get("uri")
        if uri is not None and not isinstance(uri, str):
            raise InputError(f"'uri' must be a string, not {uri!r}", path=file)
        if "images" not in raw:
            raise InputError("missing key 'images'", path=file)
        images = raw["images"]
        if not isinstance(images, list):
            raise InputError(f"'images' must be a list, not {type(images).__name__}", path=file)

        self.version: str | None = version
        self.uri: str | None = uri
        self.create_timestamp: int | None = _int_or_none(raw.get("createTimestamp"))
        self.modify_timestamp: int | None = _int_or_none(raw.get("modifyTimestamp"))
        self.old_folder: PurePath | None = None
        if uri is not None:
            try:
                self.old_folder = uri_to_path(uri).parent
            except InputError as exc:
                log.warning("%s: cannot read the project's stored uri: %s", file, exc.message)

        entries: list[ProjectEntry] = []
        seen: dict[int, int] = {}
        for index, item in enumerate(images):
            entry = _parse_entry(item, index, file)
            if entry.entry_id in seen:
                raise InputError(
                    f"duplicate entryID {entry.entry_id} (also image {seen[entry.entry_id]})",
                    path=file,
                    item=f"image {index}",
                )
            seen[entry.entry_id] = index
            self._resolve(entry)
            entries.append(entry)
        self.entries: list[ProjectEntry] = entries
        self.last_id: int = max([last_id or 0, *seen])

    def _resolve(self, entry: ProjectEntry) -> None:
        """Find the entry's image on this machine, as QuPath would."""
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
        if self.old_folder is None:
            entry.notes.append("the project has no stored uri to resolve moved images with")
            return
        if PurePath(self.old_folder) == PurePath(self.folder):
            entry.notes.append("the project is where it was saved, so nothing to relocate")
            return
        moved = relocate(stored, self.old_folder, self.folder)
        if moved is None:
            entry.notes.append(
                f"not on the drive/root of the project's old folder {self.old_folder}"
            )
            return
        if moved not in entry.tried_paths:
            entry.tried_paths.append(moved)
        if moved.exists():
            entry.image_path = moved
            entry.notes.append(f"found relative to the moved project (was {stored})")
            log.info("%s: %s found at %s (project moved)", self.file, entry.label(), moved)
        else:
            entry.notes.append(
                f"the last path keeps its place relative to the project's old folder "
                f"{self.old_folder}"
            )

    # --------------------------------------------------------------- accessors
    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ProjectEntry]:
        return iter(self.entries)

    def __repr__(self) -> str:
        return f"QuPathProject({str(self.file)!r}, version={self.version!r}, {len(self)} entries)"

    @property
    def classes(self) -> dict[str, RGB]:
        """Project classes from ``classifiers/classes.json``: name -> (r, g, b).

        A class stored without a colour gets QuPath's default colour for its name.
        Empty when the file is absent.
        """
        if self._classes is None:
            self._classes = _read_classes(self.folder / "classifiers" / "classes.json")
        return dict(self._classes)

    def entry(self, id_or_name: int | str | ProjectEntry) -> ProjectEntry:
        """The entry with this ``entryID`` (int) or ``imageName`` (str).

        A string of digits that names no entry is tried as an id.

        Raises:
            InputError: no such entry, or the name is shared by several entries.
        """
        if isinstance(id_or_name, ProjectEntry):
            return id_or_name
        if isinstance(id_or_name, str):
            found = [e for e in self.entries if e.name == id_or_name]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                ids = ", ".join(str(e.entry_id) for e in found)
                raise InputError(
                    f"several entries have this name (ids {ids}); use the id",
                    path=self.file,
                    item=f"entry {id_or_name!r}",
                )
            if not id_or_name.strip().isdigit():
                raise InputError(
                    "no entry with this name", path=self.file, item=f"entry {id_or_name!r}"
                )
            id_or_name = int(id_or_name)
        if _is_int(id_or_name):
            for entry in self.entries:
                if entry.entry_id == id_or_name:
                    return entry
            ids = ", ".join(str(e.entry_id) for e in self.entries) or "none"
            raise InputError(
                f"no entry with this id (ids: {ids})", path=self.file, item=f"entry {id_or_name}"
            )
        raise TypeError(f"entry id or name expected, not {type(id_or_name).__name__}")

    def missing_images(self) -> list[ProjectEntry]:
        """Entries whose image file was not found on this machine."""
        return [e for e in self.entries if e.image_path is None]

    def missing_images_report(self) -> str:
        """Readable lines naming every missing image and each path tried ("" if none)."""
        missing = self.missing_images()
        if not missing:
            return ""
        lines = [
            f"{len(missing)} of {len(self.entries)} images of {self.file} were not found"
            + (f" (project saved at {self.uri})" if self.uri else "")
            + ":"
        ]
        for entry in missing:
            lines.append(f"  {entry.label()}: {entry.uri if entry.uri else entry.uris or '-'}")
            for tried in entry.tried_paths:
                lines.append(f"    tried {tried}")
            for note in entry.notes:
                lines.append(f"    ({note})")
        return "\n".join(lines)

    # ------------------------------------------------------------- annotations
    def paquo_status(self) -> tuple[bool, str]:
        """Whether annotations are read through paquo, and why (not)."""
        if self._paquo_state is None:
            if self._use_paquo is False:
                self._paquo_state = (False, "paquo disabled (use_paquo=False)")
            else:
                from histosynth.integration.qupath.paquo_backend import qupath_available

                self._paquo_state = qupath_available()
        return self._paquo_state

    def geojson_candidates(self, entry: int | str | ProjectEntry) -> list[Path]:
        """GeoJSON files that may hold the entry's annotations, in the order tried."""
        entry = self.entry(entry)
        folder = self.folder / "annotations"
        names = [f"{entry.entry_id}.geojson"]
        if entry.name and PurePath(entry.name).name == entry.name and entry.name not in (".", ".."):
            names.append(f"{entry.name}.geojson")
            stem = PurePath(entry.name).stem
            if stem and stem != entry.name:
                names.append(f"{stem}.geojson")
        return [folder / name for name in dict.fromkeys(names)]

    def annotation_source(self, entry: int | str | ProjectEntry) -> Path | None:
        """Where the entry's annotations come from: ``data/<id>/data.qpdata`` (paquo),
        an exported GeoJSON file, or ``None``."""
        entry = self.entry(entry)
        qpdata = self.folder / "data" / str(entry.entry_id) / "data.qpdata"
        if qpdata.is_file():
            available, reason = self.paquo_status()
            if available:
                return qpdata
            if self._use_paquo:
                raise InputError(f"cannot read QuPath objects: {reason}", path=qpdata)
        for candidate in self.geojson_candidates(entry):
            if candidate.is_file():
                return candidate
        return None

    def annotations(
        self, entry: int | str | ProjectEntry, classes: Iterable[str] | None = None
    ) -> list[Annotation]:
        """The entry's annotations (level-0 pixels), optionally only of ``classes``
        (a class and the classes derived from it). ``[]`` with a warning when there
        is no source."""
        entry = self.entry(entry)
        wanted = None if classes is None else list(classes)
        source = self.annotation_source(entry)
        if source is None:
            candidates = self.geojson_candidates(entry)
            tried = ", ".join(str(p.relative_to(self.folder)) for p in candidates)
            qpdata = self.folder / "data" / str(entry.entry_id) / "data.qpdata"
            why = (
                f"its objects are in {qpdata.relative_to(self.folder)}, which needs QuPath: "
                f"{self.paquo_status()[1]}"
                if qpdata.is_file()
                else "it has no QuPath data file either"
            )
            log.warning(
                "%s: skipping %s: no annotations found (none of %s exists; %s)",
                self.file,
                entry.label(),
                tried,
                why,
            )
            return []
        if source.suffix == ".qpdata":
            from histosynth.integration.qupath.paquo_backend import read_annotations_with_paquo

            found = read_annotations_with_paquo(self.file, entry.entry_id, wanted)
        else:
            from histosynth.integration.geojson import read_annotations

            found = read_annotations(source, classes=wanted)
        project_classes = self.classes
        for annotation in found:
            if annotation.color is None and annotation.class_name in project_classes:
                annotation.color = project_classes[annotation.class_name]
        return found


# ---------------------------------------------------------------------- helpers
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or_none(value: Any) -> int | None:
    return value if _is_int(value) else None


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except IsADirectoryError:
        raise InputError("is a folder, not a file", path=path) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", path=path
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object, found {type(data).__name__}", path=path)
    return data


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


def _parse_entry(item: Any, index: int, file: Path) -> ProjectEntry:
    where = f"image {index}"
    if not isinstance(item, dict):
        raise InputError(
            f"expected a JSON object, found {type(item).__name__}", path=file, item=where
        )
    for key in ("serverBuilder", "entryID"):
        if key not in item:
            raise InputError(f"missing key {key!r}", path=file, item=where)
    entry_id = item["entryID"]
    if not _is_int(entry_id):
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


def _read_classes(path: Path) -> dict[str, RGB]:
    """``classes.json`` like QuPath's ``loadPathClasses``; a class without a colour gets
    the colour QuPath gives it (``default_color``)."""
    from histosynth.integration.geojson import argb_to_rgb, default_color

    if not path.is_file():
        return {}
    data = _read_json_object(path)
    items = data.get("pathClasses")
    if items is None:
        return {}
    if not isinstance(items, list):
        raise InputError("'pathClasses' must be a list", path=path)
    classes: dict[str, RGB] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InputError(
                "expected an object with a string 'name'", path=path, item=f"class {index}"
            )
        color = item.get("color")
        if color is None:
            classes[item["name"]] = default_color(item["name"])
            continue
        if not _is_int(color) or not -(2**31) <= color < 2**32:
            raise InputError(
                f"'color' must be a packed ARGB integer, not {color!r}",
                path=path,
                item=f"class {item['name']!r}",
            )
        classes[item["name"]] = argb_to_rgb(color)
    return classes
