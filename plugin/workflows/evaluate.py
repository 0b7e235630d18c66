"""``histosynth evaluate``: how close a run's synthetic tiles are to real vessel tiles.

The synthetic set is the run's ``inpainting`` / ``variation`` / ``shape`` rows (rejected
ones left out); the real set is the ``extracted`` rows of ``--real`` (a dataset written by
``histosynth extract``, or a run holding such rows). Both are embedded in one feature
space (:mod:`histosynth.synthesis.metrics.features`); each image's vector is cached by
the SHA-256 of its file, so a second evaluation only embeds new tiles.

Pairs. An inpainted tile carries a real donor vessel, so the real tile of that vessel
(same slide, same annotation) is never its nearest-neighbour candidate: NND synth → real
leaves it out for that tile. The paired cosine similarity compares each synthetic tile
with the real tile it was made from (``refs/<id>-background.png`` for an inpainted tile,
``refs/<id>-reference.png`` for a variation), never with an unrelated one.

Writes ``RUN/metrics.json`` (atomically) and returns the rows of the printed table.
With ``--mask-adherence`` it also measures whether each masked synthetic tile's pixels
follow its mask (:mod:`histosynth.workflows.adherence`, ``RUN/adherence.json``).

Size: over 600 lines because the fidelity metrics, the notes that say when one cannot be
measured, the per-class groups, the own-donor exclusions and metrics.json are one table
read together; mask adherence, a separate measure, lives in its own module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from histosynth import __version__
from histosynth.common.files import atomic_write_bytes, atomic_write_json
from histosynth.integration.dataset import INDEX_NAME, SYNTHETIC_TYPES, read_index, utc_now
from histosynth.integration.errors import InputError
from histosynth.integration.images import read_rgb
from histosynth.integration.run_folder import refuse_links_in
from histosynth.workflows.adherence import (
    AdherenceResult,
    AdherenceSettings,
    measure_adherence,
    write_adherence,
)

log = logging.getLogger("histosynth")

__all__ = ["METRICS_NAME", "EvaluationResult", "evaluate", "feature_cache_dir"]

METRICS_NAME = "metrics.json"
#: ``--features`` names that stand for a feature space: the space CMMD is defined in.
FEATURE_ALIASES = {"cmmd": "clip-l14-336", "clip-fid": "clip", "fid": "inception"}
#: Smallest KID subset for a ± (smaller subsets give a meaningless spread).
KID_MIN_SUBSET = 10


@dataclass
class Row:
    """One metric of the table: its value, ± where defined, or why it is missing."""

    metric: str
    value: float | None
    pm: float | None = None
    note: str = ""
    group: str = "all"
    space: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The row as metrics.json holds it (metric, value, pm, note, group, space)."""
        return asdict(self)


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured and where it wrote it."""

    run_dir: Path
    real_dir: Path
    spaces: list[str]
    rows: list[Row] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    path: Path | None = None
    adherence: AdherenceResult | None = None

    @property
    def space(self) -> str:
        """The feature spaces measured in, comma-separated."""
        return ",".join(self.spaces)

    def table(self) -> str:
        """The rows in the layout of the seed's Table 7 (metric | value | ±), each named
        with its feature space (FID in ``clip`` features is CLIP-FID)."""
        lines = ["| metric | features | value | ± |", "|---|---|---:|---:|"]
        for row in self.rows:
            label = row.metric if row.group == "all" else f"{row.metric} [{row.group}]"
            value = "n/a" if row.value is None else f"{row.value:.4g}"
            pm = "" if row.pm is None else f"{row.pm:.2g}"
            note = f"  ({row.note})" if row.note else ""
            lines.append(f"| {label} | {row.space} | {value}{note} | {pm} |")
        return "\n".join(lines)


def feature_cache_dir() -> Path:
    """Where cached feature vectors live: ``$HISTOSYNTH_CACHE/features`` or
    ``~/.cache/histosynth/features``."""
    base = os.environ.get("HISTOSYNTH_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "histosynth") / "features"


@dataclass
class _Tile:
    row: dict[str, str]
    path: Path
    sha256: str


def _folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path).absolute()
    if folder.is_file() and folder.name == INDEX_NAME:
        folder = folder.parent
    if not (folder / INDEX_NAME).is_file():
        raise InputError(f"no {INDEX_NAME} here: not a histosynth {what}", path=folder)
    return folder


def _tiles(folder: Path, rows: Iterable[dict[str, str]]) -> list[_Tile]:
    out = []
    for row in rows:
        path = folder / row["image_path"]
        if not path.is_file():
            raise InputError("the tile image is missing", path=path, item=f"tile {row['id']}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out.append(_Tile(row, path, digest))
    return out


def _sample(rows: list[dict[str, str]], limit: int | None, seed: int) -> list[dict[str, str]]:
    """At most ``limit`` of ``rows`` (a seeded sample, in index order)."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
    return [rows[i] for i in keep]


