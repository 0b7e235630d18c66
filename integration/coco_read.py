"""Reading a COCO instance dataset (a JSON file and a folder of images) as tiles.

Each COCO image is a tile (its file under the images folder, ``width`` × ``height`` px);
each annotation an instance of its category (the category's ``name`` is the class, as a
QuPath class name: ``"Vessel"``, ``"Vessel: Invasive"``). Segmentations are COCO
polygons (``[[x1, y1, x2, y2, ...], ...]``, image px, origin top-left, y down) or RLE
(``{"size": [h, w], "counts": str | [int, ...]}``), decoded by
:mod:`histosynth.integration.coco` exactly as pycocotools decodes them. The tiles'
resolution (µm/px) is the caller's, else ``info.mpp`` (histosynth's export writes it).
An image's provenance, when the file carries it (histosynth's export does, in an extra
``histosynth`` object, other tools in ``attributes``: ``id``, ``synthesis_type``,
``source_image``, ``slide_group``, ``class_name``, ``review_status``, ``qc``,
``has_mask``), is kept.

Nothing in the file is trusted: every refusal is one :class:`InputError` naming the file
and the item (``image 3``, ``annotation 17``, ``category 2``, ``info.mpp``), raised by
:func:`read_coco` before any caller writes anything — a missing or oversized file, not
JSON or not an object, duplicated image / annotation / category ids, an unknown image or
category id, a negative or non-finite coordinate, a segmentation that is neither
polygons nor RLE, an RLE whose size is not its image's, an image file that is missing,
outside the images folder, or whose pixel size disagrees with ``width`` / ``height``.

Example::

    data = read_coco("vessels.json", "images/")
    mask = image_mask(data.images[0])              # uint8 0/255, every instance
    sources = coco_slide_sources(data)             # one SlideSource per image, for synthesize
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histosynth.integration.annotations import Annotation, class_matches_any
from histosynth.integration.coco import decode_rle, mask_from_polygons
from histosynth.integration.errors import InputError
from histosynth.integration.files import parse_json, read_input_bytes

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.integration.tiles import SlideSource

__all__ = [
    "MAX_COCO_BYTES",
    "MAX_IMAGE_SIDE",
    "CocoDataset",
    "CocoImage",
    "CocoInstance",
    "coco_mpp",
    "coco_slide_sources",
    "image_mask",
    "instance_geometry",
    "instance_mask",
    "read_coco",
    "read_coco_image",
]

#: Largest COCO file read, bytes: parsed JSON takes about ten times its size in memory.
MAX_COCO_BYTES = 256 * 2**20
#: Largest image side, px (the largest tile histosynth writes).
MAX_IMAGE_SIDE = 16384
#: Largest µm/px accepted from ``info.mpp`` (as ``--mpp``'s bound).
MAX_MPP = 100.0
#: The extra objects of an image that may carry histosynth's provenance.
PROVENANCE_KEYS = ("attributes", "histosynth")


@dataclass(frozen=True)
class CocoInstance:
    """One annotation: its id, class (category name) and segmentation (validated
    polygons ``list[list[float]]`` or an RLE dict, image px)."""

    id: int
    class_name: str
    segmentation: Any


@dataclass
class CocoImage:
    """One image of the dataset: a tile ``width`` × ``height`` px at ``path``, its
    instances, and its provenance as the file gives it (``attributes``: str → str)."""

    id: int
    file_name: str
    path: Path
    width: int
    height: int
    tile_id: str
    instances: list[CocoInstance] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        """The tile's class: its provenance's, else its first instance's (``""``: none)."""
        if self.attributes.get("class_name"):
            return self.attributes["class_name"]
        return self.instances[0].class_name if self.instances else ""

    @property
    def source_image(self) -> str:
        """The slide the tile came from (its provenance), else the image file itself."""
        return self.attributes.get("source_image") or str(self.path)


@dataclass
class CocoDataset:
    """A COCO file read and checked: its images (in file order), category id → name,
    and ``info.mpp`` (µm/px; ``None`` when the file has none)."""

    file: Path
    images_dir: Path
    images: list[CocoImage]
    categories: dict[int, str]
    mpp: float | None = None


