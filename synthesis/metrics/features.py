"""Feature spaces the metrics are computed in: images → (N, D) float32 vectors, offline.

A feature space has a ``name``, a dimension ``dim``, a ``weights_id`` (SHA-256 of its
weights, so that cached vectors and reported numbers say which weights made them) and a
``comparable`` flag: only the published extractors' numbers can be set beside published
ones.

* ``default`` — the conditioning encoder of the embedded default engine
  (``histosynth-mini-512``: colour / texture statistics of each 128² crop, projected), the
  mean of a tile's crop rows. Offline and small; **not comparable** with published values.
* ``tiny`` — the same encoder class with seeded random weights at a tiny size (tests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FEATURE_SPACES", "FeatureSpace", "load_feature_space"]


@dataclass
class FeatureSpace:
    """``embed(images uint8 (N, H, W, 3)) -> float32 (N, dim)`` with its provenance."""

    name: str
    dim: int
    weights_id: str
    comparable: bool
    description: str
    embed: Callable[[np.ndarray], np.ndarray]
    batch_size: int = 16

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of a batch of tiles, in chunks of ``batch_size``."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        out = [
            self.embed(images[i : i + self.batch_size])
            for i in range(0, len(images), self.batch_size)
        ]
        return (
            np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)
        )


def _state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _grid_space(encoder, name: str, comparable: bool, description: str, device) -> FeatureSpace:
    encoder = encoder.to(device).eval()

    def embed(images: np.ndarray) -> np.ndarray:
        side = min(images.shape[1], images.shape[2])
        if side < encoder.crop:
            raise ValueError(
                f"tiles of {images.shape[2]}×{images.shape[1]} px are smaller than the "
                f"{encoder.crop} px crop of the {name} feature space"
            )
        with torch.no_grad():
            rows = encoder.encode(images)  # [B, rows, dim]
        return rows.float().mean(1).cpu().numpy()

    return FeatureSpace(
        name, int(encoder.dim), _state_hash(encoder), comparable, description, embed
    )


def _default(device) -> FeatureSpace:
    from histosynth.synthesis.engine import load_engine

    engine = load_engine("default", device=device)
    return _grid_space(
        engine.encoder,
        "default",
        False,
        f"the {engine.model_id} engine's conditioning encoder (colour / texture statistics "
        "of each crop, projected; offline, not comparable with published numbers)",
        device,
    )


def _tiny(device) -> FeatureSpace:
    from histosynth.synthesis.models.encoders import TinyEncoder

    return _grid_space(
        TinyEncoder(dim=16, seed=0, crop=32),
        "tiny",
        False,
        "seeded random colour / texture statistics (tests only)",
        device,
    )


FEATURE_SPACES: dict[str, Callable[[torch.device | str], FeatureSpace]] = {
    "default": _default,
    "tiny": _tiny,
}
"""The feature spaces by name."""


def load_feature_space(name: str, device: torch.device | str = "cpu") -> FeatureSpace:
    """The feature space ``name`` (one of :data:`FEATURE_SPACES`), built offline."""
    if name not in FEATURE_SPACES:
        raise ValueError(f"unknown feature space {name!r}; available: {', '.join(FEATURE_SPACES)}")
    return FEATURE_SPACES[name](device)
