"""TIAToolbox pipelines call histosynth: :class:`SynthesisEngine`.

An engine with TIAToolbox's conventions: constructed like ``SemanticSegmentor`` (a model
preset or a loaded engine, ``batch_size``, ``device``, ``verbose``), and run on slides
(paths or ``WSIReader`` objects) with their annotations (``AnnotationStore`` objects,
``.db`` files or QuPath GeoJSON, one per slide) into ``save_dir``, returning what
``output_type`` asks for.

Size: one module because it is one class and the readers of its inputs (stores, GeoJSON,
TIAToolbox readers) and writers of its outputs, which only it uses; split when another
caller needs them.

>>> from histosynth.tiatoolbox import SynthesisEngine                  # doctest: +SKIP
>>> engine = SynthesisEngine(batch_size=1, device="cpu")  # doctest: +SKIP
>>> store = engine.run(["slide.ome.tif"], annotations=["slide.db"],    # doctest: +SKIP
...                    classes=["Vessel"], count=4, save_dir="synth",
...                    output_type="annotationstore", class_dict={1: "Vessel"})

Coordinates: input annotations are in level-0 (baseline) pixels of their slide, as
TIAToolbox engines write them. Output annotations are in pixels of their *synthetic
tile* (``tile_size`` × ``tile_size`` at ``mpp`` µm/px, origin top-left); the tile's
place on the source slide is in its record (``tile_x``, ``tile_y`` in level-0 pixels).

It composes the integration layer (slides, stores, GeoJSON, the run folder) and the
engine through the ``synthesize`` workflow, so the run folder is the one the command
line writes (see contracts.md), plus ``annotations.db`` for ``output_type=
"annotationstore"``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.integration.annotations import Annotation, class_matches, class_matches_any
from histosynth.integration.errors import InputError
from histosynth.integration.tiles import annotations_on_slide

log = logging.getLogger(__name__)

__all__ = ["OUTPUT_TYPES", "STORE_NAME", "SynthesisEngine", "store_key_id"]

OUTPUT_TYPES = ("dict", "annotationstore", "qupath")
#: File name of the synthetic annotations' store in the run folder.
STORE_NAME = "annotations.db"
#: ``**params`` of :meth:`SynthesisEngine.run` → ``synthesize`` keyword.
_PARAMS = {
    "steps": "steps",
    "guidance": "guidance",
    "strength": "strength",
    "seam_sigma": "seam_sigma",
    "colour_blend": "colour_blend",
    "adapter": "adapter",
    "resume": "resume",
    "slide_mpp": "slide_mpp_override",
    "ray": "ray",
    "background": "background",
    "harmonise": "harmonise",
    "allow_untrained": "allow_untrained",
    "shapes": "shapes",
    "shape_class": "shape_class",
    "inside_strength": "inside_strength",
}
_STORE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_GEOJSON_SUFFIXES = (".geojson", ".json")
_SQLITE_MAGIC = b"SQLite format 3\x00"
# uuid5 namespace for annotations whose store keys are not UUIDs (TIAToolbox: "0", "1"…):
# their ids must not depend on chance, or the donor order (and the output) would.
_KEY_NAMESPACE = uuid.UUID("6f1a3c52-4b7e-5d0a-9c1e-2b8f7d4e6a10")


def store_key_id(key: str | int) -> str:
    """The annotation id given to a store annotation whose key is not a UUID.

    TIAToolbox engines key their annotations ``"0"``, ``"1"``, …; histosynth needs UUIDs
    that do not change between runs (they order the donors and are recorded as
    ``source_annotation_id``), so it derives one from the key.
    """
    return str(uuid.uuid5(_KEY_NAMESPACE, f"store key {key}"))


def _is_engine(model: Any) -> bool:
    return all(hasattr(model, name) for name in ("transformer", "vae", "encoder", "tile_size"))


class SynthesisEngine:
    """Synthetic vessel tiles from slides and their annotation stores, TIAToolbox-style.

    Args:
        model: ``None`` (PixCell-1024 when its weights are installed, else ``"default"``,
            the embedded histosynth-mini-512), an engine preset (``"pixcell-1024"``,
            ``"pixcell-256"``, ``"default"``, ``"tiny"`` = UNTRAINED), a local engine folder,
            or an engine already loaded with :func:`histosynth.synthesis.load_engine`.
            Weights are never downloaded.
        batch_size: tiles per diffusion batch.
        weights: a folder holding the preset's weights (as ``load_engine(weights=)``).
        device: ``"cpu"``, ``"cuda"``, …; ``None`` picks CUDA when available. Ignored for a
            loaded engine (it keeps its device).
        verbose: show a progress bar.
        kv_compress: KV-compression ratio R for a preset (``None``: as the weights say).

    The engine is loaded on the first :meth:`run` and kept for the next ones (the tiny
    preset is reloaded when another ``tile_size`` is asked for).
    """

    def __init__(
        self,
        model: str | os.PathLike | Any = None,
        batch_size: int = 1,
        weights: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        verbose: bool = True,
        kv_compress: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
        if not (model is None or _is_engine(model) or isinstance(model, str | os.PathLike)):
            raise InputError(
                "model must be a preset name, an engine folder or a loaded engine, "
                f"not {type(model).__name__}"
            )
        self.model = model
        self.batch_size = batch_size
        self.weights = weights
        self.device = device
        self.verbose = verbose
        self.kv_compress = kv_compress
        self.engine: Any = model if _is_engine(model) else None

    # ------------------------------------------------------------------ engine

    def _load(self, tile_size: int | None) -> Any:
        """The engine for ``tile_size`` (loaded once; the tiny preset follows the size)."""
        engine = self.engine
        if engine is not None and (tile_size is None or engine.tile_size == tile_size):
            return engine
        if _is_engine(self.model):
            raise InputError(
                f"the engine makes {engine.tile_size} px tiles; use tile_size={engine.tile_size}"
            )
        from histosynth.synthesis.engine import load_engine

        name = None if self.model is None else os.fspath(self.model)
        self.engine = load_engine(
            name,
            device=self.device,
            kv_compress=self.kv_compress,
            weights=self.weights,
            tile_size=tile_size,
        )
        return self.engine

    def _check_serves(
        self, classes: list[str], count: int | None, mode: str, tile_size: int | None,
        params: dict,
    ) -> None:
        """Refuse a mode the engine cannot serve before any slide or weight is read."""
        from histosynth.workflows.synthesize import SynthesisSettings
        from histosynth.workflows.synthesize.run_checks import check_engine_serves

        keys = ("strength", "background", "harmonise", "allow_untrained", "shapes",
                "shape_class", "inside_strength")
        settings = SynthesisSettings(
            classes=tuple(classes),
            count=count,
            mode=mode,
            tile_size=tile_size,
            **{k: params[k] for k in keys if k in params},
        )
        model = self.model if _is_engine(self.model) else (
            None if self.model is None else os.fspath(self.model))
        check_engine_serves(model, settings)

    # ------------------------------------------------------------------ run

    def run(
        self,
        images: Sequence[str | os.PathLike | Any] | str | os.PathLike | Any,
        *,
        annotations: Sequence[Any] | Any,
        classes: Sequence[str] | str,
        count: int | None = None,
        mode: str = "inpaint",
        save_dir: str | os.PathLike,
        output_type: str = "dict",
        seed: int = 0,
        class_dict: Mapping[int | str, str] | None = None,
        tile_size: int | None = None,
        mpp: float | None = None,
        **params: Any,
    ) -> dict[str, Any] | Any | list[Path]:
        """Make ``count`` synthetic tiles of ``classes`` into the run folder ``save_dir``.

        Args:
            images: slide paths or TIAToolbox ``WSIReader`` objects (or a single one).
            annotations: one per image: an ``AnnotationStore``, a ``.db`` file or a QuPath
                GeoJSON file, geometry in level-0 (baseline) pixels of its image. The class
                is read from ``type`` (TIAToolbox), ``classification`` or ``class_name``;
                points and lines are ignored.
            classes: class names to synthesise (``"Vessel"`` includes ``"Vessel: …"``).
            count: number of synthetic tiles (``None`` only with ``shapes="drawn"``: one
                per sketch).
            mode: ``"inpaint"`` (a real donor vessel placed into real tissue, the seam
                regenerated), ``"variation"`` (new tiles conditioned on real vessel
                tiles) or ``"shape"`` (a real donor warped into a target outline:
                ``shapes="drawn"`` takes every annotation of ``shape_class``
                [``"Vessel sketch"``] in the stores as an outline, ``shapes="bank"`` real
                outlines of ``classes`` deformed; ``inside_strength``: τ inside it).
            save_dir: the run folder (new or empty; ``resume=True`` continues one).
            output_type: ``"dict"``, ``"annotationstore"`` or ``"qupath"`` (see Returns).
            seed: same inputs + same seed → same tiles on the same device.
            class_dict: names for class values found in the stores, like TIAToolbox's
                ``class_dict`` (``{1: "Vessel"}``): TIAToolbox's ``SemanticSegmentor``
                writes the class *index* into ``type`` unless it was given names.
            tile_size: tile side, px (default: the engine's).
            mpp: µm per pixel of the tiles (default: the engine's, 0.5).
            **params: ``steps``, ``guidance``, ``strength``, ``seam_sigma``,
                ``colour_blend``, ``adapter``, ``background`` (``auto``, ``real``,
                ``synthetic``), ``harmonise`` (``auto``, ``diffusion``, ``multiband``,
                ``none``), ``allow_untrained`` (let the UNTRAINED tiny engine paint),
                ``shapes``, ``shape_class``, ``inside_strength`` (``mode="shape"``),
                ``resume``, ``slide_mpp`` (µm per level-0
                pixel for slide paths without that metadata), ``ray`` (render on a Ray
                cluster: a :class:`histosynth.workflows.synthesize.RayOptions` or its address,
                ``"auto"`` / ``"local"``; the model must then be a preset or folder).

        Returns:
            ``"dict"``: ``{"images": (N, H, W, 3) uint8, "masks": (N, H, W) uint8 0/255,
            "has_mask": (N,) bool, "records": the N ``index.csv`` rows (dicts), "save_dir":
            Path}``. A variation tile has no segmentation mask (``has_mask`` false, its mask
            all 0: train segmentation on ``has_mask`` rows only); every record's ``qc``
            says whether it passed the content check.
            ``"annotationstore"``: a TIAToolbox ``SQLiteStore`` (also saved as
            ``save_dir/annotations.db``) of every tile's annotations in *tile* pixels;
            properties ``type`` (class), ``tile_id``, ``image_path`` (relative to
            ``save_dir``), ``synthetic`` (true), ``inserted`` (the synthesised vessel, not
            one that was already in the background), ``run``, ``synthesis_type``,
            ``source_image``, ``source_annotation_id``, ``tile_x``, ``tile_y``,
            ``tile_size``, ``mpp``, ``seed``, ``model``, ``review_status``,
            ``histosynth_id``. Select one tile's with
            ``store.query(where=f"props['tile_id'] == '{tile_id}'")``.
            ``"qupath"``: the per-tile QuPath GeoJSON paths (``save_dir/annotations/``).

        Raises:
            InputError: one line naming the input: images and annotations of different
                lengths, a store without a requested class (listing the classes it
                has), an annotation outside its slide, unreadable files, bad settings.
        """
        classes, images, annotations = _checked_inputs(
            output_type, params, classes, images, annotations
        )
        names = _class_names(class_dict)
        self._check_serves(classes, count, mode, tile_size, params)
        read = list(classes)
        if mode == "shape" and params.get("shapes") == "drawn":
            from histosynth.workflows.synthesize.settings import DEFAULT_SHAPE_CLASS

            read.append(params.get("shape_class") or DEFAULT_SHAPE_CLASS)
        sources = _sources(images, annotations, names, params.get("slide_mpp"), read)

        engine = self._load(tile_size)
        tile_size = engine.tile_size if tile_size is None else tile_size
        mpp = engine.mpp if mpp is None else mpp

        from histosynth.workflows.synthesize import SynthesisSettings, synthesize

        options, run_options = self._synthesize_options(params)
        settings = SynthesisSettings(
            classes=tuple(classes),
            count=count,
            mode=mode,
            tile_size=tile_size,
            mpp=mpp,
            seed=seed,
            batch_size=self.batch_size,
            **options,
        )
        result = synthesize(
            settings,
            out=Path(save_dir),
            progress=self._progress,
            command=f"histosynth.tiatoolbox.SynthesisEngine.run(mode={mode!r}, "
            f"output_type={output_type!r})",
            engine=None if run_options.get("ray") is not None else engine,
            sources=sources,
            **run_options,
        )
        return _output(result.run_dir, output_type, tile_size)

    def _synthesize_options(self, params: dict[str, Any]) -> tuple[dict, dict]:
        """``**params`` as (``SynthesisSettings`` fields, ``synthesize`` keywords: resume,
        slide_mpp_override, ray); with ``ray``, the model is given by name, folder and
        device for the workers."""
        options = {_PARAMS[key]: value for key, value in params.items()}
        run_options = {
            k: options.pop(k) for k in ("resume", "slide_mpp_override", "ray") if k in options
        }
        ray = run_options.get("ray")
        if ray is not None:
            from histosynth.workflows.synthesize import RayOptions

            if isinstance(ray, str):
                run_options["ray"] = RayOptions(ray)
            elif not isinstance(ray, RayOptions):
                raise InputError(f"ray must be RayOptions or an address, not {ray!r}")
            if _is_engine(self.model) or self.weights is not None:
                raise InputError(
                    "ray= loads the model on every worker: give SynthesisEngine a preset "
                    "name or an engine folder (not a loaded engine or weights=)"
                )
            options["model"] = None if self.model is None else os.fspath(self.model)
            options["device"] = self.device
            options["kv_compress"] = self.kv_compress
        return options, run_options

    def _progress(self, iterable: Iterable, total: int) -> Iterable:
        from tqdm.auto import tqdm

        return tqdm(
            iterable, total=total, desc="Synthesising tiles", leave=False, disable=not self.verbose
        )


# ---------------------------------------------------------------------- inputs


def _checked_inputs(
    output_type: str, params: dict[str, Any], classes: Any, images: Any, annotations: Any
) -> tuple[list[str], list[Any], list[Any]]:
    """(classes, images, annotations) of :meth:`SynthesisEngine.run` as lists, after the
    checks that need no file: the output type, the parameter names, at least one class,
    one annotation input per image."""
    if output_type not in OUTPUT_TYPES:
        raise InputError(
            f"output_type must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}"
        )
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise InputError(
            f"unknown parameter(s) {', '.join(unknown)}; accepted: "
            + ", ".join(sorted(_PARAMS))
        )
    classes = [classes] if isinstance(classes, str) else list(classes)
    if not classes:
        raise InputError("name at least one class (classes=[...])")
    images = _as_list(images)
    annotations = _as_list(annotations)
    if len(images) != len(annotations):
        raise InputError(
            f"images and annotations differ in length ({len(images)} image(s), "
            f"{len(annotations)} annotation input(s)); give one annotation store or "
            "GeoJSON per image"
        )
    if not images:
        raise InputError("no image given")
    return classes, images, annotations


def _sources(
    images: list[Any],
    annotations: list[Any],
    names: dict[str, str],
    slide_mpp: float | None,
    classes: list[str],
) -> list[Any]:
    """The ``SlideSource`` of each image, holding only its annotations of ``classes``
    (each checked to lie on its slide)."""
    sources = [
        _source(i, image, ann, names, slide_mpp)
        for i, (image, ann) in enumerate(zip(images, annotations, strict=True))
    ]
    _check_classes(sources, classes, names)
    for source in sources:
        source.annotations = [
            a for a in source.annotations if class_matches_any(a.class_name, classes)
        ]
        source.annotations = annotations_on_slide(
            source,
            hint="; annotations must be in level-0 (baseline) pixels of their own image",
        )
    return sources


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str | os.PathLike) or not isinstance(value, Iterable):
        return [value]
    if _is_store(value):  # an AnnotationStore is iterable (its keys)
        return [value]
    return list(value)


def _is_store(value: Any) -> bool:
    from tiatoolbox.annotation.storage import AnnotationStore

    return isinstance(value, AnnotationStore)


def _class_names(class_dict: Mapping[int | str, str] | None) -> dict[str, str]:
    """``class_dict`` as class value (text, as the readers give it) → name."""
    if class_dict is None:
        return {}
    if not isinstance(class_dict, Mapping):
        raise InputError(
            f"class_dict must map class values to names, not {type(class_dict).__name__}"
        )
    names = {}
    for key, value in class_dict.items():
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"class_dict[{key!r}] must be a class name, not {value!r}")
        names[str(key).strip()] = value.strip()
    return names


def _source(
    index: int,
    image: Any,
    annotations: Any,
    names: dict[str, str],
    slide_mpp: float | None,
) -> Any:
    """One ``SlideSource``: the opened slide and its annotations (all classes)."""
    from histosynth.integration.slides import open_slide, slide_size
    from histosynth.integration.slides import slide_mpp as slide_mpp_of
    from histosynth.integration.tiles import SlideSource

    if isinstance(image, str | os.PathLike):
        path = Path(image)
        reader = open_slide(path, mpp=slide_mpp)
    elif hasattr(image, "read_rect") and hasattr(image, "info"):
        reader = image
        input_path = getattr(reader, "input_path", None)
        path = Path(input_path) if input_path is not None else Path(f"image-{index}")
        if reader.info.mpp is None:
            raise InputError(
                "the WSIReader has no pixel size (µm per pixel); open it with "
                "WSIReader.open(..., mpp=(x, y))",
                item=f"images[{index}]",
            )
    else:
        raise InputError(
            f"expected a slide path or a WSIReader, got {type(image).__name__}",
            item=f"images[{index}]",
        )
    origin, items = _read_annotations(index, annotations)
    for ann in items:
        if ann.class_name is not None and ann.class_name in names:
            ann.class_name = names[ann.class_name]
            ann.color = None  # the store's colour was the index's, not the name's
        key = ann.properties.get("store_key")
        if key is not None:
            ann.id = store_key_id(key)
    width, height = slide_size(reader)
    return SlideSource(
        path,
        items,
        origin,
        image_name=path.name,
        reader=reader,
        mpp=slide_mpp_of(reader),
        width=width,
        height=height,
    )


def _read_annotations(index: int, value: Any) -> tuple[str, list[Annotation]]:
    """(origin label, annotations in level-0 pixels) of one annotation input."""
    from histosynth.integration.geojson import read_annotations
    from histosynth.integration.stores import store_to_annotations

    if _is_store(value):
        where = getattr(value, "path", None)
        if where is not None and str(where) != ":memory:" and Path(where).is_file():
            origin = str(where)
        else:
            origin = f"annotations[{index}] (in-memory AnnotationStore)"
        try:
            return origin, store_to_annotations(value)
        except InputError as exc:
            raise InputError(str(exc), path=origin) from exc
    if not isinstance(value, str | os.PathLike):
        raise InputError(
            "expected an AnnotationStore, a .db file or a GeoJSON file, got "
            f"{type(value).__name__}",
            item=f"annotations[{index}]",
        )
    path = Path(value)
    if not path.is_file():
        raise InputError("annotation file not found", path=path)
    suffix = path.suffix.lower()
    if suffix in _STORE_SUFFIXES:
        is_store = True
    elif suffix in _GEOJSON_SUFFIXES:
        is_store = False
    else:
        with path.open("rb") as handle:
            is_store = handle.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    if is_store:
        return str(path), store_to_annotations(path)
    return str(path), read_annotations(path)


def _check_classes(sources: Sequence[Any], classes: Sequence[str], names: dict[str, str]) -> None:
    """Each requested class must be in some input; else name the inputs and what they hold."""
    for wanted in classes:
        if any(class_matches(a.class_name, wanted) for s in sources for a in s.annotations):
            continue
        present = {
            s.annotations_origin: sorted({a.class_name or "unclassified" for a in s.annotations})
            for s in sources
        }
        listing = "; ".join(
            f"{origin}: " + (", ".join(repr(c) for c in found) or "no polygon")
            for origin, found in present.items()
        )
        numeric = any(c.lstrip("-").isdigit() for found in present.values() for c in found)
        hint = (
            " (TIAToolbox engines store class indices in 'type': name them with "
            "class_dict={1: 'Vessel'})"
            if numeric and not names
            else ""
        )
        if len(sources) == 1:
            raise InputError(
                f"no annotation of class {wanted!r}; classes present: "
                + (", ".join(repr(c) for c in present[sources[0].annotations_origin]) or "none")
                + hint,
                path=sources[0].annotations_origin,
            )
        raise InputError(f"no annotation of class {wanted!r} in any input ({listing}){hint}")


# ---------------------------------------------------------------------- outputs


def _output(run_dir: Path, output_type: str, tile_size: int) -> Any:
    """What ``output_type`` asks for, from the run folder's index."""
    from histosynth.integration.dataset import read_index

    rows = read_index(run_dir)
    if output_type == "qupath":
        return [run_dir / row["annotation_path"] for row in rows]
    if output_type == "annotationstore":
        return _store(run_dir, rows)
    return _arrays(run_dir, rows, tile_size)


def _arrays(run_dir: Path, rows: list[dict[str, str]], tile_size: int) -> dict[str, Any]:
    from histosynth.integration.images import read_mask, read_rgb
    from histosynth.integration.run_folder import has_mask

    images = [read_rgb(run_dir / r["image_path"]) for r in rows]
    masked = [has_mask(r) for r in rows]
    masks = [
        read_mask(run_dir / r["mask_path"]) if m else np.zeros(im.shape[:2], np.uint8)
        for r, m, im in zip(rows, masked, images, strict=True)
    ]
    return {
        "images": np.stack(images) if images else np.zeros((0, tile_size, tile_size, 3), np.uint8),
        "masks": np.stack(masks) if masks else np.zeros((0, tile_size, tile_size), np.uint8),
        "has_mask": np.array(masked, dtype=bool),
        "records": rows,
        "save_dir": run_dir,
    }


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _store(run_dir: Path, rows: list[dict[str, str]]) -> Any:
    """Every tile's annotations (tile pixels) with provenance, saved as ``annotations.db``."""
    from histosynth.integration.geojson import read_annotations
    from histosynth.integration.stores import annotations_to_store

    items: list[Annotation] = []
    for row in rows:
        for ann in read_annotations(run_dir / row["annotation_path"]):
            props = dict(ann.properties)
            metadata = props.pop("metadata", None)
            if isinstance(metadata, dict):
                props.update(metadata)
            inserted = str(props.pop("histosynth_inserted", "")).lower() == "true"
            props.update(
                {
                    "synthetic": True,
                    "inserted": inserted,
                    "run": run_dir.name,
                    "tile_id": row["id"],
                    "image_path": row["image_path"],
                    "mask_path": row["mask_path"],
                    "synthesis_type": row["synthesis_type"],
                    "source_image": row["source_image"],
                    "source_annotation_id": props.get(
                        "source_annotation_id", row["source_annotation_id"]
                    ),
                    "tile_x": _number(row["tile_x"]),
                    "tile_y": _number(row["tile_y"]),
                    "tile_size": _number(row["tile_size"]),
                    "mpp": _number(row["mpp"]),
                    "seed": _number(row["seed"]),
                    "model": row["model"],
                    "review_status": row["review_status"],
                }
            )
            ann.properties = props
            items.append(ann)
    return annotations_to_store(items, run_dir / STORE_NAME)