# --------------------------------------------------------------------------- checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _objects(document: dict, key: str, file: Path, required: bool) -> list[dict]:
    """``document[key]``: a list of objects (``[]`` when absent and not ``required``)."""
    if key not in document and not required:
        return []
    value = document.get(key)
    if not isinstance(value, list):
        raise InputError(f"{key!r} must be a list, not {_short(value)}", path=file, item=key)
    for k, item in enumerate(value):
        if not isinstance(item, dict):
            raise InputError(f"not an object: {_short(item)}", path=file, item=f"{key}[{k}]")
    return value


def _id(item: dict, key: str, k: int, seen: set[int], file: Path) -> int:
    """The integer ``id`` of ``item`` (the ``k``-th of ``key``), not seen before."""
    value = item.get("id")
    what = {"images": "image", "annotations": "annotation", "categories": "category"}[key]
    if not _is_int(value):
        raise InputError(f"id must be an integer, not {_short(value)}", path=file,
                         item=f"{key}[{k}]")
    if value in seen:
        raise InputError(f"duplicated {what} id", path=file, item=f"{what} {value}")
    seen.add(value)
    return value


def _mpp(document: dict, file: Path) -> float | None:
    info = document.get("info")
    if not isinstance(info, dict) or info.get("mpp") is None:
        return None
    value = info["mpp"]
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= MAX_MPP:
        raise InputError(
            f"must be a number of µm/px in (0, {MAX_MPP:g}], not {_short(value)}",
            path=file,
            item="info.mpp",
        )
    return float(value)


def _categories(document: dict, file: Path) -> dict[int, str]:
    names: dict[int, str] = {}
    for k, item in enumerate(_objects(document, "categories", file, required=False)):
        category = _id(item, "categories", k, set(names), file)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"name must be a non-empty string, not {_short(name)}", path=file,
                             item=f"category {category}")
        names[category] = name.strip()
    return names


def _image_file(images_dir: Path, name: Any, file: Path, item: str) -> Path:
    """The image file ``name`` under ``images_dir``: present, and not outside it."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise InputError(f"file_name must be a non-empty string, not {_short(name)}",
                         path=file, item=item)
    path = images_dir / name
    root = os.path.realpath(images_dir)
    if os.path.isabs(name) or os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise InputError(f"file_name {name!r} lies outside the images folder {images_dir}",
                         path=file, item=item)
    if not path.is_file():
        raise InputError(f"image file not found: {path}", path=file, item=item)
    return path


def _pixel_size(path: Path, file: Path, item: str) -> tuple[int, int]:
    """(width, height) px of the image file, from its header alone."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read the image file {path}: {exc}", path=file,
                         item=item) from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:64]


def _provenance(item: dict) -> dict[str, str]:
    """An image's provenance: the strings, numbers and flags (``"true"`` / ``"false"``)
    of its ``attributes`` / ``histosynth`` object (the first present), as strings."""
    for key in PROVENANCE_KEYS:
        extra = item.get(key)
        if isinstance(extra, dict):
            return {
                str(k): str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in extra.items()
                if isinstance(v, str | bool) or (_is_number(v) and math.isfinite(v))
            }
    return {}


def _image(item: dict, k: int, seen: set[int], data: CocoDataset, used: set[str]) -> CocoImage:
    file = data.file
    image_id = _id(item, "images", k, seen, file)
    where = f"image {image_id}"
    width, height = item.get("width"), item.get("height")
    for name, value in (("width", width), ("height", height)):
        if not _is_int(value) or not 1 <= value <= MAX_IMAGE_SIDE:
            raise InputError(f"{name} must be an integer in [1, {MAX_IMAGE_SIDE}], not "
                             f"{_short(value)}", path=file, item=where)
    path = _image_file(data.images_dir, item.get("file_name"), file, where)
    actual = _pixel_size(path, file, where)
    if actual != (width, height):
        raise InputError(
            f"the file says {width}×{height} px, the image {path} is {actual[0]}×{actual[1]} px",
            path=file, item=where,
        )
    attributes = _provenance(item)
    candidate = _slug(attributes.get("id", "")) or _slug(Path(item["file_name"]).stem) or "image"
    tile_id, n = candidate, 1
    while tile_id in used:
        n += 1
        tile_id = f"{candidate}-{n}"
    used.add(tile_id)
    return CocoImage(image_id, item["file_name"], path, width, height, tile_id,
                     attributes=attributes)


