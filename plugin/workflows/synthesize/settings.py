"""What a synthesize run makes and how: :class:`SynthesisSettings`, frozen and checked
when made (before any slide or weight is read), and the choices its options take."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from histosynth.common.geometry import DEFAULT_MPP, TileGeometry
from histosynth.integration.errors import InputError
from histosynth.integration.qupath.classes import SKETCH_CLASS
from histosynth.options import COUNT_MAX, GUIDANCE_MAX, MPP_MAX, SEED_MAX, STEPS_MAX, check_finite
from histosynth.synthesis import defaults

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.integration.tiles import SlideSource

__all__ = [
    "BACKGROUNDS",
    "DEFAULT_MASK_GUIDANCE",
    "DEFAULT_SHAPE_CLASS",
    "HARMONISERS",
    "MODES",
    "NO_CONTROLNET",
    "SHAPE_SOURCES",
    "SynthesisSettings",
]

#: inpaint: a real donor placed as it is; variation: tiles like real vessel tiles; shape:
#: a real donor warped into a target outline (an annotator's sketch or a deformed real one)
MODES = ("inpaint", "variation", "shape")
#: where shape mode's target outlines come from: polygons an annotator drew (of
#: ``shape_class``), or the project's real vessel outlines of the class, deformed
SHAPE_SOURCES = ("drawn", "bank")
#: the QuPath class of the outlines an annotator draws for ``--shapes drawn``
DEFAULT_SHAPE_CLASS = SKETCH_CLASS
#: shape mode with a vessel-mask ControlNet: the mask's classifier-free guidance scale
#: s_mask unless ``--mask-guidance`` names another (two-scale guidance, issue 29)
DEFAULT_MASK_GUIDANCE = 2.0
#: ``--controlnet none``: no ControlNet, not even the one the engine ships
NO_CONTROLNET = "none"

#: where inpainting backgrounds come from: real tiles of the slides; tiles generated from
#: noise conditioned on 16 rotated copies of real tissue near the donor; real, and
#: synthetic for a donor that fits no real tile.
BACKGROUNDS = ("auto", "real", "synthetic")
#: how the seam of an inpainted tile is regenerated: partial diffusion (the engine),
#: multiband (Laplacian-pyramid) blending without weights, or not at all (the composite);
#: auto: the mode the engine's metadata records as best by its evidence (the embedded
#: default: multiband), diffusion when a ControlNet steers the run, else diffusion with a
#: trained engine and multiband with an UNTRAINED one.
HARMONISERS = ("auto", "diffusion", "multiband", "none")
@dataclass(frozen=True)
class SynthesisSettings:
    """What to synthesise and how (frozen; checked when made, before anything loads).

    ``None`` means the engine's (``tile_size``, ``kv_compress``; ``model``: PixCell-1024
    when its weights are installed, else the embedded default; ``steps``, ``guidance``:
    the engine's own for the mode, ``Engine.sampling``; ``strength``: its τ,
    ``Engine.strength``) or the machine's (``batch_size``: 4 on a GPU, else 1).
    ``tile_size`` is px at ``mpp`` µm/px; ``seam_sigma`` px; ``strength`` = τ;
    ``context_ring``: px of each donor's own surrounding tissue pasted with it, so that its
    wall lies inside the pasted tissue rather than on the regenerated seam (``None``: 2σ).
    ``allow_untrained``: let an UNTRAINED engine (``tiny``) paint pixels — variation,
    synthetic backgrounds, diffusion seams — to try the workflow; its tiles fail the
    content check. ``generate_backgrounds`` is resolved by the run: whether ``--background
    auto`` may generate one for a donor that fits no real tile (the engine generates).
    Shape mode: ``shapes`` (``drawn`` | ``bank``), ``shape_class`` (the sketches' class,
    ``drawn``), ``inside_strength`` (τ inside the target outline beyond the seam band;
    ``None``: 0, the warped donor kept there); ``count`` may be ``None`` with ``drawn``
    (one tile per sketch; a count makes at most that many).
    With a vessel-mask ControlNet (shape mode): ``controlnet`` (a library name, a folder,
    ``"none"``; ``None``: the engine folder's own when it ships one), ``mask_guidance``
    (s_mask ≥ 1; ``None``: :data:`DEFAULT_MASK_GUIDANCE`), ``whole_tile`` (the whole tile
    generated from noise with the mask; needs a ControlNet and an engine serving τ = 1);
    ``controlnet_sha256`` is resolved by the run (the weights' sha256 of the ControlNet
    used, ``controlnet`` then its name; ``None``: none used).

    Raises:
        InputError: a value out of range or not one of the choices, naming the option.
    """

    classes: tuple[str, ...]
    count: int | None
    mode: str = "inpaint"
    tile_size: int | None = None
    mpp: float = DEFAULT_MPP
    model: str | None = None
    adapter: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    kv_compress: int | None = None
    seam_sigma: float = defaults.SEAM_SIGMA
    colour_blend: float = defaults.COLOUR_BLEND
    context_ring: int | None = None
    background: str = "auto"
    harmonise: str = "auto"
    batch_size: int | None = None
    device: str | None = None
    allow_untrained: bool = False
    generate_backgrounds: bool = True
    shapes: str | None = None
    shape_class: str = DEFAULT_SHAPE_CLASS
    inside_strength: float | None = None
    controlnet: str | None = None
    mask_guidance: float | None = None
    whole_tile: bool = False
    controlnet_sha256: str | None = None

    @property
    def places_donors(self) -> bool:
        """Whether tiles are real backgrounds with a donor pasted in (inpaint, shape)."""
        return self.mode in ("inpaint", "shape")

    def __post_init__(self) -> None:
        classes = (self.classes,) if isinstance(self.classes, str) else tuple(self.classes)
        object.__setattr__(self, "classes", classes)
        for name, value, choices in (
            ("mode", self.mode, MODES),
            ("background", self.background, BACKGROUNDS),
            ("harmonise", self.harmonise, HARMONISERS),
        ):
            if value not in choices:
                raise InputError(f"--{name} must be one of {', '.join(choices)}, not {value!r}")
        if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
            raise InputError("name at least one class (--class)")
        self._check_shape_options()
        steps, guidance = self.steps, self.guidance
        integers = [
            ("--count", self.count, 1, COUNT_MAX),
            ("--steps", steps, 1, STEPS_MAX),
            ("--seed", self.seed, 0, SEED_MAX),
            ("the context ring (px)", self.context_ring, 0, 256),
            ("--tile-size", self.tile_size, 64, 16384),
            ("--kv-compress", self.kv_compress, 1, 64),
            ("--batch-size", self.batch_size, 1, 1024),
        ]
        for name, value, low, high in integers:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InputError(f"{name} must be a whole number, not {value!r}")
            if not low <= value <= high:
                raise InputError(f"{name} must be in [{low}, {high}], not {value}")
        reals = [
            ("--strength", self.strength, 0.0, 1.0),
            ("--inside-strength", self.inside_strength, 0.0, 1.0),
            ("--guidance", guidance, 1.0, GUIDANCE_MAX),
            ("--mask-guidance", self.mask_guidance, 1.0, GUIDANCE_MAX),
            ("--mpp", self.mpp, 1e-6, MPP_MAX),
            ("the seam σ (px)", self.seam_sigma, 0.1, 1000.0),
            ("the colour blend", self.colour_blend, 0.0, 1.0),
        ]
        for name, value, low, high in reals:
            if value is None:
                continue
            try:
                check_finite(name, value, low, high)
            except ValueError as exc:
                raise InputError(str(exc)) from None

    def _check_shape_options(self) -> None:
        if self.mode == "shape":
            if self.shapes not in SHAPE_SOURCES:
                raise InputError(
                    f"--mode shape needs --shapes {' or '.join(SHAPE_SOURCES)}"
                    + ("" if self.shapes is None else f", not {self.shapes!r}")
                )
            if not (isinstance(self.shape_class, str) and self.shape_class.strip()):
                raise InputError("--shape-class must name a class")
            if self.background == "synthetic":
                raise InputError("--mode shape places vessels on real tissue: not with "
                                 "--background synthetic")
        elif self.shapes is not None or self.inside_strength is not None:
            raise InputError("--shapes and --inside-strength need --mode shape")
        elif self.controlnet is not None or self.mask_guidance is not None or self.whole_tile:
            raise InputError("--controlnet, --mask-guidance and --whole-tile need --mode shape")
        if self.controlnet is not None and not (
            isinstance(self.controlnet, str) and self.controlnet.strip()
        ):
            raise InputError("--controlnet must name a ControlNet, a folder or 'none'")
        if self.whole_tile and self.controlnet == NO_CONTROLNET:
            raise InputError("--whole-tile generates the tile from the mask: it needs a "
                             "ControlNet, not --controlnet none")
        if self.whole_tile and self.harmonise in ("multiband", "none"):
            raise InputError(f"--whole-tile generates the whole tile: there is no seam to "
                             f"harmonise (not with --harmonise {self.harmonise})")
        if self.count is None and not (self.mode == "shape" and self.shapes == "drawn"):
            raise InputError("--count is needed (only --shapes drawn makes one per sketch)")

    @property
    def geometry(self) -> TileGeometry:
        """The tiles' size (px) and resolution (µm/px), once the tile size is resolved
        (the engine's, :func:`~histosynth.workflows.synthesize.run_setup.resolved_settings`)."""
        if self.tile_size is None:
            raise ValueError("the tile size is the engine's until the run resolves it")
        return TileGeometry(self.tile_size, self.mpp)

    @property
    def ring(self) -> int:
        """``context_ring``, or 2σ rounded."""
        return round(2 * self.seam_sigma) if self.context_ring is None else self.context_ring

    def run_config(self, sources: Sequence[SlideSource]) -> dict[str, Any]:
        """The ``config`` of ``run.json`` (what a resumed run must match) of these settings
        as resolved for a run (model id, steps, tile size … filled in)."""
        inpaint = self.places_donors
        shape = self.mode == "shape"
        return {
            "command": "synthesize",
            "mode": self.mode,
            "classes": list(self.classes),
            "count": self.count,
            "tile_size": self.tile_size,
            "mpp": self.mpp,
            "model": self.model,
            "adapter": self.adapter,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "strength": self.strength if inpaint else None,
            "kv_compress": self.kv_compress,
            "seam_sigma": self.seam_sigma,
            "colour_blend": self.colour_blend,
            "context_ring": self.ring if inpaint else None,
            "background": self.background if inpaint else None,
            "harmonise": self.harmonise if inpaint else None,
            "sources": sorted(str(s.slide_path) for s in sources),
            **(
                {
                    "shapes": self.shapes,
                    "shape_class": self.shape_class if self.shapes == "drawn" else None,
                    "inside_strength": self.inside_strength,
                    # None (as in runs made before ControlNets) when none is used
                    **(
                        {
                            "controlnet": self.controlnet,
                            "controlnet_sha256": self.controlnet_sha256,
                            "mask_guidance": self.mask_guidance,
                            "whole_tile": self.whole_tile,
                        }
                        if self.controlnet_sha256
                        else {}
                    ),
                }
                if shape
                else {}
            ),
        }
