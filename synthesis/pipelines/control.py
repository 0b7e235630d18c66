"""Mask control for the PixCell pipelines: a ControlNet's residuals and two-scale guidance.

A :class:`MaskControl` (a :class:`~histosynth.synthesis.models.controlnet.PixCellControlNet`,
one binary vessel mask per image and the mask's guidance scale) makes every step of a
pipeline's denoising loop a mask-conditioned one. Each condition gets its own
classifier-free guidance scale (issue 29)::

    ε̂ = ε(∅,∅) + s_uni · (ε(e,∅) − ε(∅,∅)) + s_mask · (ε(e,m) − ε(e,∅))

``e`` are the UNI rows, ``∅`` the learned null condition for the rows and the **null
mask** for the mask — every pixel at :data:`NULL_MASK_VALUE` (−1), which is neither
"vessel" (1) nor "no vessel" (0): a ControlNet trained with mask dropout learns it as
"the mask is unknown", so a tile without vessels (all 0) stays a meaningful condition.
One forward of 3B (base and ControlNet) per step; 2B when ``s_uni == s_mask`` (ε̂ =
ε(∅,∅) + s·(ε(e,m) − ε(∅,∅))) or ``s_uni == 1`` (ε(∅,∅) cancels: ε̂ = ε(e,∅) +
s_mask·(ε(e,m) − ε(e,∅)); the embedded engine's own guidance is 1); B when both are 1.

:class:`ControlledTransformer` is the pair (base, ControlNet) as one module with the
transformer's call signature plus ``controlnet_cond`` — what the trainer calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from histosynth.synthesis.errors import EngineError

__all__ = [
    "NULL_MASK_VALUE",
    "ControlledTransformer",
    "MaskControl",
    "controlled_noise",
    "mask_tensor",
]

NULL_MASK_VALUE = -1.0
"""The mask pixel value that means "no mask given" (dropout in training, ∅ in guidance)."""


def mask_tensor(masks: np.ndarray | Tensor, size: int) -> Tensor:
    """Binary masks ``(H, W)`` / ``(B, H, W)`` (bool, 0/1 or 0/255) as float32
    ``[B, 1, H, W]`` of 0 and 1; ``H = W = size`` (the tile side, px)."""
    array = torch.as_tensor(np.asarray(masks) if not isinstance(masks, Tensor) else masks)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or tuple(array.shape[1:]) != (size, size):
        raise EngineError(
            f"expected vessel masks of {size}×{size} px (the tile size), found "
            f"{list(array.shape)}",
            item="mask",
        )
    return (array > (127 if array.dtype == torch.uint8 else 0.5)).float()[:, None]


@dataclass
class MaskControl:
    """What a mask-controlled denoising needs: the ``controlnet``, the ``masks`` float32
    [B, 1, H, W] of 0/1 (:func:`mask_tensor`), the mask's guidance scale
    ``mask_guidance`` (s_mask ≥ 1 … ; 1 = the mask without extrapolation) and the
    ``conditioning_scale`` of its residuals (1 = as trained)."""

    controlnet: nn.Module
    masks: Tensor
    mask_guidance: float = 1.0
    conditioning_scale: float = 1.0


def _forward(
    transformer: nn.Module,
    controlnet: nn.Module,
    latents: Tensor,
    t: Tensor,
    rows: Tensor,
    masks: Tensor,
    conditioning_scale: float,
) -> Tensor:
    dtype = next(transformer.parameters()).dtype
    kwargs = {"resolution": None, "aspect_ratio": None}
    residuals = controlnet(
        latents.to(dtype),
        t,
        rows.to(dtype),
        masks.to(dtype),
        conditioning_scale=conditioning_scale,
        added_cond_kwargs=kwargs,
    )
    return transformer(
        latents.to(dtype),
        encoder_hidden_states=rows.to(dtype),
        timestep=t,
        added_cond_kwargs=kwargs,
        block_residuals=residuals,
        return_dict=False,
    )[0].float()


def controlled_noise(
    transformer: nn.Module,
    control: MaskControl,
    latents: Tensor,
    timestep: Tensor | float | int,
    rows: Tensor,
    null_rows: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """ε̂ float32 [B, C, h, w] with two-scale guidance (module docstring):
    ``guidance_scale`` is s_uni, ``control.mask_guidance`` s_mask."""
    count, channels = latents.shape[0], latents.shape[1]
    masks = control.masks.to(latents.device)
    null_masks = torch.full_like(masks, NULL_MASK_VALUE)
    s_uni, s_mask = float(guidance_scale), float(control.mask_guidance)
    if s_uni == 1 and s_mask == 1:
        parts = [(rows, masks)]
    elif s_uni == 1:  # ε(∅,∅) cancels: ε(e,∅) + s_mask·(ε(e,m) − ε(e,∅))
        parts = [(rows, null_masks), (rows, masks)]
    elif null_rows is None:
        raise EngineError("guidance needs the null condition (null_rows)")
    elif s_uni == s_mask:
        parts = [(null_rows, null_masks), (rows, masks)]
    else:
        parts = [(null_rows, null_masks), (rows, null_masks), (rows, masks)]
    x = torch.cat([latents] * len(parts))
    t = torch.as_tensor(timestep, device=x.device).reshape(1).expand(x.shape[0])
    out = _forward(
        transformer,
        control.controlnet,
        x,
        t,
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        control.conditioning_scale,
    )
    if out.shape[1] == 2 * channels:  # learned σ: [ε | variance]
        out = out[:, :channels]
    eps = out.split(count)
    if len(eps) == 1:
        return eps[0]
    if len(eps) == 2:
        return eps[0] + (s_mask if s_uni == 1 else s_uni) * (eps[1] - eps[0])
    uncond, rows_only, both = eps
    return uncond + s_uni * (rows_only - uncond) + s_mask * (both - rows_only)


class ControlledTransformer(nn.Module):
    """A base transformer and a ControlNet as one module (what the trainer calls): the
    transformer's forward with ``controlnet_cond`` (masks [B, 1, H, W]: 0/1, or
    :data:`NULL_MASK_VALUE` for none) added; ``None`` is the base alone."""

    def __init__(self, transformer: nn.Module, controlnet: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.controlnet = controlnet

    @property
    def config(self) -> Any:
        return self.transformer.config

    @property
    def caption_projection(self) -> nn.Module:
        return self.transformer.caption_projection

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the ControlNet's blocks and the frozen base's (activations only)."""
        self.transformer.enable_gradient_checkpointing()
        self.controlnet.enable_gradient_checkpointing()

    def null_condition(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.transformer.null_condition(*args, **kwargs)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = False,
        controlnet_cond: Tensor | None = None,
    ) -> Any:
        residuals = None
        if controlnet_cond is not None:
            residuals = self.controlnet(
                hidden_states,
                timestep,
                encoder_hidden_states,
                controlnet_cond,
                added_cond_kwargs=added_cond_kwargs,
            )
        return self.transformer(
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            added_cond_kwargs=added_cond_kwargs,
            block_residuals=residuals,
            return_dict=return_dict,
        )
