"""Export a reviewed run as an image-folder training dataset.

Layout (Hugging Face ``imagefolder``; also plain files that any loader reads)::

    OUT/
      train/<id>.png            the tile images (byte copies of RUN/images/<id>.png)
      train/metadata.csv        one row per image, ``file_name`` first (METADATA_COLUMNS)
      masks/<id>.png            single channel uint8, 0 / 255, same size as the image
      annotations/<id>.geojson  the tile's QuPath GeoJSON, tile pixels
      README.md                 what the folder holds and what each column means
      export.json               the same, machine-readable, plus counts and the source run

``file_name`` is relative to the folder of ``metadata.csv`` (``train/``), the
``imagefolder`` rule; ``mask_path`` and ``annotation_path`` are relative to ``OUT``.
``datasets.load_dataset("imagefolder", data_dir=OUT)`` gives one ``train`` split with an
``image`` column and the metadata columns (``mask_path`` as a string; see README.md for
turning it into an image column). The mask column is deliberately not called
``mask_file_name``: recent ``datasets`` versions load every ``*_file_name`` column as an
image and refuse paths outside ``train/``, while older versions refuse image files under
``train/`` that ``metadata.csv`` does not list as ``file_name`` — so masks inside or outside
``train/`` under that name would break one or the other.

Only ``accepted`` tiles are exported (with ``include_pending``, ``pending`` ones too);
``rejected`` tiles never are, nor tiles that failed the content check (``qc`` =
``fail: …``) unless ``include_qc_failed``. A tile whose mask does not match its pixels —
a variation (``mask_source`` ``none``; ``reference`` in runs of histosynth before 0.2,
whose reference masks are left out with a warning) — is exported as a classification
sample: its class, no mask (``mask_path`` empty, ``has_mask`` false). Each image is
checked against the index's ``image_sha256`` before it is written. The export is atomic:
everything goes into a temporary folder beside ``OUT`` that is renamed to ``OUT`` at the
end, so ``OUT`` is either complete or absent.

``slide_group`` is the column to split on without leakage (all tiles of one group in the
same split). It is the file stem of the slide the tile's *vessel* came from: the donor's
slide for an inpainting tile (``donor_image``, when the run has that column), else
``source_image``. The vessel is what the label (mask, class) describes and what a
segmentation or classification model learns from, so two tiles showing the same donor
vessel on different backgrounds must not land on both sides of a split. The background
slide of an inpainting tile is kept as ``source_image``; for a strict split by every slide
a tile touches, group on both columns (connected components of ``slide_group`` and
``source_image``).

Example::

    result = export_training_set("out/run", "out/dataset", include_pending=False)
    result.count        # tiles written
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from histosynth.common.files import fsync_dir
from histosynth.integration.content_check import qc_failed
from histosynth.integration.dataset import read_index, untrained_tile_ids, validate_tile_id
from histosynth.integration.decisions import rows_with_logged_decisions
from histosynth.integration.errors import InputError
from histosynth.integration.images import png_to_jpeg
from histosynth.integration.run_folder import has_mask, review_status
from histosynth.integration.splits import slide_group

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("png", "jpg")
"""``png``: the run's lossless PNG, byte for byte. ``jpg``: re-encoded, quality 95 (lossy,
smaller; the masks stay PNG)."""

JPEG_QUALITY = 95

METADATA_COLUMNS: dict[str, str] = {
    "file_name": "image file, relative to train/ (the folder of metadata.csv)",
    "id": "tile id in the source run (file stem)",
    "mask_path": "mask file, relative to the dataset folder: masks/<id>.png, single "
    "channel uint8, 0 = background, 255 = vessel of class_name, same size as the image; "
    "empty for a classification-only tile (has_mask false)",
    "has_mask": "true when the tile has a segmentation mask that matches its pixels; false "
    "for a variation (generated from a reference: its class, no mask; use it for "
    "classification only)",
    "annotation_path": "QuPath GeoJSON of the tile (tile pixels), relative to the dataset "
    "folder: annotations/<id>.geojson; empty when the run had none",
    "class_name": "QuPath class of the tile's vessel, e.g. 'Vessel: Invasive'",
    "synthesis_type": "extracted (real tile), inpainting (a real vessel inserted into a real "
    "background and harmonised by diffusion) or variation (generated from a real reference)",
    "review_status": "accepted, or pending when exported with --include-pending",
    "source_image": "slide of the tile (for inpainting: of the background)",
    "source_entry_id": "QuPath project entry id of source_image (may be empty)",
    "donor_image": "slide of the inserted or referenced vessel (empty for extracted tiles or "
    "when the run does not record it)",
    "slide_group": "grouping key for leakage-free splits: file stem of the vessel's slide "
    "(donor_image when present, else source_image)",
    "tile_x": "tile's top-left x in level-0 pixels of source_image",
    "tile_y": "tile's top-left y in level-0 pixels of source_image",
    "tile_size": "tile width and height in pixels",
    "mpp": "resolution of the tile in µm/px",
    "model": "diffusion model (empty for extracted tiles)",
    "adapter": "style adapter (LoRA), if any",
    "seed": "random seed of the synthesis",
    "image_sha256": "SHA-256 of the source PNG in the run (equal to the exported file for png)",
    "engine_trained": "false when the tile's pixels came from an UNTRAINED engine (the tiny "
    "preset: not histology, do not train on it); true for a trained engine; empty for "
    "extracted tiles and seams harmonised without a model",
    "qc": "the content check of the tile (pass, or fail: <reasons> when exported with "
    "--include-qc-failed); empty for extracted tiles",
}
"""Columns of ``train/metadata.csv``, in order, with their meaning."""

Progress = Callable[[Iterable, int], Iterable]


@dataclass
class ExportResult:
    """What :func:`export_training_set` wrote.

    Attributes:
        out_dir: the dataset folder.
        count: tiles written.
        by_status: written tiles per review status.
        by_class: written tiles per class name.
        excluded: tiles left out, per review status (``rejected`` always, ``pending``
            unless included).
    """

    out_dir: Path
    count: int
    by_status: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def metadata_path(self) -> Path:
        return self.out_dir / "train" / "metadata.csv"


def run_file(run: Path, rel: str, what: str, tile_id: str) -> Path:
    """A file of the run named by the index, which must stay inside the run folder
    (InputError naming the file and ``tile_id`` otherwise, or when it is missing)."""
    posix = PurePosixPath(rel.replace("\\", "/"))
    parts = posix.parts
    if not parts or posix.is_absolute() or ".." in parts or ":" in parts[0]:
        raise InputError(
            f"{what} path {rel!r} is not a path inside the run folder",
            path=run / "index.csv",
            item=tile_id,
        )
    path = run / Path(*posix.parts)
    if not path.is_file():
        raise InputError(f"{what} file is missing", path=path, item=tile_id)
    root = run.resolve()
    if root not in path.resolve().parents:  # a link leading out of the run
        raise InputError(
            f"{what} file is a link to {path.resolve()}, outside the run folder; not exported",
            path=path,
            item=tile_id,
        )
    return path


def export_training_set(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    include_pending: bool = False,
    image_format: str = "png",
    progress: Progress | None = None,
    include_qc_failed: bool = False,
) -> ExportResult:
    """Write the run's accepted tiles (and pending ones with ``include_pending``; never
    rejected ones) to ``out_dir`` as an image-folder dataset; see the module docstring.

    Args:
        run_dir: the run folder (with ``index.csv``).
        out_dir: the dataset folder to create; must not exist, or be an empty folder.
        include_pending: also export tiles nobody has reviewed yet.
        include_qc_failed: also export tiles that failed the content check.
        image_format: ``png`` (exact copies) or ``jpg`` (quality 95).
        progress: ``progress(items, total) -> items``, e.g. a tqdm bar.

    Raises:
        InputError: not a run folder, ``out_dir`` exists and is not an empty folder, an
            image or mask is missing, or an image's SHA-256 differs from the index (the
            file is named). Nothing is left behind in that case.
    """
    run = Path(run_dir)
    out = Path(out_dir)
    fmt = image_format.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in IMAGE_FORMATS:
        raise InputError(
            f"image format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}",
            item="image_format",
        )
    rows = rows_with_logged_decisions(run, read_index(run))
    check_out(out)
    if rows and "mask_sha256" not in rows[0]:
        log.warning(
            "%s: this run records no mask / annotation hashes (written before runs did): "
            "only the images are checked against the index", run / "index.csv",
        )

    selected, excluded = select_rows(
        run, rows, include_pending=include_pending, include_qc_failed=include_qc_failed
    )
    unaligned = [r for r in selected if r.get("mask_source", "").strip().lower() == "reference"]
    if unaligned:
        log.warning(
            "%d variation tile(s) of this run carry their reference's mask, which does not "
            "match their pixels (runs before histosynth 0.2): exported without it, as "
            "classification samples (has_mask false)",
            len(unaligned),
        )
    has_donor = bool(rows) and "donor_image" in rows[0]
    untrained = untrained_tile_ids(run, selected)
    if untrained:
        log.warning(
            "%d of the %d exported tiles were made by an UNTRAINED engine (tiny preset): "
            "their pixels are not histology; the engine_trained column marks them false",
            len(untrained),
            len(selected),
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; give what mkdir would
        (tmp / "train").mkdir()
        (tmp / "masks").mkdir()
        records = []
        iterator: Iterable = progress(selected, len(selected)) if progress else selected
        for row in iterator:
            records.append(_export_row(run, tmp, row, fmt, untrained))
        _write_metadata(tmp / "train" / "metadata.csv", records)
        result = ExportResult(
            out_dir=out,
            count=len(records),
            by_status=dict(sorted(Counter(review_status(r) for r in records).items())),
            by_class=dict(sorted(Counter(r["class_name"] for r in records).items())),
            excluded=dict(sorted(excluded.items())),
        )
        info = _info(run, result, include_pending, fmt, has_donor)
        _write_text(tmp / "export.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        _write_text(tmp / "README.md", _readme(info))
        move_into_place(tmp, out, ("train", "masks", "annotations", "."))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def select_rows(
    run: Path,
    rows: list[dict[str, str]],
    *,
    include_pending: bool,
    include_qc_failed: bool,
    real_unless_rejected: bool = False,
) -> tuple[list[dict[str, str]], Counter]:
    """The rows an export writes, and the count left out per reason: ``accepted`` rows
    (with ``include_pending``, ``pending`` ones too; with ``real_unless_rejected``, every
    ``extracted`` row not rejected), never ``rejected`` ones, nor (unless
    ``include_qc_failed``) rows that failed the content check.

    Raises:
        InputError: two rows share an id (naming the index and the id).
    """
    wanted = {"accepted", "pending"} if include_pending else {"accepted"}
    seen: set[str] = set()
    for row in rows:
        if row.get("id", "") in seen:
            raise InputError(
                "two rows of the index have this id (their files would overwrite each other)",
                path=run / "index.csv",
                item=repr(row.get("id", "")),
            )
        seen.add(row.get("id", ""))
    unknown = sorted({review_status(r) for r in rows} - {"pending", "accepted", "rejected"})
    if unknown:
        log.warning(
            "%s: review status(es) %s are none of pending, accepted, rejected: those tiles "
            "are left out",
            run / "index.csv",
            ", ".join(repr(u) for u in unknown),
        )

    def kept(row: dict[str, str]) -> bool:
        status = review_status(row)
        if real_unless_rejected and (row.get("synthesis_type") or "extracted") == "extracted":
            return status in {"accepted", "pending"}
        return status in wanted

    excluded = Counter(review_status(row) for row in rows if not kept(row))
    selected = [row for row in rows if kept(row)]
    if not include_qc_failed:
        failed = [row for row in selected if qc_failed(row.get("qc"))]
        if failed:
            excluded["failed the content check"] = len(failed)
            selected = [row for row in selected if not qc_failed(row.get("qc"))]
    return selected, excluded


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out(out: Path) -> None:
    """Refuse an output path that exists and is not an empty folder (InputError)."""
    if out.is_dir():
        if any(out.iterdir()):
            raise InputError(
                "the output folder exists and is not empty; choose a new folder", path=out
            )
    elif out.exists() or out.is_symlink():
        raise InputError("the output path exists and is not a folder", path=out)


def _export_row(
    run: Path, tmp: Path, row: dict[str, str], fmt: str, untrained: set[str]
) -> dict[str, str]:
    tile_id = row.get("id", "")
    try:
        validate_tile_id(tile_id)
    except InputError as exc:
        raise InputError(exc.message, path=run / "index.csv", item=repr(tile_id)) from exc
    image_path = run_file(run, row.get("image_path", ""), "image", tile_id)
    masked = has_mask(row)
    mask_path = run_file(run, row.get("mask_path", ""), "mask", tile_id) if masked else None
    data = checked_bytes(image_path, row, "image_sha256", tile_id)
    file_name = f"{tile_id}.{fmt}"
    if fmt == "jpg":
        data = _to_jpeg(data, image_path, tile_id)
    _write_bytes(tmp / "train" / file_name, data)
    if mask_path is not None:  # the bytes checked are the bytes written
        _write_bytes(tmp / "masks" / f"{tile_id}.png",
                     checked_bytes(mask_path, row, "mask_sha256", tile_id))
    annotation_name = ""
    # a tile without a matching mask has no outline either (an older run's variation
    # GeoJSON held its reference's unaligned outline)
    annotation_rel = row.get("annotation_path", "") if masked else ""
    if annotation_rel:
        annotation = run_file(run, annotation_rel, "annotation", tile_id)
        annotation_name = f"annotations/{tile_id}.geojson"
        (tmp / "annotations").mkdir(exist_ok=True)
        _write_bytes(tmp / annotation_name,
                     checked_bytes(annotation, row, "annotation_sha256", tile_id))
    record = {
        "file_name": file_name,
        "id": tile_id,
        "mask_path": f"masks/{tile_id}.png" if masked else "",
        "has_mask": "true" if masked else "false",
        "review_status": review_status(row),
        "annotation_path": annotation_name,
        "slide_group": slide_group(row),
        "engine_trained": _engine_trained(row, untrained),
    }
    for column in METADATA_COLUMNS:
        if column not in record:
            record[column] = row.get(column, "")
    return {column: record[column] for column in METADATA_COLUMNS}


def checked_bytes(path: Path, row: dict[str, str], column: str, tile_id: str) -> bytes:
    """The file's bytes, whose SHA-256 must be the one the index recorded in ``column``
    (a run written before these hash columns existed: unchecked)."""
    data = _read_regular(path, tile_id)
    if column not in row:
        return data
    digest = hashlib.sha256(data).hexdigest()
    expected = (row.get(column) or "").strip().lower()
    if digest != expected:
        raise InputError(
            f"SHA-256 {digest} differs from the index's {column} ({expected or 'empty'}); "
            "the file changed after the run wrote it",
            path=path,
            item=tile_id,
        )
    return data


def _read_regular(path: Path, tile_id: str) -> bytes:
    """The bytes of a regular file (a FIFO or device named by a crafted index would block
    or never end)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path, item=tile_id) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError("not a regular file; not exported", path=path, item=tile_id)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def _engine_trained(row: dict[str, str], untrained: set[str]) -> str:
    if row.get("id", "") in untrained:
        return "false"
    unpainted = row.get("harmonise", "") in ("multiband", "none") and (
        row.get("background_kind", "") != "synthetic"
    )
    if row.get("synthesis_type", "") in ("", "extracted") or unpainted:
        return ""
    return "true"


