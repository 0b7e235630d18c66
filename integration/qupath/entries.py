"""What a synthetic entry is called and carries in a QuPath project (contracts.md,
"Project write-back"): its image name, metadata keys and values, tags and description.

The one definition every writer uses — the native writer, the paquo writer and, through
the write-back plan's JSON (:mod:`histosynth.integration.qupath.plan`), the Groovy menu
script.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "META_ID",
    "META_REVIEW",
    "META_RUN",
    "META_SHAPE_ID",
    "META_SHAPE_SOURCE",
    "META_SOURCE_ENTRY",
    "META_SYNTHETIC",
    "META_TYPE",
    "ROW_METADATA",
    "SYNTHETIC_TAGS",
    "entry_description",
    "row_metadata",
    "synthetic_image_name",
    "synthetic_metadata",
]

SYNTHETIC_TAGS = ("histosynth", "synthetic")
META_SYNTHETIC = "histosynth.synthetic"
META_RUN = "histosynth.run"
META_ID = "histosynth.id"
META_TYPE = "histosynth.synthesis_type"
META_SOURCE_ENTRY = "histosynth.source_entry_id"
META_REVIEW = "review_status"
META_SHAPE_SOURCE = "histosynth.shape_source"
META_SHAPE_ID = "histosynth.shape_id"

#: ``index.csv`` columns copied into a synthetic entry's metadata when the row has a value:
#: a shape row's target outline (``drawn`` | ``bank``) and its id (a drawn sketch's
#: annotation id; a bank outline's source annotation id and deformation seed)
ROW_METADATA = {"shape_source": META_SHAPE_SOURCE, "shape_id": META_SHAPE_ID}


def synthetic_image_name(run: str, tile_id: str) -> str:
    """``imageName`` of a synthetic entry: ``synthetic-<run>-<tile id>``."""
    return f"synthetic-{run}-{tile_id}"


def synthetic_metadata(
    run: str,
    tile_id: str,
    synthesis_type: str,
    source_entry_id: str = "",
    review_status: str = "pending",
) -> dict[str, str]:
    """The entry metadata of a synthetic tile (every value a string)."""
    return {
        META_SYNTHETIC: "true",
        META_RUN: run,
        META_ID: tile_id,
        META_TYPE: synthesis_type,
        META_SOURCE_ENTRY: str(source_entry_id),
        META_REVIEW: review_status,
    }


def row_metadata(row: Mapping[str, str]) -> dict[str, str]:
    """The provenance of an ``index.csv`` row that goes into its entry's metadata beside
    :func:`synthetic_metadata` (:data:`ROW_METADATA`; empty cells left out).

    >>> row_metadata({"id": "shp-00000", "shape_source": "drawn", "shape_id": "9f1c", "seed": "3"})
    {'histosynth.shape_source': 'drawn', 'histosynth.shape_id': '9f1c'}
    >>> row_metadata({"id": "inp-00000", "shape_id": ""})
    {}
    """
    copied = {}
    for column, key in ROW_METADATA.items():
        value = str(row.get(column) or "").strip()
        if value:
            copied[key] = value
    return copied


def entry_description(row: Mapping[str, str], run_name: str) -> str:
    """One line of provenance from an ``index.csv`` row, for the entry's description.

    >>> entry_description({"id": "inp-00000", "synthesis_type": "inpainting",
    ...                    "class_name": "Vessel", "seed": "3"}, "run-1")
    "histosynth inpainting tile of class 'Vessel'; seed 3; run run-1, tile inp-00000"
    """
    kind = row.get("synthesis_type", "")
    text = f"histosynth {kind} tile"
    if row.get("class_name"):
        text += f" of class {row['class_name']!r}"
    if row.get("source_image"):
        text += f" from {row['source_image']}"
        if row.get("source_entry_id"):
            text += f" (entry {row['source_entry_id']})"
        if row.get("tile_x") and row.get("tile_y"):
            text += f" at x={row['tile_x']}, y={row['tile_y']}"
    details = [f"{key} {row[key]}" for key in ("model", "adapter", "seed") if row.get(key)]
    if details:
        text += "; " + ", ".join(details)
    if row.get("shape_id"):
        text += f"; {row.get('shape_source') or 'target'} shape {row['shape_id']}"
    text += f"; run {run_name}, tile {row.get('id', '')}"
    if row.get("mask_source", "").strip().lower() == "none":
        text += "; no mask (generated pixels: a classification sample)"
    return " ".join(text.split())