class _Cache:
    """sha256 → feature vector of one feature space (``<space>-<weights>.npz``)."""

    def __init__(self, space) -> None:
        self.path = feature_cache_dir() / f"{space.name}-{space.weights_id[:16]}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        self.dirty = False
        if self.path.is_file():
            try:
                with np.load(self.path) as data:
                    self.vectors = dict(zip(data["sha256"].tolist(), data["features"], strict=True))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("%s: ignored, cannot read it (%s)", self.path, exc)

    def save(self) -> None:
        if not self.dirty:
            return
        import io

        buffer = io.BytesIO()
        keys = sorted(self.vectors)
        np.savez(buffer, sha256=np.array(keys), features=np.stack([self.vectors[k] for k in keys]))
        try:
            atomic_write_bytes(self.path, buffer.getvalue())
        except OSError as exc:
            log.warning("%s: feature cache not written (%s)", self.path, exc.strerror or exc)


def _embed(
    tiles: Sequence[_Tile | Path],
    space,
    cache: _Cache,
    progress: Callable[[Iterable, int], Iterable] | None,
    shape: list[tuple[int, ...]],
) -> np.ndarray:
    """Features of ``tiles`` (cached by sha256); every image must have the first's size."""
    out: list[np.ndarray | None] = []
    todo: list[int] = []
    keys = []
    for tile in tiles:
        key = (
            tile.sha256
            if isinstance(tile, _Tile)
            else hashlib.sha256(tile.read_bytes()).hexdigest()
        )
        keys.append(key)
        vector = cache.vectors.get(key)
        out.append(vector)
        if vector is None:
            todo.append(len(out) - 1)
    batch = max(1, space.batch_size)
    chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)]
    for chunk in progress(chunks, len(chunks)) if progress else chunks:
        images = []
        for i in chunk:
            tile = tiles[i]
            path = tile.path if isinstance(tile, _Tile) else tile
            image = read_rgb(path, f"tile {tile.row['id']}" if isinstance(tile, _Tile) else None)
            if not shape:
                shape.append(image.shape)
            if image.shape != shape[0]:
                raise InputError(
                    f"the tile is {image.shape[1]}×{image.shape[0]} px, the others "
                    f"{shape[0][1]}×{shape[0][0]} px: the metrics compare tiles of one size "
                    "(extract the real tiles with the run's --tile-size and --mpp)",
                    path=path,
                )
            images.append(image)
        vectors = space(np.stack(images))
        for i, vector in zip(chunk, vectors, strict=True):
            out[i] = vector
            cache.vectors[keys[i]] = vector
            cache.dirty = True
    return np.stack(out) if out else np.zeros((0, space.dim), np.float32)


