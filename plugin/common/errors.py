"""The base of histosynth's user-facing errors."""

from __future__ import annotations

from os import PathLike


class HistosynthError(ValueError):
    """A file, a folder or an input histosynth cannot use.

    ``str(err)`` is one readable line: the file, the item, then the message, e.g.
    ``"vessels.geojson: feature 3: geometry type 'Point' is not a polygon"``. The command
    line prints it and exits with code 1.
    """

    def __init__(
        self, message: str, *, path: str | PathLike | None = None, item: str | None = None
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.item = item
        parts = [p for p in (self.path, item, message) if p]
        super().__init__(": ".join(parts))