def _to_jpeg(png: bytes, path: Path, tile_id: str) -> bytes:
    return png_to_jpeg(png, JPEG_QUALITY, path=path, item=tile_id)


def _write_metadata(path: Path, records: list[dict[str, str]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(METADATA_COLUMNS), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(records)
    _write_bytes(path, buffer.getvalue().encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def move_into_place(tmp: Path, out: Path, folders: Iterable[str]) -> None:
    """An export built in ``tmp`` made the folder ``out``: ``folders`` of ``tmp`` flushed,
    ``out`` checked again (someone may have written there meanwhile), renamed (replaces an
    empty folder, fails on a non-empty one) and its parent flushed."""
    for folder in folders:
        fsync_dir(tmp / folder)
    check_out(out)
    try:
        os.rename(tmp, out)
    except OSError as exc:
        raise InputError(
            f"cannot move the export into place: {exc.strerror or exc}", path=out
        ) from exc
    fsync_dir(out.parent)


def _info(
    run: Path, result: ExportResult, include_pending: bool, fmt: str, has_donor: bool
) -> dict:
    run_info: dict = {}
    try:
        stored = json.loads((run / "run.json").read_text(encoding="utf-8"))
        run_info = {key: stored.get(key) for key in ("model", "adapter", "config") if key in stored}
    except (OSError, ValueError):
        pass
    from histosynth import __version__

    return {
        "format": "imagefolder",
        "histosynth_version": __version__,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "source_run": str(run.resolve()),
        "source_run_info": run_info,
        "review_statuses": ["accepted", "pending"] if include_pending else ["accepted"],
        "image_format": fmt,
        "count": result.count,
        "by_status": result.by_status,
        "by_class": result.by_class,
        "excluded": result.excluded,
        "slide_group_source": "donor_image, else source_image" if has_donor else "source_image",
        "layout": {
            "train/<id>." + fmt: "image (RGB)",
            "train/metadata.csv": "one row per image",
            "masks/<id>.png": "mask (uint8 0/255)",
            "annotations/<id>.geojson": "QuPath GeoJSON of the tile, tile pixels",
        },
        "columns": METADATA_COLUMNS,
    }


def _readme(info: dict) -> str:
    statuses = " and ".join(info["review_statuses"])
    columns = "\n".join(f"| `{name}` | {text} |" for name, text in info["columns"].items())
    classes = "\n".join(f"- {name or '(no class)'}: {n}" for name, n in info["by_class"].items())
    excluded = ", ".join(f"{n} {status}" for status, n in info["excluded"].items()) or "none"
    return f"""# histosynth training set

{info["count"]} tiles ({statuses}) exported from the histosynth run `{info["source_run"]}`
on {info["exported_at"]} by histosynth {info["histosynth_version"]}. Rejected tiles are
never exported. Left out: {excluded}.

By class:
{classes or "- (none)"}

## Layout

```
train/<id>.{info["image_format"]:<15}image, RGB
train/metadata.csv        one row per image, file_name first
masks/<id>.png            mask: single channel uint8, 0 = background, 255 = vessel
annotations/<id>.geojson  QuPath GeoJSON of the tile, in tile pixels
export.json               this description, machine-readable
```

`file_name` is relative to `train/`; `mask_path` and `annotation_path` are relative to
this folder. With Hugging Face datasets:

```python
import datasets
root = "<this folder>"
train = datasets.load_dataset("imagefolder", data_dir=root)["train"]
train = train.map(lambda row: {{"mask": f"{{root}}/{{row['mask_path']}}"}})
train = train.cast_column("mask", datasets.Image())   # masks as images too
```

or with any CSV reader: `train/metadata.csv`.

## Splitting without leakage

Split on `slide_group` (all tiles of one group on the same side): it is the file stem of
the slide the tile's vessel came from ({info["slide_group_source"]}). An inpainting tile
also shows tissue of its background slide (`source_image`); for a split that separates
every slide a tile touches, group on the connected components of `slide_group` and
`source_image`.

## Columns of train/metadata.csv

| column | meaning |
| --- | --- |
{columns}
"""