def _metrics(
    real: np.ndarray,
    fake: np.ndarray,
    exclude: list[tuple[int, int]],
    group: str,
    space_name: str,
    device: str = "cpu",
) -> list[Row]:
    from histosynth.synthesis import metrics as m

    rows: list[Row] = []
    n = min(len(real), len(fake))
    # k-NN metrics, NND, KID on all tiles and CMMD: one tiled pass over the three products
    pair = m.pairwise_metrics(real, fake, exclude=exclude, device=device) if n > 5 else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", m.RankWarning)
        if n >= 2:
            fid = m.frechet_distance(real, fake)
            rank = any(issubclass(w.category, m.RankWarning) for w in caught)
            rows.append(
                Row(
                    "FID",
                    fid,
                    note=f"rank-deficient: {n} tiles < {real.shape[1]} dims" if rank else "",
                    group=group,
                )
            )
        else:
            rows.append(Row("FID", None, note="needs ≥ 2 tiles per side", group=group))
    if n >= 2:
        # the unbiased estimate on all tiles
        value = 1000 * (pair.kid if pair else m.kid(real, fake).mean)
        if n >= 2 * KID_MIN_SUBSET:
            size = min(1000, n // 2)
            spread = m.kid(real, fake, subsets=100, subset_size=size)
            rows.append(
                Row(
                    "KID ×10³",
                    value,
                    1000 * spread.std,
                    note=f"± over 100 subsets of {size}",
                    group=group,
                )
            )
        else:
            rows.append(
                Row("KID ×10³", value, note=f"no ± below {2 * KID_MIN_SUBSET} tiles", group=group)
            )
    else:
        rows.append(Row("KID ×10³", None, note="needs ≥ 2 tiles per side", group=group))
    if pair:
        rows += [
            Row("precision (k 3)", pair.precision, group=group),
            Row("recall (k 3)", pair.recall, group=group),
            Row("density (k 5)", pair.density, group=group),
            Row("coverage (k 5)", pair.coverage, group=group),
        ]
    elif n > 3:
        p, r = m.precision_recall(real, fake, k=3)
        rows += [Row("precision (k 3)", p, group=group), Row("recall (k 3)", r, group=group)]
    else:
        rows += [
            Row("precision (k 3)", None, note="needs ≥ 4 tiles per side", group=group),
            Row("recall (k 3)", None, note="needs ≥ 4 tiles per side", group=group),
        ]
    if not pair:  # every metric has its row, with what it needs when it cannot be measured
        rows += [
            Row("density (k 5)", None, note="needs ≥ 6 tiles per side", group=group),
            Row("coverage (k 5)", None, note="needs ≥ 6 tiles per side", group=group),
        ]
    if len(real) >= 2 and len(fake) >= 1:
        s2r, r2r = (
            (pair.nnd_synth_to_real, pair.nnd_real_to_real)
            if pair
            else m.nnd(real, fake, exclude=exclude)
        )
        rows += [
            Row("NND synth → real (cosine)", s2r, note="own donor left out", group=group),
            Row("NND real → real (cosine)", r2r, group=group),
        ]
    if n >= 1:
        rows.append(
            Row(
                "CMMD",
                pair.cmmd if pair else m.cmmd(real, fake),
                note=f"RBF σ 10 in {space_name} features",
                group=group,
            )
        )
    return rows


#: Most points per side kept for the plots in metrics.json.
PLOT_POINTS = 2000


def _plot_data(
    real: np.ndarray, fake: np.ndarray, exclude: list[tuple[int, int]], seed: int
) -> dict[str, Any]:
    """PCA coordinates of both sets and the per-tile nearest-neighbour distances, for the
    review gallery's plots (at most :data:`PLOT_POINTS` per side, a seeded sample)."""
    from histosynth.synthesis.metrics import nearest_distances, pca_2d

    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)

    def keep(values: np.ndarray) -> list:
        if len(values) > PLOT_POINTS:
            values = values[np.sort(rng.choice(len(values), PLOT_POINTS, replace=False))]
        return np.round(values, 6).tolist()

    if len(real) + len(fake) >= 3:
        pr, pf = pca_2d(real, fake)
        out["pca"] = {"real": keep(pr), "synthetic": keep(pf)}
    if len(real) >= 2:
        s2r, r2r = nearest_distances(real, fake, exclude=exclude)
        out["nnd"] = {"metric": "cosine", "synth_to_real": keep(s2r), "real_to_real": keep(r2r)}
    return out