def _polygons(value: list, where: str, file: Path) -> list[list[float]]:
    if not value:
        raise InputError("segmentation is an empty list", path=file, item=where)
    for k, ring in enumerate(value):
        if not isinstance(ring, list) or len(ring) < 6 or len(ring) % 2:
            raise InputError(
                f"polygon {k} must be a list of at least 3 x, y pairs, not {_short(ring)}",
                path=file, item=where,
            )
        for v in ring:
            if not _is_number(v) or not math.isfinite(v):
                raise InputError(f"polygon {k} holds {_short(v)}, not a finite number",
                                 path=file, item=where)
            if v < 0:
                raise InputError(f"polygon {k} holds a negative coordinate ({v:g})",
                                 path=file, item=where)
    return [[float(v) for v in ring] for ring in value]


def _rle(value: dict, image: CocoImage, where: str, file: Path) -> dict:
    size = value.get("size")
    if size != [image.height, image.width]:
        raise InputError(
            f"RLE size {_short(size)} is not the image's [height, width] = "
            f"[{image.height}, {image.width}]",
            path=file, item=where,
        )
    try:
        decode_rle(value)  # every run checked now: nothing fails later, mid-write
    except ValueError as exc:
        raise InputError(f"invalid RLE: {exc}", path=file, item=where) from None
    return {"size": list(size), "counts": value.get("counts")}


def _instance(item: dict, k: int, seen: set[int], data: CocoDataset,
              images: dict[int, CocoImage]) -> tuple[CocoImage, CocoInstance]:
    file = data.file
    annotation_id = _id(item, "annotations", k, seen, file)
    where = f"annotation {annotation_id}"
    image = images.get(item.get("image_id")) if _is_int(item.get("image_id")) else None
    if image is None:
        raise InputError(f"unknown image id {_short(item.get('image_id'))}", path=file,
                         item=where)
    category = item.get("category_id")
    if not _is_int(category) or category not in data.categories:
        raise InputError(f"unknown category id {_short(category)}", path=file, item=where)
    segmentation = item.get("segmentation")
    if isinstance(segmentation, list):
        segmentation = _polygons(segmentation, where, file)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        segmentation = _rle(segmentation, image, where, file)
    else:
        raise InputError(
            f"segmentation is neither polygons nor RLE: {_short(segmentation)}",
            path=file, item=where,
        )
    return image, CocoInstance(annotation_id, data.categories[category], segmentation)


# --------------------------------------------------------------------------- reading


def read_coco(
    file: str | os.PathLike, images_dir: str | os.PathLike, *, max_bytes: int = MAX_COCO_BYTES
) -> CocoDataset:
    """The COCO instance dataset ``file`` (JSON, at most ``max_bytes``) with its images
    in ``images_dir``, every item checked (module docstring); images in file order, each
    with its instances in file order and a unique ``tile_id`` (its provenance's id, else
    its file's stem).

    Raises:
        InputError: one line naming the file and the item.
    """
    file, images_dir = Path(file), Path(images_dir)
    if not images_dir.is_dir():
        raise InputError("the images folder (--images) is not a folder", path=images_dir)
    document = parse_json(read_input_bytes(file, max_bytes=max_bytes), file)
    if not isinstance(document, dict):
        raise InputError(f"not a COCO object (a JSON {type(document).__name__})", path=file)
    data = CocoDataset(file, images_dir, [], _categories(document, file), _mpp(document, file))
    seen: set[int] = set()
    used: set[str] = set()
    for k, item in enumerate(_objects(document, "images", file, required=True)):
        data.images.append(_image(item, k, seen, data, used))
    if not data.images:
        raise InputError("holds no image", path=file, item="images")
    by_id = {image.id: image for image in data.images}
    seen = set()
    for k, item in enumerate(_objects(document, "annotations", file, required=False)):
        image, instance = _instance(item, k, seen, data, by_id)
        image.instances.append(instance)
    return data


