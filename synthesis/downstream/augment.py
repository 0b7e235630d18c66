"""The downstream benchmark's augmentation arm: stain and geometric changes of a tile.

Each call draws, from the caller's generator:

* geometric — a random element of the dihedral group (flip, then 0/90/180/270° turn),
  applied to the image and its mask alike (exact: no interpolation);
* stain — in optical density (OD = −ln(rgb / 255), rgb floored at 1/255) unmixed into the
  haematoxylin, eosin and DAB stains by Ruifrok & Johnston's matrix
  (``skimage.color.hed_from_rgb``), each stain scaled by U(1 ± ``stain_scale``) and
  shifted by U(± ``stain_shift``) OD, then mixed back (Tellez et al.'s HED jitter; the
  round trip without jitter is exact, unlike ``rgb2hed``, which clips);
* brightness / contrast — ``x·c + b`` with c ~ U(1 ± ``contrast``), b ~ U(± ``brightness``)
  (fractions of the 0–255 range).

Masks change only with the geometry. Units: images uint8 RGB (H, W, 3); masks (H, W).
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

__all__ = ["AUGMENTATION", "augment"]

AUGMENTATION = {
    "geometric": "flips and 90° turns (dihedral group), image and mask alike",
    "stain": "HED jitter: per stain ×U(0.95, 1.05) + U(−0.03, 0.03) optical density",
    "brightness_contrast": "x·U(0.9, 1.1) + U(−0.05, 0.05)·255",
}
"""The documented augmentation set (what the ``+ augmentation`` arm does)."""


def augment(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    *,
    stain_scale: float = 0.05,
    stain_shift: float = 0.03,
    brightness: float = 0.05,
    contrast: float = 0.1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One augmented copy of ``image`` (and ``mask``); the inputs are not changed."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image, got {image.dtype} {image.shape}")
    flip, turns = bool(rng.integers(2)), int(rng.integers(4))

    def geometric(a: np.ndarray) -> np.ndarray:
        a = a[:, ::-1] if flip else a
        return np.ascontiguousarray(np.rot90(a, turns))

    out = geometric(image)
    density = -np.log(np.maximum(out.astype(np.float64), 1.0) / 255.0)
    stains = density @ hed_from_rgb
    scale = rng.uniform(1 - stain_scale, 1 + stain_scale, 3)
    shift = rng.uniform(-stain_shift, stain_shift, 3)
    rgb = np.exp(-((stains * scale + shift) @ rgb_from_hed))
    c = rng.uniform(1 - contrast, 1 + contrast)
    b = rng.uniform(-brightness, brightness)
    rgb = np.clip((rgb * c + b) * 255.0, 0, 255)
    return rgb.round().astype(np.uint8), None if mask is None else geometric(mask)