def feature_space_names(features: str | Sequence[str]) -> list[str]:
    """The feature spaces of ``--features`` (comma-separated, or a list), aliases
    (:data:`FEATURE_ALIASES`) resolved, in order, each once.

    Raises:
        InputError: an empty list or an unknown name, naming the known ones.
    """
    from histosynth.synthesis.metrics.features import FEATURE_SPACES

    raw = features.split(",") if isinstance(features, str) else list(features)
    names: list[str] = []
    for item in (str(f).strip().lower() for f in raw):
        if not item:
            continue
        name = FEATURE_ALIASES.get(item, item)
        if name not in FEATURE_SPACES:
            known = ", ".join([*FEATURE_SPACES, *FEATURE_ALIASES])
            raise InputError(f"unknown feature space {item!r}; known: {known}", item="--features")
        if name not in names:
            names.append(name)
    if not names:
        raise InputError("name at least one feature space", item="--features")
    return names


def evaluate(
    run_dir: str | os.PathLike,
    real_dir: str | os.PathLike | None,
    *,
    features: str | Sequence[str] = "default",
    per_class: bool = False,
    max_images: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: Callable[[Iterable, int], Iterable] | None = None,
    command: str = "",
    adherence: AdherenceSettings | None = None,
    adherence_progress: Callable[[Iterable, int], Iterable] | None = None,
) -> EvaluationResult:
    """Measure the run's synthetic tiles against the real tiles of ``real_dir`` and
    write ``RUN/metrics.json``. ``max_images``: at most this many tiles per side (a
    seeded sample). With ``adherence``, also the mask adherence of its masked synthetic
    tiles (:mod:`histosynth.workflows.adherence`, ``RUN/adherence.json``); ``real_dir``
    may then be ``None`` when a saved segmenter is named (no fidelity metrics).

    Raises InputError: not a run / dataset, no synthetic or no real tiles, unreadable
    images or tiles of different sizes (each naming the file), and adherence's own
    (:func:`~histosynth.workflows.adherence.measure_adherence`) — all before anything is
    written."""
    run = _folder(run_dir, "run folder")
    real = None if real_dir is None else _folder(real_dir, "dataset or run folder")
    if real is None and (adherence is None or adherence.segmenter is None):
        also = " (or, for --mask-adherence alone, a saved --segmenter FILE)" if adherence else ""
        raise InputError(f"name the real tiles: --real DIR, a dataset written by 'histosynth "
                         f"extract'{also}", item="--real")
    names = feature_space_names(features) if real is not None else []
    rows = (_synthetic_rows(run), _real_rows(real)) if real is not None else None
    measured = None
    if adherence is not None:
        measured = measure_adherence(run, real, adherence, device=device,
                                     batch_size=batch_size, progress=adherence_progress)
    result = EvaluationResult(run, real or run, [])
    if rows is not None:
        document = _fidelity(result, names, rows, per_class=per_class, max_images=max_images,
                             batch_size=batch_size, device=device, seed=seed,
                             progress=progress, command=command)
        result.path = refuse_links_in(run, run / METRICS_NAME)
        atomic_write_json(result.path, document)
    if measured is not None and adherence is not None:
        result.adherence, model = measured
        write_adherence(run, result.adherence, model, adherence, command)
    return result


