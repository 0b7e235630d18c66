"""A tile's geometry: its side in pixels and its resolution, and the conversions between
a tile's pixels, a slide's level-0 pixels and the engine's latent grid.

Units are explicit: ``size`` px, ``mpp`` µm/px (micrometres per pixel), a slide's
``slide_mpp`` µm per level-0 pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_MPP", "LATENT_DOWNSAMPLE", "TileGeometry"]

#: The resolution tiles are read and made at unless told otherwise, µm/px (PixCell's and
#: the embedded engine's: 20× scans)
DEFAULT_MPP = 0.5
#: Tile pixels per latent cell of the SD3 / embedded VAE
LATENT_DOWNSAMPLE = 8


@dataclass(frozen=True)
class TileGeometry:
    """A square tile of ``size`` px at ``mpp`` µm/px.

    >>> g = TileGeometry(512, 0.5)
    >>> g.field_um, g.level0_extent(0.25), g.latent_side()
    (256.0, 1024.0, 64)
    """

    size: int
    mpp: float = DEFAULT_MPP

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or int(self.size) != self.size or self.size < 1:
            raise ValueError(f"a tile size is a positive whole number of pixels, not {self.size!r}")
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"a resolution is a positive number of µm/px, not {self.mpp!r}")

    @property
    def field_um(self) -> float:
        """Side of the tile on the slide, µm."""
        return self.size * self.mpp

    def level0_extent(self, slide_mpp: float) -> float:
        """Side of the tile in level-0 pixels of a slide of ``slide_mpp`` µm/px."""
        return self.size * self.mpp / slide_mpp

    def scale_from(self, slide_mpp: float) -> float:
        """Tile pixels per level-0 pixel of a slide of ``slide_mpp`` µm/px."""
        return slide_mpp / self.mpp

    def latent_side(self, downsample: int = LATENT_DOWNSAMPLE) -> int:
        """Cells per side of the tile's latent, ``size / downsample``."""
        return self.size // downsample
