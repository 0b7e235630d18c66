"""Leakage-free, slide-level folds of a labelled tile set (the downstream benchmark).

A tile set is an export (``train/metadata.csv``, see ``histosynth export``) or a run /
dataset folder (``index.csv``). Each tile is read as a :class:`LabelledTile` with the
slides it depends on: ``slide_group`` (the slide its *vessel* came from — the donor's for
an inpainted tile) and ``background_slide`` (the slide of its tissue, ``source_image``).

Folds (:func:`slide_folds`): the real tiles' slide groups are shuffled with the seed and,
for fold k of K, rotated by k·n/K; the first ``round(test·n)`` groups (at least one) are
the fold's test slides, the next ``round(val·n)`` (at least one) its validation slides,
the rest its training slides. So every fold holds each slide on one side only.

Three rules (:func:`fold_tiles`, checked again by :func:`leaks`):

1. real tiles follow their slide group: no group is on two sides of a fold;
2. validation and test hold real tiles only;
3. a synthetic tile is trained on only if *none* of its slides (vessel or background) is
   a validation or test slide of the fold; otherwise it is left out of that fold.

Units: none (file paths and slide names).
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from histosynth.common.files import atomic_write_json
from histosynth.integration.content_check import qc_failed
from histosynth.integration.dataset import INDEX_NAME, SYNTHETIC_TYPES, read_index
from histosynth.integration.errors import InputError
from histosynth.integration.files import read_input_bytes
from histosynth.integration.run_folder import has_mask

__all__ = [
    "SYNTHETIC_TYPES",
    "Fold",
    "FoldTiles",
    "LabelledTile",
    "fold_tiles",
    "leaks",
    "read_labelled_tiles",
    "read_split_file",
    "slide_folds",
    "slide_group",
    "slide_stem",
    "write_split_file",
]

METADATA = Path("train") / "metadata.csv"


def slide_stem(path: str) -> str:
    """The file stem of a slide path or ``file:`` URI (POSIX or Windows)."""
    if path.startswith("file:"):
        path = path[5:].lstrip("/") or path
    pure = PureWindowsPath(path) if "\\" in path else PurePosixPath(path)
    return pure.stem or pure.name


def slide_group(row: dict[str, str]) -> str:
    """The leakage-free grouping key of an index row: the stem of the vessel's slide
    (``donor_image`` when present, else ``source_image``), else the entry id."""
    for column in ("donor_image", "source_image"):
        value = (row.get(column) or "").strip()
        if value:
            stem = slide_stem(value)
            if stem:
                return stem
    for column in ("donor_entry_id", "source_entry_id"):
        value = (row.get(column) or "").strip()
        if value:
            return f"entry-{value}"
    return ""


@dataclass(frozen=True)
class LabelledTile:
    """One tile of a training set and the slides it depends on."""

    id: str
    image: Path
    mask: Path | None
    class_name: str
    synthesis_type: str
    slide_group: str
    background_slide: str

    @property
    def synthetic(self) -> bool:
        return self.synthesis_type in SYNTHETIC_TYPES

    @property
    def slides(self) -> frozenset[str]:
        """Every slide the tile's pixels or label came from."""
        return frozenset(s for s in (self.slide_group, self.background_slide) if s)


def _rows(folder: Path) -> tuple[list[dict[str, str]], Path, Path]:
    """Rows, the file they came from, and the folder their image paths are relative to."""
    metadata = folder / METADATA
    if metadata.is_file():
        text = read_input_bytes(metadata, max_bytes=1 << 30).decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        for row in rows:
            row["image_path"] = str(Path("train") / (row.get("file_name") or ""))
        return rows, metadata, folder
    if (folder / INDEX_NAME).is_file():
        return read_index(folder), folder / INDEX_NAME, folder
    raise InputError(
        f"neither {METADATA.as_posix()} (an export) nor {INDEX_NAME} (a run or dataset) here",
        path=folder,
    )