def _fidelity(result: EvaluationResult, names: list[str],
              rows: tuple[list[dict[str, str]], list[dict[str, str]]], *, per_class: bool,
              max_images: int | None, batch_size: int | None, device: str | None, seed: int,
              progress: Callable[[Iterable, int], Iterable] | None, command: str
              ) -> dict[str, Any]:
    """The fidelity metrics of every feature space into ``result``; returns the content
    of metrics.json (not written here)."""
    run, real = result.run_dir, result.real_dir
    run_rows, real_rows = rows
    # sampled first: only the tiles used are read and hashed
    fake_tiles = _tiles(run, _sample(run_rows, max_images, seed))
    real_tiles = _tiles(real, _sample(real_rows, max_images, seed + 1))
    exclusions = partial(_exclusions, fake_tiles, _vessel_tiles(real_tiles))
    groups = _groups(fake_tiles, real_tiles, per_class)
    pairs = _source_pairs(run, fake_tiles)

    spaces: list[dict[str, Any]] = []
    plots: dict[str, Any] | None = None
    for name in names:
        space = _load_space(name, device, batch_size)
        fake, real_features, ref_features = _embed_sets(
            space, fake_tiles, real_tiles, [path for _, path in pairs], progress
        )
        space_rows = _group_rows(space.name, real_features, fake, groups, exclusions,
                                 device or "cpu")
        if ref_features is not None:
            space_rows.append(_pair_row(ref_features, fake, pairs))
        for row in space_rows:
            row.space = space.name
        result.rows += space_rows
        result.spaces.append(space.name)
        spaces.append(_space_info(space))
        if plots is None:  # the plots are drawn in the first space
            everything = exclusions(
                list(range(len(fake_tiles))), {j: j for j in range(len(real_tiles))}
            )
            plots = {"space": space.name, **_plot_data(real_features, fake, everything, seed)}
    result.counts = {"synthetic": len(fake_tiles), "real": len(real_tiles), "pairs": len(pairs)}
    return _metrics_document(result, spaces, plots, command)


def _synthetic_rows(run: Path) -> list[dict[str, str]]:
    """The run's synthetic rows, rejected ones left out; InputError when there are none."""
    rows = [
        r
        for r in read_index(run)
        if r["synthesis_type"] in SYNTHETIC_TYPES
        and (r.get("review_status") or "pending").strip().lower() != "rejected"
    ]
    if not rows:
        raise InputError(
            "the run has no synthetic tiles to evaluate (none, or all rejected)",
            path=run / INDEX_NAME,
        )
    return rows


def _real_rows(real: Path) -> list[dict[str, str]]:
    """The ``extracted`` rows of the real set; InputError when there are none."""
    rows = [r for r in read_index(real) if r["synthesis_type"] == "extracted"]
    if not rows:
        raise InputError(
            "no real (extracted) tiles to compare with; make them with 'histosynth extract'",
            path=real / INDEX_NAME,
        )
    return rows


def _vessel_tiles(real_tiles: Sequence[_Tile]) -> dict[tuple[str, str], list[int]]:
    """(source image, source annotation id) → positions of the real tiles of that vessel."""
    by_vessel: dict[tuple[str, str], list[int]] = {}
    for j, tile in enumerate(real_tiles):
        by_vessel.setdefault(
            (tile.row.get("source_image", ""), tile.row.get("source_annotation_id", "")), []
        ).append(j)
    return by_vessel


def _exclusions(
    fake_tiles: Sequence[_Tile],
    by_vessel: dict[tuple[str, str], list[int]],
    fake_idx: list[int],
    real_index: dict[int, int],
) -> list[tuple[int, int]]:
    """(fake, real) positions within a group that must not be neighbours: the real tile
    of an inpainted (or shape) tile's own donor is not an independent neighbour."""
    out = []
    for local, i in enumerate(fake_idx):
        row = fake_tiles[i].row
        if row["synthesis_type"] == "variation":  # no donor
            continue
        donor = (
            row.get("donor_image") or row.get("source_image", ""),
            row.get("source_annotation_id", ""),
        )
        out += [(local, real_index[j]) for j in by_vessel.get(donor, []) if j in real_index]
    return out


def _groups(
    fake_tiles: Sequence[_Tile], real_tiles: Sequence[_Tile], per_class: bool
) -> list[tuple[str, list[int], list[int]]]:
    """(group, synthetic positions, real positions): ``all``, then one per class."""
    groups = [("all", list(range(len(fake_tiles))), list(range(len(real_tiles))))]
    if per_class:
        for name in sorted({t.row["class_name"] for t in fake_tiles}):
            groups.append(
                (
                    name,
                    [i for i, t in enumerate(fake_tiles) if t.row["class_name"] == name],
                    [j for j, t in enumerate(real_tiles) if t.row["class_name"] == name],
                )
            )
    return groups


