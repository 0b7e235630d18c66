"""The feature cache of a dataset, a QuPath project or a slide (``histosynth cache build``).

Tiles come from a histosynth dataset / run folder (``index.csv``; rows a reviewer rejected
are left out), a COCO instance dataset (each image a tile, its mask the union of its
instances, of ``classes`` when named; :mod:`histosynth.integration.coco_read`), or from
slides: one tile centred on each vessel of the chosen classes (the
tiles ``extract`` writes, same ids) plus ``--background-tiles N`` tissue tiles that hold
no annotation of any class (for style adapters), chosen from ``--seed``. The engine's VAE
and encoder turn them into a cache file (:mod:`histosynth.synthesis.cache`); the encoder
keeps the model's crop (its magnification), so any tile size that is a multiple of the
crop works: a 512 px tile with UNI2-h's 256 px crops gives 4 rows.

Every input is checked before the model loads or anything is written.

Size: one workflow — the three tile sources (dataset, project, slide), their checks, and
the background-tile sampler that only ``cache build`` uses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histosynth.common.geometry import TileGeometry
from histosynth.integration.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from histosynth.integration.coco_read import CocoDataset, CocoImage
    from histosynth.integration.tiles import SlideSource
    from histosynth.synthesis.cache import CacheInfo, CacheTile

log = logging.getLogger(__name__)

MIN_BACKGROUND_TISSUE = 0.75
"""Smallest tissue fraction of a background tile (``integration.masks.tissue_mask``)."""


@dataclass
class CacheBuildResult:
    """What ``cache build`` did."""

    info: CacheInfo
    written: int = 0
    already_present: int = 0
    vessels: int = 0
    backgrounds: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    engine_description: str = ""
    trained: bool = True


@dataclass(frozen=True)
class CacheSettings:
    """What to cache and how.

    ``model``: a preset or an engine folder; ``classes``: the vessel classes (with a
    project or slide; 'Vessel' includes 'Vessel: …'); ``tile_size`` px and ``mpp`` µm/px
    (``None``: a dataset's own, then a resumed cache's, then the model's);
    ``background_tiles``: tissue tiles without annotations to add (slides only), chosen
    from ``seed``; ``batch_size``: tiles per model call and per commit; ``device``:
    ``None`` = CUDA when available.
    """

    model: str
    classes: tuple[str, ...] = ()
    tile_size: int | None = None
    mpp: float | None = None
    background_tiles: int = 0
    seed: int = 0
    batch_size: int = 8
    device: str | None = None

    def __post_init__(self) -> None:
        classes = (self.classes,) if isinstance(self.classes, str) else tuple(self.classes)
        object.__setattr__(self, "classes", classes)


@dataclass
class _Planned:
    """A tile to cache, before its pixels are read: ``read()`` makes the CacheTile."""

    tile_id: str
    kind: str
    read: Callable[[], CacheTile]


class _TileStream:
    """The planned tiles in order, read ``lookahead`` tiles ahead by one reader thread
    (slide readers are not shared between threads; the model meanwhile encodes)."""

    def __init__(self, planned: Sequence[_Planned], lookahead: int = 0) -> None:
        self.planned = list(planned)
        self.lookahead = int(lookahead)

    def __len__(self) -> int:
        return len(self.planned)

    def __iter__(self) -> Iterator[CacheTile]:
        if self.lookahead <= 0:
            yield from (p.read() for p in self.planned)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: deque = deque()
            try:
                for planned in self.planned:
                    pending.append(pool.submit(planned.read))
                    if len(pending) > self.lookahead:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()


# --------------------------------------------------------------------------- dataset input


@dataclass
class _DatasetInput:
    folder: Path
    rows: list[dict[str, str]]
    tile_size: int
    mpp: float | None


def _uniform(rows: Sequence[dict[str, str]], column: str, cast: type, where: Path) -> Any:
    """The one value of ``column`` in every row (``None`` when the column is empty)."""
    values = {r.get(column, "").strip() for r in rows} - {""}
    if not values:
        return None
    try:
        parsed = sorted({cast(float(v)) for v in values})
    except ValueError as err:
        raise InputError(f"column {column!r} holds a non-number ({err})", path=where) from err
    if len(parsed) > 1:
        raise InputError(
            f"tiles of several {column} values ({', '.join(map(str, parsed))}); a cache holds "
            "one: cache each group on its own",
            path=where,
        )
    return parsed[0]


def _read_dataset(folder: Path) -> _DatasetInput:
    """Rows of a dataset / run folder that are not rejected, with their files checked."""
    from histosynth.integration.dataset import read_index

    rows = read_index(folder)
    index = folder / "index.csv" if folder.is_dir() else folder
    folder = index.parent
    from histosynth.integration.content_check import qc_failed
    from histosynth.integration.run_folder import review_status

    kept = [
        r
        for r in rows
        if review_status(r) != "rejected" and not qc_failed(r.get("qc"))
    ]
    if not kept:
        raise InputError(
            f"no tiles to cache: {len(rows)} row(s), {len(rows) - len(kept)} rejected or "
            "failed the content check",
            path=index,
        )
    for row in kept:
        for column in ("image_path", "mask_path"):
            name = row.get(column, "").strip()
            if column == "image_path" and not name:
                raise InputError("a row has no image_path", path=index, item=row.get("id"))
            if name and not (folder / name).is_file():
                raise InputError(
                    f"file of tile {row.get('id')!r} not found ({column})", path=folder / name
                )
    tile_size = _uniform(kept, "tile_size", int, index)
    if tile_size is None:  # an index without the column: the first image says
        tile_size = _read_png(folder / kept[0]["image_path"], colour=True).shape[0]
    return _DatasetInput(folder, kept, tile_size, _uniform(kept, "mpp", float, index))


def _read_png(path: Path, colour: bool) -> np.ndarray:
    from histosynth.integration.images import read_mask, read_rgb

    return read_rgb(path) if colour else read_mask(path)


def _dataset_tile(folder: Path, row: dict[str, str], tile_size: int) -> CacheTile:
    import numpy as np

    from histosynth.synthesis.cache import CacheTile

    image = _read_png(folder / row["image_path"], colour=True)
    mask_name = row.get("mask_path", "").strip()
    mask = (
        _read_png(folder / mask_name, colour=False)
        if mask_name
        else np.zeros(image.shape[:2], dtype=np.uint8)
    )
    if image.shape[:2] != (tile_size, tile_size) or mask.shape != image.shape[:2]:
        raise InputError(
            f"expected {tile_size}×{tile_size} px image and mask, found {image.shape[1]}×"
            f"{image.shape[0]} and {mask.shape[1]}×{mask.shape[0]}",
            path=folder / row["image_path"],
        )
    return CacheTile(row["id"], image, mask, source=row.get("source_image", ""), kind="vessel")


def _plan_dataset(data: _DatasetInput, tile_size: int) -> list[_Planned]:
    return [
        _Planned(row["id"], "vessel", lambda row=row: _dataset_tile(data.folder, row, tile_size))
        for row in data.rows
    ]


def dataset_tiles(folder: str | Path) -> Iterator[CacheTile]:
    """The tiles of a dataset / run folder that are not rejected, read one at a time
    (uint8 RGB images, 0/255 masks, ids and source slides from ``index.csv``).

    Raises:
        InputError: no index, no tile left, a missing or unreadable file, mixed tile sizes.
    """
    data = _read_dataset(Path(folder))
    return iter(_TileStream(_plan_dataset(data, data.tile_size)))


# --------------------------------------------------------------------------- COCO input


@dataclass
class _CocoInput:
    data: CocoDataset
    tile_size: int
    mpp: float
    classes: tuple[str, ...]


def _read_coco(
    coco: str | Path, images: str | Path | None, mpp: float | None, classes: Sequence[str]
) -> _CocoInput:
    """A COCO dataset as cache input: square images of one size at ``mpp`` µm/px (else
    ``info.mpp``); ``classes``, when named, must each match a category."""
    from histosynth.integration.annotations import class_matches
    from histosynth.integration.coco_read import coco_mpp, read_coco

    if images is None:
        raise InputError("--coco needs --images (the folder of its images)", item="--images")
    data = read_coco(coco, images)
    names = sorted(set(data.categories.values()))
    for wanted in classes:
        if not any(class_matches(name, wanted) for name in names):
            raise InputError(
                f"no category of class {wanted!r}; categories: "
                + (", ".join(repr(n) for n in names) or "none"),
                path=data.file,
            )
    sizes = sorted({(image.width, image.height) for image in data.images})
    if len(sizes) > 1 or sizes[0][0] != sizes[0][1]:
        raise InputError(
            "a cache holds square tiles of one size; the images are "
            + ", ".join(f"{w}×{h}" for w, h in sizes[:4])
            + " px",
            path=data.file,
        )
    return _CocoInput(data, sizes[0][0], coco_mpp(data, mpp), tuple(classes))


def _coco_tile(image: CocoImage, classes: tuple[str, ...]) -> CacheTile:
    from histosynth.integration.coco_read import image_mask, read_coco_image
    from histosynth.synthesis.cache import CacheTile

    return CacheTile(image.tile_id, read_coco_image(image), image_mask(image, classes),
                     source=image.source_image, kind="vessel")


def _plan_coco(coco: _CocoInput) -> list[_Planned]:
    return [
        _Planned(image.tile_id, "vessel", lambda image=image: _coco_tile(image, coco.classes))
        for image in coco.data.images
    ]


# --------------------------------------------------------------------------- slide input


def _vessel_tile(planned: Any, geometry: TileGeometry) -> CacheTile:
    """Pixels and mask (every chosen-class vessel in it) of one ``extract`` tile."""
    from histosynth.integration.slides import read_tile
    from histosynth.integration.tiles import tile_contents
    from histosynth.synthesis.cache import CacheTile

    source = planned.source
    image = read_tile(source.reader, planned.x, planned.y, geometry.size, geometry.mpp)
    mask, _ = tile_contents(planned, geometry)
    return CacheTile(planned.tile_id, image, mask, source=str(source.slide_path), kind="vessel")


def _background_tile(
    source: SlideSource, tile_id: str, x: int, y: int, geometry: TileGeometry
) -> CacheTile:
    import numpy as np

    from histosynth.integration.slides import read_tile
    from histosynth.synthesis.cache import CacheTile

    image = read_tile(source.reader, x, y, geometry.size, geometry.mpp)
    mask = np.zeros((geometry.size, geometry.size), dtype=np.uint8)
    return CacheTile(tile_id, image, mask, source=str(source.slide_path), kind="background")


def _plan_backgrounds(
    sources: Sequence[SlideSource],
    count: int,
    geometry: TileGeometry,
    seed: int,
    min_tissue: float = MIN_BACKGROUND_TISSUE,
) -> list[_Planned]:
    """``count`` tissue tiles without annotations, in a seeded order over every slide."""
    import numpy as np

    from histosynth.integration.tiles import mostly_tissue, tissue_positions

    if count <= 0:
        return []
    candidates = [
        (source, x, y)
        for source in sources
        for x, y in tissue_positions(source, geometry, min_tissue, avoid=source.annotations)
    ]
    order = np.random.default_rng([seed, 0xCAC4E]).permutation(len(candidates))
    planned: list[_Planned] = []
    for k in order:
        if len(planned) == count:
            break
        source, x, y = candidates[int(k)]
        if not mostly_tissue(source, x, y, geometry, min_tissue):
            continue
        tile_id = f"{source.label}-bg-{x}-{y}"
        planned.append(
            _Planned(
                tile_id,
                "background",
                lambda s=source, t=tile_id, x=x, y=y: _background_tile(s, t, x, y, geometry),
            )
        )
    if len(planned) < count:
        log.warning(
            "only %d of %d background tiles found (tissue ≥ %.0f%%, no annotation)",
            len(planned),
            count,
            100 * min_tissue,
        )
    return planned


def _plan_slides(
    sources: Sequence[SlideSource],
    classes: Sequence[str],
    geometry: TileGeometry,
    background_tiles: int,
    seed: int,
    skipped: list[tuple[str, str]],
) -> list[_Planned]:
    from histosynth.integration.tiles import plan_vessel_tiles

    plan = plan_vessel_tiles(sources, classes, geometry, 0.0, math.inf)
    for item, reason in plan.skipped:  # counted in the summary; listed with --debug
        log.info("%s: skipped (%s)", item, reason)
    skipped.extend(plan.skipped)
    vessels = [
        _Planned(t.tile_id, "vessel", lambda t=t: _vessel_tile(t, geometry))
        for t in plan.tiles
    ]
    return vessels + _plan_backgrounds(sources, background_tiles, geometry, seed)


# --------------------------------------------------------------------------- the workflow


def _check_out(out: Path, resume: bool) -> CacheInfo | None:
    """The existing cache to resume (``None`` for a new file); refuses what cannot be."""
    if out.is_dir():
        raise InputError("expected a cache file (e.g. vessels.h5), found a folder", path=out)
    if not out.exists():
        return None
    if not resume:
        raise InputError(
            "the cache file exists; pass --resume to add to it, or choose another --out", path=out
        )
    from histosynth.synthesis.cache import read_cache_info  # h5py: only to resume

    return read_cache_info(out)


def _resolve(option: str, given: Any, *choices: tuple[str, Any]) -> Any:
    """``given`` when set, else the first known choice; a known one that differs from
    ``given`` is an error (a dataset's tile size, a resumed cache's mpp...)."""
    for what, value in choices:
        if value is None:
            continue
        if given is None:
            given = value
        elif not math.isclose(float(given), float(value), rel_tol=1e-9):
            raise InputError(f"{option} {given} differs from {what} ({value})", item=option)
    return given


def _sizes(
    tile_size: int | None,
    mpp: float | None,
    data: _DatasetInput | _CocoInput | None,
    existing: CacheInfo | None,
) -> tuple[int | None, float | None]:
    """Tile size (px) and mpp (µm/px) from the options, the dataset and a resumed cache
    (``None`` where only the model can tell)."""
    tile_size = _resolve(
        "--tile-size",
        tile_size,
        ("the dataset's tiles", data.tile_size if data else None),
        ("the cache's", existing.tile_size if existing else None),
    )
    mpp = _resolve(
        "--mpp",
        mpp,
        ("the dataset's", data.mpp if data else None),
        ("the cache's", existing.mpp if existing else None),
    )
    return tile_size, mpp


def _check_tile_size(tile_size: int, crop: int, down: int) -> None:
    if tile_size % crop or tile_size % down:
        raise InputError(
            f"{tile_size} px is not a multiple of the encoder crop ({crop} px, fixed by the "
            f"model's magnification) and of {down}; use e.g. {crop}, {2 * crop} or {4 * crop}",
            item="--tile-size",
        )


def build_feature_cache(
    settings: CacheSettings,
    *,
    out: str | Path,
    dataset: str | Path | None = None,
    project: str | Path | None = None,
    slide: str | Path | None = None,
    annotations: str | Path | None = None,
    coco: str | Path | None = None,
    images: str | Path | None = None,
    slide_mpp_override: float | None = None,
    resume: bool = False,
    skip_missing: bool = False,
    progress: Callable[[Iterable, int | None], Iterable] | None = None,
) -> CacheBuildResult:
    """Cache the tiles of a dataset folder, a COCO file (``coco``, its images in
    ``images``), or a project / slide, into the cache file ``out`` (HDF5); ``resume`` adds
    to an existing one.

    ``settings.tile_size`` (px) and ``settings.mpp`` (µm/px) default to the dataset's own,
    then to a resumed cache's, then to the model's; a COCO dataset's µm/px is
    ``settings.mpp``, else its ``info.mpp``, else an error. The model
    (``load_engine(model)`` at its native size) is loaded after the inputs are checked.

    Raises:
        InputError / EngineError: one line naming the input, before anything is written.
    """
    from histosynth.synthesis.weights import check_model  # no model library imported
    from histosynth.workflows.tile_runs import annotated_slides

    classes, seed, batch_size = settings.classes, settings.seed, settings.batch_size
    if sum(x is not None for x in (dataset, coco, project, slide)) != 1:
        raise InputError("give one of a dataset folder, a COCO file, a project or a slide")
    out = Path(out)
    existing = _check_out(out, resume)
    check_model(settings.model)  # an unknown model or missing weights: before any slide
    data: _DatasetInput | _CocoInput | None = None
    if dataset is not None:
        data = _read_dataset(Path(dataset))
    elif coco is not None:
        data = _read_coco(coco, images, settings.mpp, classes)
    sources = None
    if data is None:
        if not classes:
            raise InputError("name at least one class (--class)")
        sources = annotated_slides(
            classes, project, slide, annotations, slide_mpp_override, skip_missing
        )
    tile_size, mpp = _sizes(settings.tile_size, settings.mpp, data, existing)
    from histosynth.synthesis import load_engine  # the inputs are checked: now the slow part
    from histosynth.synthesis.cache import build_cache, cached_tile_ids

    engine = load_engine(settings.model, device=settings.device)
    tile_size = int(tile_size or engine.tile_size)
    mpp = float(mpp or engine.mpp)
    _check_tile_size(tile_size, engine.encoder.crop, engine.codec.downsample)
    result = CacheBuildResult(
        info=existing, engine_description=engine.description, trained=engine.trained
    )
    if isinstance(data, _CocoInput):
        planned = _plan_coco(data)
    elif data is not None:
        planned = _plan_dataset(data, tile_size)
    else:
        planned = _plan_slides(
            sources,
            classes,
            TileGeometry(tile_size, mpp),
            settings.background_tiles,
            seed,
            result.skipped,
        )
    if not planned:
        raise InputError(
            f"no tiles found to cache: {len(result.skipped)} vessel(s) larger than a "
            f"{tile_size} px tile at {mpp:g} µm/px, and no background tile asked for or found"
        )
    cached = cached_tile_ids(out) if existing is not None else set()
    todo = [p for p in planned if p.tile_id not in cached]
    result.info = build_cache(
        out,
        _TileStream(todo, lookahead=2 * batch_size),
        codec=engine.codec,
        encoder=engine.encoder,
        tile_size=tile_size,
        mpp=mpp,
        model_id=engine.model_id,
        resume=resume,
        batch_size=batch_size,
        progress=progress,
    )
    result.written = len(todo)
    result.already_present = len(planned) - len(todo)
    result.vessels = sum(p.kind == "vessel" for p in todo)
    result.backgrounds = sum(p.kind == "background" for p in todo)
    return result
