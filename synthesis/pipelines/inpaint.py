"""Context-aware inpainting, steps 5–6: partial diffusion of a composite, then a seam blend.

The composite ``X = (1 − M′)·T + M′·D′`` (a background tile with a pasted donor, see
:mod:`histosynth.synthesis.inpaint`) is re-rendered by SDEdit / img2img and blended back
into itself around the mask boundary only:

1. ``e = E(X)``: the encoder's rows of the composite (or ``uni_rows``);
   ``z₀ = E_VAE(X)``: the **posterior mean** of the VAE (not a sample), so the same
   composite always gives the same ``z₀`` and the seed alone decides the noise.
2. Noise ``z₀`` to the first timestep of the img2img schedule with the scheduler's own
   ``add_noise`` and per-image generators, then denoise with classifier-free guidance
   against the transformer's learned null condition
   (:func:`~histosynth.synthesis.pipelines.variation.guided_noise`), decode:
   ``X_gen = D_VAE(ẑ₀)``.
3. Seam blend: ``A = seam_weights(M′, σ)``, ``X_final = (1 − A)·X + A·X_gen``
   (:mod:`histosynth.synthesis.inpaint.seam`); where ``A == 0`` (beyond 4σ from the seam,
   inside the donor as well as in the background) ``X_final`` is ``X`` exactly.

**Strength and the first timestep** (diffusers' ``StableDiffusionImg2ImgPipeline.
get_timesteps``, followed exactly): ``scheduler.set_timesteps(N)``, ``k = min(int(N ·
strength), N)`` denoising steps, the schedule is cut to its last ``k`` timesteps
(``timesteps[(N − k) · order:]``, ``set_begin_index`` where the scheduler has it) and
``z₀`` is noised to the first of them. ``int`` truncates the float product, as in
diffusers: 0.55 × 50 → 27 steps (not 28). The dissertation writes ``t = ⌊τ · T_max⌋``
with ``τ = strength`` and ``T_max = 1000`` (550 for τ = 0.55); with a discrete schedule
the first timestep is the schedule's own value at that place, e.g. DPM-Solver++'s
``linspace`` spacing gives ``round((T_max − 1) · k / N)`` = 539 for τ = 0.55, N = 50,
DDIM's ``leading`` spacing ``(T_max / N) · (k − 1)`` = 520. The output reports it
(``start_step``) with the number of steps run.

**Strength 0**: no step at all — nothing is encoded, noised, denoised or decoded, and
``images`` and ``generated`` are copies of the composite, exactly.

Reproducible like :class:`~histosynth.synthesis.pipelines.VariationPipeline`: image ``i``
gets its own CPU ``torch.Generator`` seeded from ``seeds[i]`` that draws its noise (and
any noise the scheduler adds), so it does not depend on the batch it was made in (up to
the floating-point effect of the batch size on matrix products).

Example:
    >>> import numpy as np
    >>> from histosynth.synthesis import load_engine
    >>> engine = load_engine("tiny", tile_size=64)  # UNTRAINED: shapes only
    >>> pipe = engine.inpaint_pipeline()
    >>> pipe.set_progress_bar_config(disable=True)
    >>> composite = np.full((64, 64, 3), 200, np.uint8)
    >>> mask = np.zeros((64, 64), np.uint8)
    >>> mask[20:40, 20:40] = 255  # the inserted donor
    >>> out = pipe(composite, mask, seeds=7, num_inference_steps=4)
    >>> out.images.shape, out.images.dtype  # the seam-blended result
    ((1, 64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from histosynth.synthesis import defaults
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.inpaint.seam import seam_blend, seam_weights
from histosynth.synthesis.pipelines.control import MaskControl
from histosynth.synthesis.pipelines.variation import (
    OutputType,
    PixCellPipeline,
    checked_control,
)

__all__ = [
    "DEFAULT_INPAINT_GUIDANCE",
    "DEFAULT_INPAINT_STEPS",
    "DEFAULT_SEAM_SIGMA",
    "DEFAULT_STRENGTH",
    "InpaintPipeline",
    "InpaintPipelineOutput",
    "img2img_timesteps",
]

DEFAULT_STRENGTH = defaults.STRENGTH
DEFAULT_INPAINT_GUIDANCE = defaults.INPAINT_GUIDANCE
DEFAULT_INPAINT_STEPS = defaults.INPAINT_STEPS
DEFAULT_SEAM_SIGMA = defaults.SEAM_SIGMA


@dataclass
class InpaintPipelineOutput(BaseOutput):
    """What :class:`InpaintPipeline` returns.

    Attributes:
        images: the seam-blended results ``X_final``: ``"numpy"``: uint8 ``[N, H, W, 3]``;
            ``"pil"``: a list of RGB images; ``"latent"``: the denoised scaled latents
            ``ẑ₀`` float32 ``[N, 16, H/8, W/8]`` (no decode, no blend; at strength 0 the
            composites' own latents).
        generated: the raw decodes ``X_gen`` before the blend, in the same form as
            ``images`` (``None`` for ``"latent"``); the composites at strength 0.
        seeds: the seed of each image (drawn at random when none were given), or ``None``
            when the caller passed its own generators.
        start_step: the timestep ``z₀`` was noised to and denoising started from (in the
            training schedule's units, 0 … T_max − 1; ≈ τ · T_max); ``None`` at strength
            0 (no noise, no step).
        num_steps: denoising steps run (``int(num_inference_steps · strength)``).
    """

    images: np.ndarray | list[Any] | Tensor
    generated: np.ndarray | list[Any] | None
    seeds: list[int] | None
    start_step: int | None
    num_steps: int


def img2img_timesteps(
    scheduler: SchedulerMixin,
    num_inference_steps: int,
    strength: float,
    device: torch.device | str | None = None,
) -> tuple[Tensor, int]:
    """Cut ``scheduler``'s schedule for img2img, as diffusers' img2img pipelines do.

    Calls ``scheduler.set_timesteps(num_inference_steps, device=device)``, then keeps the
    last ``k = min(int(num_inference_steps · strength), num_inference_steps)`` steps
    (``int`` truncates, as diffusers does) and sets the scheduler's begin index there.

    Returns:
        ``(timesteps, k)``: the timesteps to run (``timesteps[0]`` is the one to noise
        to; empty when ``k == 0``) and the number of denoising steps.
    """
    scheduler.set_timesteps(int(num_inference_steps), device=device)
    init = min(int(num_inference_steps * strength), int(num_inference_steps))
    t_start = max(int(num_inference_steps) - init, 0)
    order = int(getattr(scheduler, "order", 1))
    timesteps = scheduler.timesteps[t_start * order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return timesteps, int(num_inference_steps) - t_start


def _composites(composite: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """uint8 RGB ``[B, H, W, 3]`` from one composite or a batch of them."""
    if isinstance(composite, (list, tuple)):
        if not composite:
            raise EngineError("expected at least one composite", item="composite")
        composite = np.stack([np.asarray(c) for c in composite])
    if isinstance(composite, Tensor) or not isinstance(composite, np.ndarray):
        raise EngineError(
            f"expected uint8 numpy RGB images, found {type(composite).__name__}", item="composite"
        )
    images = composite[None] if composite.ndim == 3 else composite
    if images.ndim != 4 or images.shape[-1] != 3:
        raise EngineError(
            f"expected RGB images (H, W, 3) or (B, H, W, 3), found {composite.shape}",
            item="composite",
        )
    if images.dtype != np.uint8:
        raise EngineError(f"expected uint8 images, found {images.dtype}", item="composite")
    return np.ascontiguousarray(images)


def _masks(mask: np.ndarray | Sequence[np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    """Boolean masks ``[B, H, W]`` matching ``shape`` from 0/255, 0/1 or bool masks."""
    if isinstance(mask, (list, tuple)):
        mask = np.stack([np.asarray(m) for m in mask])
    if isinstance(mask, Tensor) or not isinstance(mask, np.ndarray):
        raise EngineError(f"expected numpy masks, found {type(mask).__name__}", item="mask")
    masks = mask[None] if mask.ndim == 2 else mask
    if masks.shape != shape:
        b, h, w = shape
        expected = f"({h}, {w})" if b == 1 else f"({b}, {h}, {w})"
        raise EngineError(
            f"expected a mask of shape {expected} (one per composite, same "
            f"size), found {mask.shape}",
            item="mask",
        )
    if masks.dtype == np.bool_:
        return masks
    if not np.issubdtype(masks.dtype, np.number):
        raise EngineError(f"expected a bool or 0/255 mask, found {masks.dtype}", item="mask")
    for i, one in enumerate(masks):
        values = set(np.unique(one).tolist())
        if not (values <= {0, 255} or values <= {0, 1}):
            where = "" if len(masks) == 1 else f" (mask {i})"
            raise EngineError(
                f"expected mask values 0/255 (or 0/1, or bool), found {sorted(values)[:6]}{where}",
                item="mask",
            )
    return masks > 0


#: latent cells decoded beyond the seam band on every side (the decoder's context)
BAND_MARGIN_CELLS = 8


def band_window(weights: np.ndarray, downsample: int, cells: int) -> tuple[slice, slice] | None:
    """The latent window (rows, columns) that covers every pixel where the seam blend
    ``weights`` are non-zero plus ``cells`` latent cells of context on each side, or
    ``None`` when it would cover most of the tile (decoding the tile costs about the
    same)."""
    rows, columns = np.nonzero(weights > 0)
    side_h, side_w = (n // downsample for n in weights.shape)
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    top = max(int(rows.min()) // downsample - cells, 0)
    bottom = min(-(-(int(rows.max()) + 1) // downsample) + cells, side_h)
    left = max(int(columns.min()) // downsample - cells, 0)
    right = min(-(-(int(columns.max()) + 1) // downsample) + cells, side_w)
    if (bottom - top) * (right - left) > 0.7 * side_h * side_w:
        return None
    return slice(top, bottom), slice(left, right)


def region_strengths(
    weights: Sequence[np.ndarray],
    inside: np.ndarray,
    strength: float,
    inside_strength: float,
    downsample: int,
) -> np.ndarray:
    """Each latent cell's τ ``[B, h, w]`` for masked partial diffusion: ``inside_strength``
    where a pixel of the cell is ``inside``, else ``strength`` where the seam blend
    ``weights`` are non-zero, else 0 (the cell is the composite's); the most of its
    pixels."""
    count, height, width = inside.shape
    h, w = height // downsample, width // downsample
    out = np.zeros((count, h, w), np.float32)
    for i in range(count):
        band = (weights[i] > 0)[: h * downsample, : w * downsample]
        core = inside[i][: h * downsample, : w * downsample]
        pooled_band = band.reshape(h, downsample, w, downsample).any(axis=(1, 3))
        pooled_core = core.reshape(h, downsample, w, downsample).any(axis=(1, 3))
        out[i] = np.where(pooled_band, strength, 0.0)
        out[i][pooled_core] = np.maximum(out[i][pooled_core], inside_strength)
    return out


def _region_lock(
    scheduler: SchedulerMixin,
    clean: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    num_inference_steps: int,
    cells: np.ndarray,
    callback: Callable | None,
    tensor_inputs: Sequence[str],
) -> tuple[Callable, Sequence[str]]:
    """A step-end callback that holds every latent cell to the composite (noised to the
    next step's timestep; clean after the last) until the schedule reaches its τ, then
    calls ``callback``. A cell of τ s runs the last ``int(N · s)`` steps of the schedule
    (``int`` truncates, as :func:`img2img_timesteps` does)."""
    total = len(timesteps)
    runs = torch.as_tensor(
        np.minimum((num_inference_steps * cells).astype(np.int64), total), device=clean.device
    )  # [B, h, w]: steps each cell runs
    first = (total - runs)[:, None]  # the step index at which a cell starts running

    def lock(pipe: Any, i: int, t: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        latents = state["latents"]
        following = i + 1
        held = first > following if following < total else runs[:, None] == 0
        if bool(held.any()):
            if following < total:
                step = timesteps[following : following + 1].repeat(latents.shape[0])
                target = scheduler.add_noise(clean, noise, step)
            else:
                target = clean
            latents = torch.where(held, target.to(latents.dtype), latents)
        if callback is None:
            return {"latents": latents}
        seen = {**state, "latents": latents}
        returned = callback(pipe, i, t, {k: seen[k] for k in tensor_inputs}) or {}
        return {"latents": returned.get("latents", latents)}

    return lock, ("latents", *[k for k in tensor_inputs if k != "latents"])


class InpaintPipeline(PixCellPipeline):
    """Partial diffusion of composites (SDEdit) with a seam blend around the mask.

    Components (``register_modules``, as :class:`~histosynth.synthesis.pipelines.
    VariationPipeline`): ``transformer`` (a PixCell DiT), ``vae`` (the SD3
    ``AutoencoderKL``), ``scheduler`` (any diffusers scheduler; see
    :func:`histosynth.synthesis.engine.make_scheduler`), ``encoder`` (a
    :class:`~histosynth.synthesis.models.encoders.GridEncoder`; optional when ``uni_rows``
    are passed). Tiles are ``transformer.config.sample_size × 8`` px.
    :attr:`default_strength`, :attr:`default_steps` and :attr:`default_guidance` serve a
    call that names none (the engine's own, when the pipeline comes from
    ``Engine.inpaint_pipeline``; else :mod:`histosynth.synthesis.defaults`).
    """

    default_strength: float = DEFAULT_STRENGTH
    #: the steps and CFG scale of a call that names none (the engine's, when the pipeline
    #: comes from ``Engine.inpaint_pipeline``)
    default_steps: int = DEFAULT_INPAINT_STEPS
    default_guidance: float = DEFAULT_INPAINT_GUIDANCE
    #: the largest τ its denoiser serves (the engine's ``abilities.max_strength``)
    max_strength: float = 1.0

    def _decode(
        self, latents: Tensor, images: np.ndarray, weights: Sequence[np.ndarray], decode: str
    ) -> np.ndarray:
        """The generated tiles: ``"tile"`` decodes every latent; ``"band"`` each composite
        with the latent window around its seam band decoded in place (:func:`band_window`;
        a window that covers most of the tile decodes the tile)."""
        if decode == "tile":
            return self.codec.decode(latents, output="numpy")
        if decode != "band":
            raise EngineError(f"decode is 'band' or 'tile', not {decode!r}", item="decode")
        down = self.codec.downsample
        out = images.copy()
        for i, weight in enumerate(weights):
            window = band_window(weight, down, BAND_MARGIN_CELLS)
            if window is None:
                out[i] = self.codec.decode(latents[i : i + 1], output="numpy")[0]
                continue
            rows, columns = window
            if rows.stop <= rows.start or columns.stop <= columns.start:
                continue  # no seam: the composite
            decoded = self.codec.decode(latents[i : i + 1, :, rows, columns], output="numpy")[0]
            y, x = rows.start * down, columns.start * down
            out[i, y : y + decoded.shape[0], x : x + decoded.shape[1]] = decoded
        return out

    def _checked_strength(self, strength: float | None) -> float:
        """τ of a call (``None``: :attr:`default_strength`), within [0, 1] and what the
        denoiser serves."""
        strength = self.default_strength if strength is None else strength
        if not 0 <= float(strength) <= 1:
            raise EngineError(f"expected a strength in [0, 1], got {strength}", item="strength")
        if float(strength) > self.max_strength + 1e-9:
            raise EngineError(
                f"this engine's denoiser serves strengths up to {self.max_strength:g} (the "
                f"timesteps it was trained on), not {strength}",
                item="strength",
            )
        return float(strength)

    def _region(
        self,
        masks: np.ndarray,
        inside: np.ndarray | Sequence[np.ndarray] | None,
        strength: float,
        inside_strength: float | None,
        seam_sigma: float,
    ) -> tuple[list[np.ndarray], np.ndarray | None, float]:
        """What a call regenerates: the blend weights of each image (the seam band, and
        the ``inside`` region where its τ is not 0), each latent cell's τ (``None``
        without ``inside``: the whole tile at ``strength``) and the highest τ."""
        weights = [seam_weights(m, sigma=float(seam_sigma)) for m in masks]
        if inside is None:
            return weights, None, strength
        inner = _masks(inside, masks.shape)
        inner_strength = self._checked_strength(
            strength if inside_strength is None else inside_strength
        )
        cells = region_strengths(weights, inner, strength, inner_strength, self.codec.downsample)
        if inner_strength > 0:
            weights = [np.maximum(w, inner[i]) for i, w in enumerate(weights)]
        return weights, cells, max(strength, inner_strength)

    def _rows(self, images: np.ndarray, uni_rows: Tensor | np.ndarray | None) -> Tensor:
        """Condition rows ``[B, tokens, dim]``, float32 on the execution device."""
        if uni_rows is None:
            if self.encoder is None:
                raise EngineError(
                    "this pipeline has no encoder; pass uni_rows instead", item="uni_rows"
                )
            rows = self.encoder.encode(images)
        else:
            rows = self._given_rows(uni_rows)
        return self._checked_rows(rows, images.shape[0])

    @torch.no_grad()
    def __call__(
        self,
        composite: np.ndarray | Sequence[np.ndarray],
        mask: np.ndarray | Sequence[np.ndarray],
        *,
        strength: float | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        seeds: int | Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seam_sigma: float = DEFAULT_SEAM_SIGMA,
        adapter: str | None = None,
        uni_rows: Tensor | np.ndarray | None = None,
        decode: Literal["band", "tile"] = "band",
        inside: np.ndarray | Sequence[np.ndarray] | None = None,
        inside_strength: float | None = None,
        control: MaskControl | None = None,
        output_type: OutputType = "numpy",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> InpaintPipelineOutput | tuple:
        """Re-render composites by partial diffusion and blend the result in at the seam.

        Args:
            composite: uint8 RGB ``(H, W, 3)`` or ``(B, H, W, 3)`` (or a list),
                ``H = W =`` :attr:`tile_size`.
            mask: the pasted donor's mask M′, ``(H, W)`` or ``(B, H, W)``: bool, 0/255 or
                0/1; one per composite.
            strength: τ in [0, 1], the fraction of the schedule re-run (module docstring);
                0 returns the composites unchanged; ``None``: :attr:`default_strength`.
            guidance_scale: CFG scale s against the learned null condition; 1 = the
                conditional prediction alone (half the cost); ``None``:
                :attr:`default_guidance` (the engine's own).
            num_inference_steps: steps of the full schedule N (``int(N · τ)`` run);
                ``None``: :attr:`default_steps` (the engine's own).
            seeds: one seed per composite (an ``int`` s means ``s, s+1, ...``); ``None``
                draws fresh seeds and reports them.
            generator: instead of ``seeds``, one generator (the noise then depends on the
                batch) or one per composite.
            seam_sigma: σ of the seam blend, px (the weights are 0 beyond 4σ).
            adapter: a LoRA adapter loaded on the transformer, for this call only.
            uni_rows: the condition ``[B, tokens, dim]`` instead of the encoder's rows of
                the composites.
            decode: ``"band"`` decodes only the latent window around the seam band (what
                the blend keeps; ``generated`` is the composite beyond it; about half the
                decoder's cost for a vessel of a third of the tile), ``"tile"`` the whole
                tile.
            inside: masked partial diffusion (shape mode): a region ``(H, W)`` /
                ``(B, H, W)`` regenerated at ``inside_strength`` as well as the seam band
                at ``strength``; every latent cell outside both is, at every step, the
                composite's latent noised to that step (and the composite's at the end),
                and a cell of lower strength joins the denoising when the schedule reaches
                its strength (:func:`region_strengths`). The blend keeps the generated
                pixels inside the region and in the seam band, the composite beyond 4σ.
            inside_strength: τ of ``inside`` (``None``: ``strength``).
            control: a vessel-mask ControlNet and one mask per composite
                (:class:`~histosynth.synthesis.pipelines.control.MaskControl`): every
                denoising step is mask-conditioned with its own guidance scale.
            output_type: ``"numpy"``, ``"pil"`` or ``"latent"`` (see
                :class:`InpaintPipelineOutput`).
            return_dict: return an :class:`InpaintPipelineOutput`, else the tuple
                ``(images, generated, seeds, start_step, num_steps)``.
            callback_on_step_end: ``f(pipe, step, t, {"latents": …}) -> dict`` after each
                step (diffusers' convention); returned ``latents`` replace the current.
            callback_on_step_end_tensor_inputs: the tensors the callback sees.

        Raises:
            EngineError: composites that are not uint8 RGB tiles of the engine's tile
                size, masks of another shape or values, rows of the wrong shape, a wrong
                number of seeds, a strength outside [0, 1], an unknown adapter or output
                type.
        """
        guidance_scale = self.default_guidance if guidance_scale is None else guidance_scale
        num_inference_steps = (
            self.default_steps if num_inference_steps is None else num_inference_steps
        )
        self.check_inputs(
            output_type=output_type,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        strength = self._checked_strength(strength)
        if not float(seam_sigma) > 0:
            raise EngineError(f"expected a positive σ, px, got {seam_sigma}", item="seam_sigma")
        images = _composites(composite)
        count, height, width = images.shape[:3]
        side = self.tile_size
        if (height, width) != (side, side):
            raise EngineError(f"expected composites of {side}×{side} px (the engine's tile "
                              f"size), found {width}×{height} px", item="composite")
        masks = _masks(mask, (count, height, width))
        seed_list, gen = self._seeds(seeds, generator, count)
        weights, cells, top = self._region(masks, inside, strength, inside_strength, seam_sigma)
        timesteps, num_steps = img2img_timesteps(
            self.scheduler, int(num_inference_steps), float(top), self._execution_device
        )
        if num_steps == 0:
            return self._finish(
                images.copy(), images.copy(), seed_list, None, 0, output_type, return_dict
            )

        rows = self._rows(images, uni_rows)
        step_end = (callback_on_step_end, callback_on_step_end_tensor_inputs)
        latents = self._partial_denoise(
            images, rows, timesteps, int(num_inference_steps), cells, guidance_scale, gen,
            adapter, step_end, checked_control(control, count),
        )

        start = int(timesteps[0])
        if output_type == "latent":
            return self._finish(
                latents, None, seed_list, start, num_steps, output_type, return_dict
            )
        generated = self._decode(latents, images, weights, decode)
        final = np.stack([seam_blend(images[i], generated[i], weights[i]) for i in range(count)])
        return self._finish(final, generated, seed_list, start, num_steps, output_type, return_dict)

    def _partial_denoise(
        self,
        images: np.ndarray,
        rows: Tensor,
        timesteps: Tensor,
        num_inference_steps: int,
        cells: np.ndarray | None,
        guidance_scale: float,
        gen: Any,
        adapter: str | None,
        step_end: tuple[Callable | None, Sequence[str]],
        control: MaskControl | None = None,
    ) -> Tensor:
        """The composites' latents (posterior mean) noised to ``timesteps[0]`` and denoised;
        with ``cells`` (each latent cell's τ) a cell is held to the noised composite until
        the schedule reaches its τ (:func:`_region_lock`)."""
        count, device = images.shape[0], self._execution_device
        clean = self.codec.encode(images).to(device, torch.float32)
        noise = randn_tensor(clean.shape, generator=gen, device=device, dtype=torch.float32)
        latents = self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(count))
        callback, tensor_inputs = step_end
        if cells is not None:
            callback, tensor_inputs = _region_lock(
                self.scheduler, clean, noise, timesteps, num_inference_steps, cells,
                callback, tensor_inputs,
            )
        return self.denoise(
            latents,
            timesteps,
            rows,
            guidance_scale,
            gen,
            adapter=adapter,
            control=control,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )

    def _finish(
        self,
        images: Any,
        generated: Any,
        seeds: list[int] | None,
        start_step: int | None,
        num_steps: int,
        output_type: OutputType,
        return_dict: bool,
    ) -> InpaintPipelineOutput | tuple:
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(im) for im in images]
            generated = [Image.fromarray(im) for im in generated]
        elif output_type == "latent" and isinstance(images, np.ndarray):
            # strength 0: the composites' latents are the output (nothing was denoised)
            images, generated = self.codec.encode(images).float(), None
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, generated, seeds, start_step, num_steps
        return InpaintPipelineOutput(
            images=images,
            generated=generated,
            seeds=seeds,
            start_step=start_step,
            num_steps=num_steps,
        )
