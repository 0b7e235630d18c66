"""The one error type of the integration layer."""

from __future__ import annotations

from os import PathLike


class InputError(ValueError):
    """Bad user input: a file or an item in it that cannot be used.

    ``str(err)`` is one readable line naming the file and the item, e.g.
    ``"vessels.geojson: feature 3: geometry type 'Point' is not a polygon"``.
    """

    def __init__(
        self, message: str, *, path: str | PathLike | None = None, item: str | None = None
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.item = item
        parts = [p for p in (self.path, item, message) if p]
        super().__init__(": ".join(parts))
