"""The engine's default settings — one definition each, used by the pipelines, the
inpainting steps, the command line, the Python API and the manifest (``plugin.yaml``).

The values are the dissertation's (PixCell's sampler for variations).
"""

from __future__ import annotations

__all__ = [
    "COLOUR_BLEND",
    "INPAINT_GUIDANCE",
    "INPAINT_STEPS",
    "SEAM_MODES",
    "SEAM_SIGMA",
    "STRENGTH",
    "VARIATION_GUIDANCE",
    "VARIATION_STEPS",
]

#: scheduler steps of an inpainting's full schedule (of which ``int(steps · strength)`` run)
INPAINT_STEPS = 50
#: classifier-free guidance scale of inpainting
INPAINT_GUIDANCE = 2.5
#: scheduler steps of a variation (PixCell's sampler)
VARIATION_STEPS = 20
#: classifier-free guidance scale of a variation
VARIATION_GUIDANCE = 1.5
#: τ: the fraction of the schedule that inpainting re-runs
STRENGTH = 0.55
#: σ of the seam blend, px of the tile
SEAM_SIGMA = 15.0
#: λ of the Reinhard colour transfer of a donor into its background (0 = none, 1 = full)
COLOUR_BLEND = 0.85
#: how an inpainted seam is regenerated: the diffusion model, multiband blending, or not
SEAM_MODES = ("diffusion", "multiband", "none")
