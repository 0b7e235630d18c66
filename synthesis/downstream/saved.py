"""A trained downstream segmenter as one file, and back.

The file is a torch file of plain data only: ``{"format": "histosynth-segmenter",
"format_version": 1, "config": <JSON text>, "state_dict": {name: tensor}}``. ``config``
names the architecture (``arch``, ``encoder``: what
:func:`~histosynth.synthesis.downstream.models.build_segmenter` takes) and whatever the
caller records beside it (tile size in px, µm/px, training settings, scores). It is read
with ``torch.load(weights_only=True)`` — never an arbitrary pickled object — and its
weights must fit the architecture exactly. Written atomically (temporary file + rename).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histosynth.common.files import atomic_write_bytes
from histosynth.synthesis.downstream.models import build_segmenter
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import load_state_strict

__all__ = ["SEGMENTER_FORMAT", "load_segmenter", "save_segmenter"]

SEGMENTER_FORMAT = "histosynth-segmenter"
_VERSION = 1
#: Largest segmenter file read (bytes): UNet++ / EfficientNet-b1 is ~40 MB.
MAX_SEGMENTER_BYTES = 2 << 30


def save_segmenter(model: nn.Module, config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``model``'s weights and ``config`` (JSON-serialisable, with ``arch`` and
    ``encoder``) to ``path`` atomically; returns the path."""
    for key in ("arch", "encoder"):
        if not isinstance(config.get(key), str):
            raise ValueError(f"the segmenter's config must name its {key}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(
        {
            "format": SEGMENTER_FORMAT,
            "format_version": _VERSION,
            "config": json.dumps(config, sort_keys=True),
            "state_dict": state,
        },
        buffer,
    )
    target = Path(path)
    atomic_write_bytes(target, buffer.getvalue())
    return target


def load_segmenter(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The segmenter saved at ``path`` (on the CPU, in eval mode) and its config.

    Raises:
        EngineError: a missing, unreadable or corrupted file, not a segmenter file, an
            architecture that cannot be built, or weights that do not fit it.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise EngineError("no segmenter file here", path=file)
    try:
        if file.stat().st_size > MAX_SEGMENTER_BYTES:
            raise EngineError(f"larger than {MAX_SEGMENTER_BYTES >> 20} MiB: not a segmenter",
                              path=file)
        data = torch.load(io.BytesIO(file.read_bytes()), map_location="cpu", weights_only=True)
    except EngineError:
        raise
    except Exception as err:  # any reader failure means the same thing to the user
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise EngineError(f"cannot read the segmenter ({type(err).__name__}: {reason})",
                          path=file) from None
    if not isinstance(data, dict) or data.get("format") != SEGMENTER_FORMAT:
        raise EngineError(f"not a {SEGMENTER_FORMAT} file", path=file)
    if data.get("format_version") != _VERSION:
        raise EngineError(f"segmenter format version {data.get('format_version')!r}; this "
                          f"histosynth reads version {_VERSION}", path=file)
    try:
        config = json.loads(data["config"])
        arch, encoder = config["arch"], config["encoder"]
        state = data["state_dict"]
    except (KeyError, TypeError, ValueError):
        raise EngineError("the segmenter's config is unreadable (arch and encoder)",
                          path=file) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise EngineError("expected a state dict (a mapping of names to tensors)", path=file)
    model = build_segmenter(str(arch), str(encoder))
    load_state_strict(model, state, path=file, what=f"{arch} / {encoder} segmenter")
    return model.eval(), config