def coco_mpp(data: CocoDataset, given: float | None, option: str = "--mpp") -> float:
    """The tiles' µm/px: ``given`` (the command's ``option``), else ``info.mpp``.

    Raises:
        InputError: neither is there.
    """
    if given is not None:
        return float(given)
    if data.mpp is None:
        raise InputError(
            f"the tiles' resolution is unknown: give it with {option} (µm/px) or as "
            "info.mpp in the file",
            path=data.file,
            item="info.mpp",
        )
    return data.mpp


def instance_mask(instance: CocoInstance, height: int, width: int) -> np.ndarray:
    """The instance's pixels on its image's ``height`` × ``width`` grid (uint8 0 / 1)."""
    if isinstance(instance.segmentation, dict):
        return decode_rle(instance.segmentation)
    return mask_from_polygons(instance.segmentation, height, width)


def image_mask(image: CocoImage, classes: Sequence[str] = ()) -> np.ndarray:
    """The union of ``image``'s instances (of ``classes`` when given; 'Vessel' includes
    'Vessel: …') as uint8 0 / 255, ``height`` × ``width``."""
    mask = np.zeros((image.height, image.width), dtype=bool)
    for instance in image.instances:
        if not classes or class_matches_any(instance.class_name, classes):
            mask |= instance_mask(instance, image.height, image.width) > 0
    return mask.astype(np.uint8) * np.uint8(255)


def read_coco_image(image: CocoImage) -> np.ndarray:
    """The image's pixels as uint8 RGB (``height``, ``width``, 3)."""
    from histosynth.integration.images import read_rgb

    pixels = read_rgb(image.path, f"image {image.id}")
    if pixels.shape[:2] != (image.height, image.width):  # the file changed since read_coco
        raise InputError(
            f"is {pixels.shape[1]}×{pixels.shape[0]} px, not {image.width}×{image.height}",
            path=image.path,
        )
    return pixels


def instance_geometry(instance: CocoInstance, height: int, width: int) -> Any:
    """The instance as a valid shapely Polygon / MultiPolygon in image px (``None`` when
    it has no area): polygons as given (the union of the polygons), RLE as the exact
    outline of its pixels (:func:`~histosynth.integration.masks.mask_to_polygons`)."""
    from shapely import union_all
    from shapely.geometry import Polygon

    from histosynth.integration.geometry import polygonal
    from histosynth.integration.masks import mask_to_polygons

    if isinstance(instance.segmentation, dict):
        return mask_to_polygons(instance_mask(instance, height, width))
    parts = [
        polygonal(Polygon(np.asarray(ring, dtype=float).reshape(-1, 2)))
        for ring in instance.segmentation
    ]
    parts = [p for p in parts if p is not None]
    return polygonal(union_all(parts)) if parts else None


def coco_slide_sources(data: CocoDataset) -> list[SlideSource]:
    """One :class:`~histosynth.integration.tiles.SlideSource` (not opened) per image: the
    image file is the slide, its instances its annotations (level-0 px = image px; class
    = category name, id ``coco-<annotation id>``); instances without area are left out.
    Open them with ``open_sources(sources, mpp)`` at the tiles' µm/px (:func:`coco_mpp`).
    """
    from histosynth.integration.tiles import SlideSource

    sources = []
    for image in data.images:
        annotations = []
        for instance in image.instances:
            geometry = instance_geometry(instance, image.height, image.width)
            if geometry is not None:
                annotations.append(
                    Annotation(geometry, class_name=instance.class_name,
                               id=f"coco-{instance.id}",
                               properties={"coco_annotation_id": instance.id})
                )
        sources.append(SlideSource(image.path, annotations, f"{data.file} (image {image.id})",
                                   image_name=image.file_name))
    return sources
