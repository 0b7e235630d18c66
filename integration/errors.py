"""The one error type of the integration layer."""

from __future__ import annotations

from histosynth.common.errors import HistosynthError


class InputError(HistosynthError):
    """Bad user input: a file or an item in it that cannot be used.

    ``str(err)`` is one readable line naming the file and the item, e.g.
    ``"vessels.geojson: feature 3: geometry type 'Point' is not a polygon"``.
    """
