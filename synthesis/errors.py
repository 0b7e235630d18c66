"""The one error type of the engine."""

from __future__ import annotations

from os import PathLike


class EngineError(ValueError):
    """The engine cannot use a file, a folder or an input: weights, configs, images.

    ``str(err)`` is one readable line naming the file and what was expected, e.g.
    ``"weights/vae: config.json: expected latent_channels 16, found 4"``.
    """

    def __init__(
        self, message: str, *, path: str | PathLike | None = None, item: str | None = None
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.item = item
        parts = [p for p in (self.path, item, message) if p]
        super().__init__(": ".join(parts))


class UntrainedEngineWarning(UserWarning):
    """An engine with random weights (the ``tiny`` preset) was built: its pixels are not
    histology. The command line says so in its own words and silences this warning."""
