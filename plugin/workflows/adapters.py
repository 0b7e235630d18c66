"""The adapter library as a list: what ``histosynth adapters list`` prints and what the
QuPath *Synthesize vessels* dialog reads (``--json``).

Reads only each adapter's ``histosynth_adapter.json`` (through
:func:`histosynth.synthesis.adapters.list_adapters`): no tensor, no torch, no peft, so
listing takes as long as starting Python. An adapter folder whose metadata cannot be read
is an :class:`~histosynth.synthesis.errors.EngineError` naming the file (one line, exit 1
on the command line); a missing library is an empty one.

>>> adapter_table([])
'(no adapters)'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["ADAPTER_KEYS", "adapter_records", "adapter_table", "library_folder"]

#: the keys of every object ``histosynth adapters list --json`` prints, in this order
#: (docs/contracts.md, "The adapter library"); a key with nothing recorded is ``""``
#: (strings), ``{}`` (``metrics``)
ADAPTER_KEYS = (
    "name",
    "base_model",
    "base_hash",
    "rank",
    "alpha",
    "tile_size",
    "domain",
    "created",
    "histosynth_version",
    "metrics",
    "path",
)


def library_folder(library: str | os.PathLike | None = None) -> Path:
    """The adapter library: ``library`` when given, else where ``synthesize --adapter NAME``
    looks (``$HISTOSYNTH_ADAPTERS``, else ``~/.local/share/histosynth/adapters``)."""
    if library is not None:
        return Path(library).expanduser().absolute()
    from histosynth.synthesis.adapters import adapter_library

    return adapter_library().absolute()


def adapter_records(library: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One JSON-ready object per adapter of the library, sorted by name (keys
    :data:`ADAPTER_KEYS`): ``name`` is what ``synthesize --adapter`` takes (the adapter's
    folder in the library), ``base_model`` the base it was trained on (a preset or a
    folder), ``tile_size`` its tile side in px, ``rank`` / ``alpha`` the LoRA's,
    ``created`` ISO 8601 UTC, ``path`` its folder (absolute).

    Raises:
        EngineError: the library is a file, or an adapter folder's metadata is missing or
            invalid (naming the file).
    """
    from histosynth.synthesis.adapters import list_adapters

    root = library_folder(library)
    records = []
    for info in list_adapters(root):
        folder = Path(info.folder or root / info.name)
        records.append(
            {
                "name": folder.name,
                "base_model": info.base_id,
                "base_hash": info.base_hash,
                "rank": info.rank,
                "alpha": info.alpha,
                "tile_size": info.resolution,
                "domain": info.domain,
                "created": info.created,
                "histosynth_version": info.histosynth_version,
                "metrics": dict(info.metrics),
                "path": str(folder.absolute()),
            }
        )
    return records


def adapter_table(records: list[dict[str, Any]]) -> str:
    """``records`` (:func:`adapter_records`) as a plain-text table: name, base model, rank,
    tile size (px), created, domain and folder; ``(no adapters)`` for none."""
    if not records:
        return "(no adapters)"
    header = ("NAME", "BASE", "RANK", "TILE PX", "CREATED", "DOMAIN", "FOLDER")
    rows = [header] + [
        (
            r["name"],
            r["base_model"] or "?",
            str(r["rank"]),
            str(r["tile_size"]),
            r["created"] or "?",
            r["domain"] or "-",
            r["path"],
        )
        for r in records
    ]
    widths = [max(len(row[k]) for row in rows) for k in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  "
        + row[-1]
        for row in rows
    )