def read_labelled_tiles(
    folder: str | Path,
    *,
    need_masks: bool = False,
    left_out: list[tuple[str, str]] | None = None,
) -> list[LabelledTile]:
    """The tiles of an export or a run / dataset folder (rejected ones and ones that failed
    the content check left out).

    With ``need_masks`` (segmentation) a synthetic tile whose mask does not match its
    pixels — a variation (``has_mask`` false, ``mask_source`` none or reference) — is a
    classification sample only: it is left out, and ``(id, why)`` appended to ``left_out``.

    Raises:
        InputError: not a tile set, a row without an image file, a row without a slide,
            or (``need_masks``) a real tile without its mask — naming the file and the tile.
    """
    folder = Path(folder).absolute()
    rows, source, base = _rows(folder)
    tiles = []
    for row in rows:
        if (row.get("review_status") or "").strip().lower() == "rejected":
            continue
        tile_id = row.get("id") or Path(row.get("image_path", "")).stem
        if qc_failed(row.get("qc")):
            if left_out is not None:
                left_out.append((tile_id, f"failed the content check ({row['qc']})"))
            continue
        synthetic = (row.get("synthesis_type") or "") in SYNTHETIC_TYPES
        if need_masks and synthetic and not has_mask(row):
            if left_out is not None:
                left_out.append((tile_id, "no mask matching its pixels (a variation): "
                                          "a classification sample only"))
            continue
        image = base / row.get("image_path", "")
        if not row.get("image_path") or not image.is_file():
            raise InputError("the tile image is missing", path=image, item=f"tile {tile_id}")
        mask = base / row["mask_path"] if row.get("mask_path") else None
        if mask is not None and not mask.is_file():
            mask = None
        if need_masks and mask is None:
            raise InputError(
                "the tile has no mask file: segmentation needs masks (mask_path)",
                path=source,
                item=f"tile {tile_id}",
            )
        group = (row.get("slide_group") or "").strip() or slide_group(row)
        if not group:
            raise InputError(
                "the tile names no slide (slide_group, donor_image or source_image): "
                "it cannot be split by slide",
                path=source,
                item=f"tile {tile_id}",
            )
        background = slide_stem(row["source_image"]) if row.get("source_image") else group
        tiles.append(
            LabelledTile(
                id=tile_id,
                image=image,
                mask=mask,
                class_name=row.get("class_name", ""),
                synthesis_type=row.get("synthesis_type", "") or "extracted",
                slide_group=group,
                background_slide=background,
            )
        )
    if not tiles:
        raise InputError("no tiles to use (none, or all rejected)", path=source)
    return tiles


@dataclass(frozen=True)
class Fold:
    """The slide groups of one fold, on each side."""

    index: int
    train: frozenset[str]
    val: frozenset[str]
    test: frozenset[str]


def slide_folds(
    slides: Iterable[str],
    folds: int,
    split: Sequence[float] = (0.70, 0.15, 0.15),
    seed: int = 0,
) -> list[Fold]:
    """``folds`` slide-level folds of the slide groups ``slides`` (module docstring).

    Raises:
        InputError: fewer than 3 slides, fewer than 1 fold, or a split that is not three
            positive fractions summing to 1.
    """
    names = sorted(set(slides))
    fractions = [float(f) for f in split]
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(
            f"--split takes three positive fractions (train, validation, test) summing to 1, "
            f"not {','.join(f'{f:g}' for f in fractions)}",
            item="--split",
        )
    if folds < 1:
        raise InputError(f"--folds must be at least 1, not {folds}", item="--folds")
    n = len(names)
    if n < 3:
        raise InputError(
            f"the real tiles come from {n} slide(s) ({', '.join(names) or 'none'}): a "
            "slide-level split needs at least 3 (training, validation, test)",
            item="--real",
        )
    order = names.copy()
    random.Random(seed).shuffle(order)
    n_test = min(n - 2, max(1, round(fractions[2] * n)))
    n_val = min(n - 1 - n_test, max(1, round(fractions[1] * n)))
    out = []
    for k in range(folds):
        shift = (k * n) // folds
        rotated = order[shift:] + order[:shift]
        test = frozenset(rotated[:n_test])
        val = frozenset(rotated[n_test : n_test + n_val])
        train = frozenset(rotated[n_test + n_val :])
        out.append(Fold(k, train, val, test))
    return out