def _source_pairs(run: Path, fake_tiles: Sequence[_Tile]) -> list[tuple[int, Path]]:
    """Each synthetic tile with the real tile it was made from (its ``refs/`` file)."""
    pairs = []
    for i, tile in enumerate(fake_tiles):
        kind = "reference" if tile.row["synthesis_type"] == "variation" else "background"
        ref = run / "refs" / f"{tile.row['id']}-{kind}.png"
        if ref.is_file():
            pairs.append((i, ref))
    return pairs


def _load_space(name: str, device: str | None, batch_size: int | None) -> Any:
    """The feature space ``name`` on ``device`` (CPU by default); an unknown one is an
    InputError on ``--features``."""
    from histosynth.synthesis.metrics.features import load_feature_space

    try:
        space = load_feature_space(name, device or "cpu")
    except ValueError as exc:
        raise InputError(str(exc), item="--features") from None
    if batch_size:
        space.batch_size = int(batch_size)
    return space


def _embed_sets(
    space: Any,
    fake_tiles: Sequence[_Tile],
    real_tiles: Sequence[_Tile],
    refs: Sequence[Path],
    progress: Callable[[Iterable, int], Iterable] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Features of the synthetic tiles, the real tiles and the source tiles (``None``
    without pairs), through the space's cache (saved even when a tile fails)."""
    cache = _Cache(space)
    shape: list[tuple[int, ...]] = []
    try:
        fake = _embed(fake_tiles, space, cache, progress, shape)
        real = _embed(real_tiles, space, cache, progress, shape)
        ref = _embed(refs, space, cache, None, shape) if refs else None
    finally:
        cache.save()
    return fake, real, ref


def _group_rows(
    space_name: str,
    real: np.ndarray,
    fake: np.ndarray,
    groups: list[tuple[str, list[int], list[int]]],
    exclusions: Callable[[list[int], dict[int, int]], list[tuple[int, int]]],
    device: str,
) -> list[Row]:
    """The metrics of every group; a group without tiles on a side is one n/a row."""
    rows: list[Row] = []
    for group, fake_idx, real_idx in groups:
        if not fake_idx or not real_idx:
            note = "no real tiles of this class" if fake_idx else "no synthetic tiles"
            rows.append(Row("all metrics", None, note=note, group=group))
            continue
        excl = exclusions(fake_idx, {j: k for k, j in enumerate(real_idx)})
        rows += _metrics(real[real_idx], fake[fake_idx], excl, group, space_name, device)
    return rows


def _pair_row(ref: np.ndarray, fake: np.ndarray, pairs: list[tuple[int, Path]]) -> Row:
    """Mean cosine similarity of each synthetic tile to the tile it was made from."""
    from histosynth.synthesis.metrics import cosine_similarity

    return Row(
        "cosine to the source tile",
        cosine_similarity(ref, fake[[i for i, _ in pairs]]),
        note=f"{len(pairs)} pairs",
    )


def _space_info(space: Any) -> dict[str, Any]:
    """The feature space as metrics.json describes it."""
    return {
        "name": space.name,
        "dim": space.dim,
        "weights_sha256": space.weights_id,
        "comparable_with_published": space.comparable,
        "description": space.description,
    }


def _metrics_document(
    result: EvaluationResult,
    spaces: list[dict[str, Any]],
    plots: dict[str, Any] | None,
    command: str,
) -> dict[str, Any]:
    """The content of metrics.json."""
    real = result.real_dir
    return {
        "format_version": 1,
        "created_at": utc_now(),
        "histosynth": __version__,
        "command": command,
        "feature_space": spaces[0],
        "feature_spaces": spaces,
        "real_set": {
            "path": str(real),
            "index_sha256": hashlib.sha256((real / INDEX_NAME).read_bytes()).hexdigest(),
        },
        "counts": result.counts,
        "pairs": "NND synth → real leaves out the real tiles of each inpainted tile's own donor "
        "vessel; the cosine compares each synthetic tile with the tile it was made from",
        "metrics": [row.as_dict() for row in result.rows],
        "plots": plots,
    }
