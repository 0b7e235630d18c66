"""Read a QuPath project (``project.qpproj``) without QuPath, and add entries to it.

What QuPath's ``DefaultProject`` loads: the image entries (server builder URI, id, name,
description, metadata, tags), the project classes (``classifiers/classes.json``) and,
for each entry, its annotations - through paquo when a QuPath installation is found,
otherwise from GeoJSON exported beside the project (``annotations/<entryID>.geojson``).

Writing (only while the project is not open in QuPath): :meth:`QuPathProject.add_image_entry`
/ :meth:`QuPathProject.add_synthetic_entry` queue new entries and :meth:`QuPathProject.save`
appends them to the text of ``project.qpproj`` as QuPath's Gson would write them, keeping
every other byte of the file (original entries, key order, formatting), updates ``lastID``
and ``modifyTimestamp``, keeps ``project.qpproj.backup`` and replaces the file atomically.
It refuses when the file changed on disk since it was read.

The class holds the in-memory state; its parts live beside it: one entry and where its
image is (``qupath/project_entry.py``), the file on disk - fingerprint, change detection,
backup and atomic replace (``qupath/project_file.py``), the classes
(``qupath/project_classes.py``) and the Gson text writer (``qupath/gson.py``).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from histosynth.integration.annotations import RGB, Annotation
from histosynth.integration.errors import InputError
from histosynth.integration.locks import project_lock
from histosynth.integration.qupath.entries import (
    META_ID,
    META_RUN,
    META_SYNTHETIC,
    SYNTHETIC_TAGS,
    synthetic_image_name,
    synthetic_metadata,
)
from histosynth.integration.qupath.gson import (
    append_entries_text,
    check_append,
    check_metadata_edit,
    set_metadata_text,
)
from histosynth.integration.qupath.project_classes import read_project_classes
from histosynth.integration.qupath.project_entry import (
    ProjectEntry,
    is_json_int,
    locate_image,
    parse_entry,
)
from histosynth.integration.qupath.project_file import (
    BACKUP_SUFFIX,
    PROJECT_FILE,
    changed_since,
    check_unchanged,
    locate_project,
    parse_json_object,
    read_with_fingerprint,
    replace_with_backup,
)
from histosynth.integration.qupath.server import (
    bioformats_server_builder,
)
from histosynth.integration.qupath.uris import uri_to_path

log = logging.getLogger(__name__)

__all__ = [
    "BACKUP_SUFFIX",
    "PROJECT_FILE",
    "ProjectEntry",
    "QuPathProject",
    "locked_project",
]


def _int_or_none(value: Any) -> int | None:
    return value if is_json_int(value) else None


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
        self.file: Path = self.locate(path)
        self.folder: Path = self.file.parent
        self._use_paquo = use_paquo
        self._paquo_state: tuple[bool, str] | None = None
        self._classes: dict[str, RGB] | None = None
        self._pending: list[dict[str, Any]] = []
        #: position in ``images`` → {metadata key: new value}, written by :meth:`save`
        self._metadata_edits: dict[int, dict[str, str]] = {}
        data, self._disk = read_with_fingerprint(self.file)
        self._data: bytes = data
        self.raw: dict[str, Any] = parse_json_object(data, self.file)
        self._parse()

    @staticmethod
    def locate(path: str | os.PathLike) -> Path:
        """The absolute path of the ``project.qpproj`` that ``path`` (the file or its
        folder) names; InputError when there is none."""
        return locate_project(path)

    # ------------------------------------------------------------------ reading
    def _parse(self) -> None:
        raw, file = self.raw, self.file
        version = raw.get("version")
        if version is not None and not isinstance(version, str):
            raise InputError(f"'version' must be a string, not {version!r}", path=file)
        last_id = raw.get("lastID")
        if last_id is not None and not is_json_int(last_id):
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
            entry = parse_entry(item, index, file)
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
        locate_image(entry, self.old_folder, self.folder)
        if entry.relocated:
            log.info(
                "%s: %s found at %s (project moved)", self.file, entry.label(), entry.image_path
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
            self._classes = read_project_classes(self.folder / "classifiers" / "classes.json")
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
        if is_json_int(id_or_name):
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

    # ----------------------------------------------------------------- writing
    @property
    def pending(self) -> list[ProjectEntry]:
        """Entries added since the last :meth:`save` (not yet on disk)."""
        ids = {item["entryID"] for item in self._pending}
        return [e for e in self.entries if e.entry_id in ids]

    def synthetic_entries(self, run: str | None = None) -> list[ProjectEntry]:
        """Entries histosynth added (``histosynth.synthetic`` = ``"true"``), of ``run`` if
        given."""
        return [
            e
            for e in self.entries
            if e.metadata.get(META_SYNTHETIC) == "true"
            and (run is None or e.metadata.get(META_RUN) == run)
        ]

    def synthetic_entry(self, run: str, tile_id: str) -> ProjectEntry | None:
        """The entry holding tile ``tile_id`` of run ``run`` (by its metadata), if any."""
        for entry in self.entries:
            meta = entry.metadata
            if meta.get(META_RUN) == run and meta.get(META_ID) == tile_id:
                return entry
        return None

    def unknown_sidecars(self) -> list[Path]:
        """GeoJSON files in ``annotations/`` that belong to no entry (neither
        ``<entryID>.geojson`` of an existing entry nor ``<imageName>.geojson``)."""
        folder = self.folder / "annotations"
        if not folder.is_dir():
            return []
        known = {path.name for e in self.entries for path in self.geojson_candidates(e)}
        return sorted(
            path
            for path in folder.iterdir()
            if path.suffix.lower() == ".geojson" and path.is_file() and path.name not in known
        )

    def changed_on_disk(self) -> str | None:
        """Why ``project.qpproj`` is no longer the file this object read (``None`` if it is
        the same: modification time, size and SHA-256 unchanged)."""
        return changed_since(self.file, self._disk)

    def check_unchanged(self) -> None:
        """Raise :class:`InputError` when ``project.qpproj`` changed since it was read."""
        check_unchanged(self.file, self._disk)

    def add_image_entry(
        self,
        image_path: str | os.PathLike,
        *,
        width: int,
        height: int,
        mpp: float,
        image_name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        tags: Sequence[str] = (),
        levels: Sequence[tuple[int, int]] | None = None,
        tile_size: int = 256,
    ) -> ProjectEntry:
        """Queue a new image entry (written by :meth:`save`) and return it.

        The server builder is the one QuPath records for a TIFF opened with Bio-Formats:
        ``{"builderType": "uri", "providerClassName": BIOFORMATS_BUILDER, "uri": "file:/...",
        "args": ["--series", "0"], "metadata": {...}}`` with the image's size, pyramid
        ``levels`` ((width, height) per level, level 0 first), RGB uint8 channels and the
        pixel size ``mpp`` (µm/px), so QuPath shows the right calibration even before
        reading the file. The entry gets ``entryID`` = largest id so far + 1 and a fresh
        ``randomizedName``. ``tags`` are written always (QuPath < 0.6 ignores them).

        Raises:
            InputError: a bad size, pixel size, metadata value or tag.
        """
        path = Path(image_path).absolute()
        label = str(path)
        for key, value in (("width", width), ("height", height), ("tile_size", tile_size)):
            if not is_json_int(value) or value <= 0:
                raise InputError(f"{key} must be a positive integer, not {value!r}", item=label)
        if not isinstance(mpp, int | float) or not math.isfinite(mpp) or mpp <= 0:
            raise InputError(f"pixel size must be a positive number of µm, not {mpp!r}", item=label)
        meta = dict(metadata or {})
        for key, value in meta.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InputError(
                    f"metadata must map strings to strings, not {key!r}: {value!r}", item=label
                )
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise InputError(f"tags must be a list of strings, not {tags!r}", item=label)
        for key, value in (("image_name", image_name), ("description", description)):
            if value is not None and not isinstance(value, str):
                raise InputError(f"{key} must be a string, not {value!r}", item=label)
        level_list = [(width, height)] if not levels else [(int(w), int(h)) for w, h in levels]
        if level_list[0] != (width, height):
            raise InputError(
                f"level 0 is {level_list[0]}, the image is {(width, height)}", item=label
            )
        entry_id = self.last_id + 1
        item: dict[str, Any] = {
            "serverBuilder": bioformats_server_builder(
                path, width, height, float(mpp), level_list, tile_size
            ),
            "entryID": entry_id,
            "randomizedName": str(uuid.uuid4()),
            "imageName": image_name if image_name is not None else path.name,
        }
        if description is not None:
            item["description"] = description
        item["metadata"] = meta
        item["tags"] = list(dict.fromkeys(tags))
        entry = parse_entry(item, len(self.entries), self.file)
        self._resolve(entry)
        self.entries.append(entry)
        self._pending.append(item)
        self.last_id = entry_id
        return entry

    def add_synthetic_entry(
        self,
        image_path: str | os.PathLike,
        *,
        run: str,
        tile_id: str,
        synthesis_type: str,
        width: int,
        height: int,
        mpp: float,
        source_entry_id: str = "",
        description: str | None = None,
        review_status: str = "pending",
        levels: Sequence[tuple[int, int]] | None = None,
        tile_size: int = 256,
    ) -> ProjectEntry:
        """Queue the entry of one synthetic tile (contracts.md, "Project write-back").

        ``imageName`` = ``synthetic-<run>-<tile_id>``; metadata (all strings)
        ``histosynth.synthetic`` = ``"true"``, ``histosynth.run``, ``histosynth.id``,
        ``histosynth.synthesis_type``, ``histosynth.source_entry_id``, ``review_status``;
        tags ``histosynth``, ``synthetic``. Other arguments as :meth:`add_image_entry`.

        Raises:
            InputError: the tile is already in the project, or bad arguments.
        """
        for key, value in (("run", run), ("tile_id", tile_id), ("synthesis_type", synthesis_type)):
            if not isinstance(value, str) or not value or "\n" in value:
                raise InputError(
                    f"{key} must be a one-line string, not {value!r}", item=str(image_path)
                )
        existing = self.synthetic_entry(run, tile_id)
        if existing is not None:
            raise InputError(
                f"tile {tile_id!r} of run {run!r} is already in the project",
                path=self.file,
                item=existing.label(),
            )
        metadata = synthetic_metadata(run, tile_id, synthesis_type, source_entry_id, review_status)
        return self.add_image_entry(
            image_path,
            width=width,
            height=height,
            mpp=mpp,
            image_name=synthetic_image_name(run, tile_id),
            description=description,
            metadata=metadata,
            tags=SYNTHETIC_TAGS,
            levels=levels,
            tile_size=tile_size,
        )

    def set_metadata(self, entry: int | str | ProjectEntry, key: str, value: str) -> None:
        """Queue a new value of an existing metadata key of an entry (e.g. a reviewer's
        ``review_status``) for :meth:`save`, which changes that value's text only.

        Raises:
            InputError: the entry is unknown, has no such metadata key, or the value is
                not a string.
        """
        found = self.entry(entry)
        if not isinstance(value, str):
            raise InputError(f"a metadata value must be a string, not {value!r}", item=key)
        if key not in found.metadata:
            raise InputError(
                f"the entry has no metadata {key!r} to change",
                path=self.file,
                item=found.label(),
            )
        position = next(
            i for i, item in enumerate(self.raw["images"]) if item.get("entryID") == found.entry_id
        )
        self._metadata_edits.setdefault(position, {})[key] = value
        found.metadata[key] = value

    def save(self) -> Path | None:
        """Write the queued entries and metadata changes into ``project.qpproj``; return
        the backup's path (``None`` when nothing was queued).

        The new file is the old text with the entries appended to ``images`` (formatted
        like QuPath's Gson pretty printing, in the file's own indentation and line ends),
        ``lastID`` set to the largest entry id and ``modifyTimestamp`` to now (ms); every
        other byte is kept. The previous file is kept as ``project.qpproj.backup``; the new
        one replaces it atomically.

        Raises:
            InputError: the file changed on disk since it was read (QuPath may have it
                open), or it cannot be written.
        """
        if not self._pending and not self._metadata_edits:
            return None
        self.check_unchanged()
        bom = self._data.startswith(codecs.BOM_UTF8)
        old_text = self._data.decode("utf-8-sig")
        now = max(int(time.time() * 1000), (self.modify_timestamp or 0) + 1)
        raw = self.raw
        if self._metadata_edits:
            try:
                old_text = set_metadata_text(old_text, self._metadata_edits, now)
            except ValueError as exc:
                raise InputError(
                    f"cannot change metadata in this file: {exc}", path=self.file
                ) from None
            edited = json.loads(old_text)
            check_metadata_edit(self.raw, edited, self._metadata_edits)
            raw = edited
        new_text = old_text
        if self._pending:
            try:
                new_text = append_entries_text(old_text, self._pending, self.last_id, now)
            except ValueError as exc:
                raise InputError(
                    f"cannot append entries to this file: {exc}", path=self.file
                ) from None
        new_raw = json.loads(new_text)
        check_append(raw, new_raw, self._pending)
        new_data = (codecs.BOM_UTF8 if bom else b"") + new_text.encode("utf-8")
        backup, self._disk = replace_with_backup(self.file, self._data, new_data, self._disk)
        self._data = new_data
        self.raw = new_raw
        self.modify_timestamp = now
        self._pending = []
        self._metadata_edits = {}
        return backup


@contextlib.contextmanager
def locked_project(
    project_path: str | os.PathLike, *, wait_s: float = 0.0
) -> Iterator[QuPathProject]:
    """The project (``project.qpproj`` or its folder) read under its write lock, which is
    held until the ``with`` block ends; the lock is taken before the file is read, so no
    other writer changes it in between. GeoJSON annotations only (``use_paquo=False``).

    Raises:
        InputError: not a QuPath project, or the lock still held by another writer
            after ``wait_s`` seconds (:func:`~histosynth.integration.locks.project_lock`).
    """
    with project_lock(QuPathProject.locate(project_path), wait_s=wait_s):
        yield QuPathProject(project_path, use_paquo=False)