@dataclass
class FoldTiles:
    """The tiles on each side of one fold, and the synthetic ones left out (and why)."""

    fold: Fold
    train_real: list[LabelledTile]
    train_synthetic: list[LabelledTile]
    val: list[LabelledTile]
    test: list[LabelledTile]
    excluded: list[tuple[LabelledTile, str]]


def fold_tiles(
    fold: Fold, real: Sequence[LabelledTile], synthetic: Sequence[LabelledTile] = ()
) -> FoldTiles:
    """Assign tiles to the sides of ``fold`` by the three rules of the module docstring."""
    held_out = fold.val | fold.test
    out = FoldTiles(fold, [], [], [], [], [])
    for tile in real:
        if tile.synthetic:
            raise InputError(
                f"tile {tile.id} of the real set is synthetic ({tile.synthesis_type}); "
                "pass synthetic tiles with --synthetic",
                item=f"tile {tile.id}",
            )
        side = (
            out.test if tile.slide_group in fold.test
            else out.val if tile.slide_group in fold.val
            else out.train_real
        )
        side.append(tile)
    for tile in synthetic:
        touched = sorted(tile.slides & held_out)
        if touched:
            out.excluded.append((tile, f"uses held-out slide(s) {', '.join(touched)}"))
        else:
            out.train_synthetic.append(tile)
    return out


def leaks(assigned: FoldTiles) -> list[str]:
    """Every way ``assigned`` breaks the three rules (empty when it is leakage-free)."""
    fold = assigned.fold
    problems = []
    sides = {"train": assigned.train_real, "val": assigned.val, "test": assigned.test}
    groups = {name: {t.slide_group for t in tiles} for name, tiles in sides.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = groups[a] & groups[b]
        if both:
            problems.append(f"slide group(s) {', '.join(sorted(both))} in both {a} and {b}")
    for name in ("val", "test"):
        fake = [t.id for t in sides[name] if t.synthetic]
        if fake:
            problems.append(f"synthetic tile(s) {', '.join(fake)} in {name}")
    for tile in assigned.train_synthetic:
        touched = tile.slides & (fold.val | fold.test)
        if touched:
            problems.append(
                f"synthetic tile {tile.id} trained on but uses held-out slide(s) "
                f"{', '.join(sorted(touched))}"
            )
    return problems


def write_split_file(
    path: str | Path,
    assigned: Sequence[FoldTiles],
    seed: int,
    left_out: Sequence[tuple[str, str]] = (),
) -> Path:
    """``splits.json``: per fold its slides and tile ids on each side and the synthetic
    tiles left out with the reason; ``left_out``: synthetic tiles no fold uses (failed
    content check, no matching mask for segmentation), with the reason (written
    atomically)."""
    document = {
        "seed": seed,
        "left_out_synthetic": [{"id": i, "why": why} for i, why in left_out],
        "rules": [
            "real tiles are split by slide_group: no group on two sides of a fold",
            "validation and test folds hold real tiles only",
            "a synthetic tile is trained on only if neither its vessel's slide nor its "
            "background's slide is a validation or test slide of the fold",
        ],
        "folds": [
            {
                "fold": a.fold.index,
                "slides": {k: sorted(v) for k, v in asdict(a.fold).items() if k != "index"},
                "train_real": [t.id for t in a.train_real],
                "train_synthetic": [t.id for t in a.train_synthetic],
                "val": [t.id for t in a.val],
                "test": [t.id for t in a.test],
                "excluded_synthetic": [{"id": t.id, "why": why} for t, why in a.excluded],
            }
            for a in assigned
        ],
    }
    path = Path(path)
    atomic_write_json(path, document)
    return path


def read_split_file(path: str | Path) -> dict:
    """The document :func:`write_split_file` wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
