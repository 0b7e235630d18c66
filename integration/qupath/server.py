"""QuPath image-server records as ``project.qpproj`` stores them: the Bio-Formats URI
builder of an entry and its ``ImageServerMetadata`` (pixel size in µm, levels in px).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histosynth.integration.qupath.uris import path_to_uri

__all__ = ["BIOFORMATS_BUILDER", "bioformats_server_builder", "qupath_server_metadata"]

BIOFORMATS_BUILDER = "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder"


def qupath_server_metadata(
    name: str,
    width: int,
    height: int,
    mpp: float,
    levels: Sequence[tuple[int, int]],
    tile_size: int = 256,
) -> dict[str, Any]:
    """``ImageServerMetadata`` of an RGB uint8 image as QuPath stores it in a server
    builder (pixel size ``mpp`` in µm, ``levels`` as (width, height), level 0 first)."""
    return {
        "name": name,
        "width": width,
        "height": height,
        "sizeZ": 1,
        "sizeT": 1,
        "channelType": "DEFAULT",
        "isRGB": True,
        "pixelType": "UINT8",
        "levels": [{"downsample": width / w, "width": w, "height": h} for w, h in levels],
        "channels": [
            {"name": "Red", "color": -65536},
            {"name": "Green", "color": -16711936},
            {"name": "Blue", "color": -16776961},
        ],
        "pixelCalibration": {
            "pixelWidth": {"value": mpp, "unit": "µm"},
            "pixelHeight": {"value": mpp, "unit": "µm"},
            "zSpacing": {"value": 1.0, "unit": "z-slice"},
            "timeUnit": "SECONDS",
            "timepoints": [],
        },
        "preferredTileWidth": tile_size,
        "preferredTileHeight": tile_size,
    }


def bioformats_server_builder(
    path: str | os.PathLike,
    width: int,
    height: int,
    mpp: float,
    levels: Sequence[tuple[int, int]],
    tile_size: int = 256,
) -> dict[str, Any]:
    """The ``serverBuilder`` of an entry that QuPath opens with Bio-Formats (series 0) from
    the file ``path`` (absolute), with its metadata (see :func:`qupath_server_metadata`)."""
    path = Path(path)
    return {
        "builderType": "uri",
        "providerClassName": BIOFORMATS_BUILDER,
        "uri": path_to_uri(path, directory=False),
        "args": ["--series", "0"],
        "metadata": qupath_server_metadata(path.name, width, height, mpp, levels, tile_size),
    }
