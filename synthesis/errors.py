"""The one error type of the engine."""

from __future__ import annotations

from histosynth.common.errors import HistosynthError


class EngineError(HistosynthError):
    """The engine cannot use a file, a folder or an input: weights, configs, images.

    ``str(err)`` is one readable line naming the file and what was expected, e.g.
    ``"weights/vae: config.json: expected latent_channels 16, found 4"``.
    """


class UntrainedEngineWarning(UserWarning):
    """An engine with random weights (the ``tiny`` preset) was built: its pixels are not
    histology. The command line says so in its own words and silences this warning."""
