"""Reference-conditioned variation: new tiles with a reference tile's morphology, no mask.

``e = E(reference)`` (UNI rows: 16 × 1536 for a 1024² tile), ``z_T ~ N(0, I)``, then the
scheduler's steps with classifier-free guidance against the transformer's *learned* null
condition, ``ε̂ = ε(z, t, ∅) + s · (ε(z, t, e) − ε(z, t, ∅))``, and the VAE decodes
``z_0``. The conditional and unconditional predictions are one forward of 2B; at
``s = 1`` the unconditional pass is skipped (ε̂ is the conditional prediction alone).
PixCell predicts a learned variance too (32 output channels); the first 16 are ε.

Defaults: DPM-Solver++ (``histosynth.synthesis.engine.make_scheduler``), 20 steps,
guidance 1.5 — PixCell's public sampler (DPM-Solver, 20 steps, guidance 1.5–2; its model
card samples with 1.5). The inpainting workflow uses its own defaults (50 steps, 2.5).

Reproducible: every image gets its own ``torch.Generator`` (on the CPU) seeded from
``seeds[i]``, which draws its initial noise and any noise the scheduler adds, so image
``i`` depends on its seed and reference only, not on the batch it was made in (up to
the floating-point effect of the batch size on the matrix products).

Example:
    >>> import numpy as np
    >>> from histosynth.synthesis import load_engine
    >>> engine = load_engine("tiny", tile_size=64)  # UNTRAINED: shapes only
    >>> pipe = engine.variation_pipeline()
    >>> pipe.set_progress_bar_config(disable=True)
    >>> reference_tile = np.full((64, 64, 3), 200, np.uint8)
    >>> out = pipe(reference_tile, seeds=[1, 2], num_inference_steps=2)
    >>> out.images.shape, out.images.dtype  # two variations of the tile, uint8 RGB
    ((2, 64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

import inspect
import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from histosynth.synthesis import defaults
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import ImageInput, image_batch
from histosynth.synthesis.models.vae import LatentCodec
from histosynth.synthesis.pipelines.control import MaskControl, controlled_noise

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_STEPS",
    "OutputType",
    "VariationPipeline",
    "VariationPipelineOutput",
    "adapter_scope",
    "generators_for",
    "guided_noise",
]

#: PixCell's public sampler: guidance 1.5 (its sampler script allows 1.5–2), 20 steps
DEFAULT_GUIDANCE_SCALE = defaults.VARIATION_GUIDANCE
DEFAULT_STEPS = defaults.VARIATION_STEPS

#: what the pipelines return their images as (see their outputs)
OutputType = Literal["numpy", "pil", "latent"]


@dataclass
class VariationPipelineOutput(BaseOutput):
    """What :class:`VariationPipeline` returns.

    Attributes:
        images: ``"numpy"``: uint8 ``[N, H, W, 3]``; ``"pil"``: a list of RGB images;
            ``"latent"``: float32 scaled latents ``[N, 16, H/8, W/8]``.
        seeds: the seed of each image (drawn at random when none were given), or ``None``
            when the caller passed its own generators.
    """

    images: np.ndarray | list[Any] | Tensor
    seeds: list[int] | None


# --------------------------------------------------------------------------- building blocks


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per seed (CPU noise is the same on every device)."""
    out = []
    for seed in seeds:
        if int(seed) != seed or not 0 <= int(seed) < 2**64:
            raise EngineError(f"expected seeds in 0 … 2**64 − 1, got {seed!r}", item="seeds")
        out.append(torch.Generator(device="cpu").manual_seed(int(seed)))
    return out


def guided_noise(
    transformer: nn.Module,
    latents: Tensor,
    timestep: Tensor | float | int,
    rows: Tensor,
    null_rows: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """ε̂ for ``latents`` [B, C, h, w] at ``timestep``: float32 [B, C, h, w].

    ``guidance_scale == 1``: the conditional prediction ε(z, t, rows) alone (one forward
    of B; ``null_rows`` is not used). Otherwise one forward of 2B on ``[null_rows; rows]``
    and ``ε(∅) + s · (ε(rows) − ε(∅))``. A learned-variance output (2C channels) is cut to
    its first C channels.
    """
    dtype = next(transformer.parameters()).dtype
    channels = latents.shape[1]
    if guidance_scale == 1:
        x, cond = latents, rows
    else:
        if null_rows is None:
            raise EngineError("guidance needs the null condition (null_rows)")
        x, cond = torch.cat([latents, latents]), torch.cat([null_rows, rows])
    t = torch.as_tensor(timestep, device=x.device)
    t = t.reshape(1).expand(x.shape[0])
    out = transformer(
        x.to(dtype),
        encoder_hidden_states=cond.to(dtype),
        timestep=t,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0].float()
    if out.shape[1] == 2 * channels:  # learned σ: [ε | variance]
        out = out[:, :channels]
    if guidance_scale == 1:
        return out
    uncond, cond_eps = out.chunk(2)
    return uncond + guidance_scale * (cond_eps - uncond)


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapter_scope(transformer: nn.Module, adapter: str | None) -> Iterator[None]:
    """Use LoRA adapter ``adapter`` inside the block, then restore the previous state.

    ``None`` changes nothing. The previous state is which adapters were active, whether
    adapters were enabled, and which adapter parameters required grad (peft's
    ``set_adapter`` marks the adapter trainable).

    Raises:
        EngineError: no such adapter on the transformer; another adapter is fused into
            the base weights.
    """
    if adapter is None:
        yield
        return
    loaded = list(getattr(transformer, "peft_config", {}) or {})
    if not getattr(transformer, "_hf_peft_config_loaded", False) or adapter not in loaded:
        raise EngineError(
            f"no adapter {adapter!r} is loaded on the transformer (loaded: {loaded})",
            item="adapter",
        )
    layers = _tuner_layers(transformer)
    merged = sorted({name for layer in layers for name in getattr(layer, "merged_adapters", [])})
    if merged and merged != [adapter]:
        raise EngineError(
            f"adapter(s) {merged} are fused into the base weights; unfuse them "
            f"before using adapter {adapter!r}",
            item="adapter",
        )
    previous = list(layers[0].active_adapters)
    was_disabled = bool(layers[0].disable_adapters)
    grads = {p: p.requires_grad for n, p in transformer.named_parameters() if "lora_" in n}
    try:
        transformer.set_adapter(adapter)
        transformer.enable_adapters()
        yield
    finally:
        if previous:
            transformer.set_adapter(previous)
        if was_disabled:
            transformer.disable_adapters()
        for param, flag in grads.items():
            param.requires_grad_(flag)


# --------------------------------------------------------------------------- the pipeline


def checked_control(control: MaskControl | None, count: int) -> MaskControl | None:
    """``control`` with one mask per image (a single mask serves every image)."""
    if control is None:
        return None
    masks = control.masks
    if masks.shape[0] == 1 and count > 1:
        masks = masks.expand(count, -1, -1, -1)
    if masks.shape[0] != count:
        raise EngineError(
            f"expected one vessel mask per image ({count}), got {masks.shape[0]}", item="mask"
        )
    if not float(control.mask_guidance) >= 1 or not math.isfinite(float(control.mask_guidance)):
        raise EngineError(
            f"expected a mask guidance scale ≥ 1, got {control.mask_guidance}",
            item="mask_guidance",
        )
    return MaskControl(control.controlnet, masks, control.mask_guidance, control.conditioning_scale)


class PixCellPipeline(DiffusionPipeline):
    """What the PixCell pipelines share: the components, the tile size, seeds and the
    checks of condition rows. Components (``register_modules``): ``transformer`` (a
    PixCell DiT), ``vae`` (the SD3 ``AutoencoderKL``), ``scheduler`` (any diffusers
    scheduler), ``encoder`` (optional when ``uni_rows`` are passed)."""

    model_cpu_offload_seq = "encoder->transformer->vae"
    _optional_components = ["encoder"]  # noqa: RUF012 - diffusers' class attribute

    def __init__(
        self,
        transformer: nn.Module,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler, encoder=encoder
        )

    # -- derived facts

    @property
    def codec(self) -> LatentCodec:
        """The latent codec on the current VAE (scale and shift applied there only)."""
        return LatentCodec(self.vae)

    @property
    def tile_size(self) -> int:
        """Side of the tiles this pipeline takes and makes, px."""
        return int(self.transformer.config.sample_size) * self.codec.downsample

    # -- inputs

    @staticmethod
    def _given_rows(uni_rows: Tensor | np.ndarray) -> Tensor:
        """The condition rows a caller passed as a tensor; ``[tokens, dim]`` is one image's."""
        rows = torch.as_tensor(uni_rows)
        return rows[None] if rows.ndim == 2 else rows

    def _checked_rows(self, rows: Tensor, batch: int | None = None) -> Tensor:
        """Condition rows ``[B, tokens, dim]`` checked against the transformer (and the
        batch size, when given), as float32 on the execution device."""
        cfg = self.transformer.config
        tokens, channels = cfg.caption_num_tokens, cfg.caption_channels
        expected = f"[{batch if batch is not None else 'B'}, {tokens}, {channels}]"
        if (
            rows.ndim != 3
            or tuple(rows.shape[1:]) != (tokens, channels)
            or (batch is not None and rows.shape[0] != batch)
        ):
            raise EngineError(
                f"expected UNI rows {expected} (one set per image), found {list(rows.shape)}",
                item="uni_rows",
            )
        if not rows.is_floating_point():
            raise EngineError(f"expected float UNI rows, found {rows.dtype}", item="uni_rows")
        return rows.to(self._execution_device, torch.float32)

    @staticmethod
    def _seeds(
        seeds: int | Sequence[int] | None,
        generator: torch.Generator | list[torch.Generator] | None,
        count: int,
    ) -> tuple[list[int] | None, torch.Generator | list[torch.Generator]]:
        if seeds is not None and generator is not None:
            raise EngineError("give seeds or generator, not both", item="seeds")
        if generator is not None:
            if isinstance(generator, list) and len(generator) != count:
                raise EngineError(
                    f"expected {count} generators (one per image), got {len(generator)}",
                    item="generator",
                )
            return None, generator
        if seeds is None:
            seeds = [secrets.randbits(32) for _ in range(count)]
        elif isinstance(seeds, (int, np.integer)):
            seeds = [int(seeds) + i for i in range(count)]
        else:
            seeds = [int(s) for s in seeds]
        if len(seeds) != count:
            raise EngineError(
                f"expected {count} seeds (one per image), got {len(seeds)}", item="seeds"
            )
        return seeds, generators_for(seeds)

    def _step_kwargs(self, generator: Any) -> dict[str, Any]:
        params = set(inspect.signature(self.scheduler.step).parameters)
        return {"generator": generator} if "generator" in params else {}

    _callback_tensor_inputs = ("latents",)  # what callback_on_step_end may read and replace

    def check_inputs(
        self,
        *,
        output_type: str,
        num_inference_steps: int,
        guidance_scale: float,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> None:
        """The checks every PixCell pipeline makes before it runs (diffusers' shape).

        Raises:
            EngineError: an unknown output type, a number of steps that is not a positive
                integer, a guidance scale below 1 or not finite, a callback that is not
                callable, or tensor inputs it may not see.
        """
        if output_type not in ("numpy", "pil", "latent"):
            raise EngineError(
                "expected output_type 'numpy', 'pil' or 'latent'", item=str(output_type)
            )
        if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
            raise EngineError("expected a positive integer", item="num_inference_steps")
        if not (math.isfinite(float(guidance_scale)) and float(guidance_scale) >= 1):
            raise EngineError(
                f"expected a guidance scale ≥ 1, got {guidance_scale}", item="guidance_scale"
            )
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise EngineError("expected a callable", item="callback_on_step_end")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise EngineError(
                f"callbacks may see {', '.join(self._callback_tensor_inputs)}, not "
                + ", ".join(sorted(unknown)),
                item="callback_on_step_end_tensor_inputs",
            )

    def denoise(
        self,
        latents: Tensor,
        timesteps: Tensor,
        rows: Tensor,
        guidance_scale: float,
        generator: Any,
        *,
        adapter: str | None = None,
        control: MaskControl | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Tensor:
        """The denoising loop both pipelines run: for each ``t`` of ``timesteps``, the
        guided noise estimate (CFG against the learned null condition; none at scale 1;
        with ``control`` the two-scale guidance of
        :func:`~histosynth.synthesis.pipelines.control.controlled_noise`) and one
        scheduler step, under ``adapter``; then ``callback_on_step_end(self, i, t,
        {name: tensor})`` (diffusers' convention), whose returned ``latents`` replace them."""
        count = latents.shape[0]
        null_rows = None
        if guidance_scale != 1 or (control is not None and control.mask_guidance != 1):
            null_rows = self.transformer.null_condition(
                count, dtype=torch.float32, device=latents.device
            )
        step_kwargs = self._step_kwargs(generator)
        with (
            adapter_scope(self.transformer, adapter),
            self.progress_bar(total=len(timesteps)) as bar,
        ):
            for i, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                if control is None:
                    eps = guided_noise(
                        self.transformer, model_input, t, rows, null_rows, guidance_scale
                    )
                else:
                    eps = controlled_noise(
                        self.transformer, control, model_input, t, rows, null_rows,
                        guidance_scale,
                    )
                latents = self.scheduler.step(eps, t, latents, return_dict=False, **step_kwargs)[0]
                if callback_on_step_end is not None:
                    state = {"latents": latents}
                    seen = {k: state[k] for k in callback_on_step_end_tensor_inputs}
                    returned = callback_on_step_end(self, i, t, seen) or {}
                    latents = returned.get("latents", latents)
                bar.update()
        return latents


class VariationPipeline(PixCellPipeline):
    """Variations of reference tiles: UNI condition → guided denoising → VAE decode.

    Components (``register_modules``): ``transformer`` (a PixCell DiT), ``vae`` (the SD3
    ``AutoencoderKL``), ``scheduler`` (any diffusers scheduler; see
    :func:`histosynth.synthesis.engine.make_scheduler`), ``encoder`` (a
    :class:`~histosynth.synthesis.models.encoders.GridEncoder`, a plain ``nn.Module``;
    optional when ``uni_rows`` are passed). The tile side is
    ``transformer.config.sample_size × 8`` (1024 for PixCell-1024).
    :attr:`default_steps` and :attr:`default_guidance` serve a call that names none (the
    engine's own, when the pipeline comes from ``Engine.variation_pipeline``).
    """

    default_steps: int = DEFAULT_STEPS
    default_guidance: float = DEFAULT_GUIDANCE_SCALE

    def _condition(self, reference: ImageInput | None, uni_rows: Tensor | None) -> Tensor:
        """UNI rows [B, tokens, dim] (float32 on the transformer's device)."""
        if (reference is None) == (uni_rows is None):
            raise EngineError(
                "give either reference images or uni_rows (one of them)", item="reference"
            )
        if reference is not None:
            if self.encoder is None:
                raise EngineError(
                    "this pipeline has no encoder; pass uni_rows instead", item="reference"
                )
            images = image_batch(reference, name="reference")
            side = self.tile_size
            if tuple(images.shape[-2:]) != (side, side):
                h, w = images.shape[-2:]
                raise EngineError(
                    f"expected RGB tiles of {side}×{side} px (the engine's tile size), "
                    f"found {w}×{h} px",
                    item="reference",
                )
            rows = self.encoder.encode(images)
        else:
            rows = self._given_rows(uni_rows)
        return self._checked_rows(rows)

    # -- call

    @torch.no_grad()
    def __call__(
        self,
        reference: ImageInput | None = None,
        *,
        uni_rows: Tensor | np.ndarray | None = None,
        num_images_per_reference: int = 1,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        seeds: int | Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        adapter: str | None = None,
        control: MaskControl | None = None,
        output_type: OutputType = "numpy",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> VariationPipelineOutput | tuple:
        """Make ``num_images_per_reference`` variations of each reference tile.

        Args:
            reference: RGB tiles, ``(H, W, 3)`` / ``(B, H, W, 3)`` uint8 (or floats in
                [0, 1], or torch ``(B, 3, H, W)``), ``H = W =`` :attr:`tile_size`.
            uni_rows: instead of ``reference``, the encoder's rows ``[B, tokens, dim]``.
            num_images_per_reference: variations per reference; images come out grouped
                by reference (``ref0 #0, ref0 #1, ref1 #0, ...``).
            guidance_scale: CFG scale s against the learned null condition; 1 = the
                conditional prediction alone (no unconditional pass); ``None``:
                :attr:`default_guidance` (the engine's own).
            num_inference_steps: scheduler steps; ``None``: :attr:`default_steps`.
            seeds: one seed per output image (an ``int`` s means ``s, s+1, ...``);
                ``None`` draws fresh seeds and reports them in the output. ``k`` seeds per
                reference (with ``num_images_per_reference`` left at 1) make ``k``
                variations of each: ``pipe(tile, seeds=[0, 1])`` gives two.
            generator: instead of ``seeds``, a generator (noise then depends on the batch)
                or one generator per image.
            adapter: name of a LoRA adapter loaded on the transformer to use for this
                call only; the previous adapter state is restored afterwards.
            control: a vessel-mask ControlNet and one mask per output image
                (:class:`~histosynth.synthesis.pipelines.control.MaskControl`).
            output_type: ``"numpy"`` (uint8 ``[N, H, W, 3]``), ``"pil"`` or ``"latent"``.
            return_dict: return a :class:`VariationPipelineOutput` (else a tuple).
            callback_on_step_end: ``f(pipe, step, t, {"latents": …}) -> dict`` after each
                step (diffusers' convention); returned ``latents`` replace the current.
            callback_on_step_end_tensor_inputs: the tensors the callback sees.

        Raises:
            EngineError: a reference of the wrong size or shape, rows of the wrong shape,
                a wrong number of seeds, an unknown adapter or output type.
        """
        if guidance_scale is None:
            guidance_scale = self.default_guidance
        if num_inference_steps is None:
            num_inference_steps = self.default_steps
        self.check_inputs(
            output_type=output_type,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        if int(num_images_per_reference) != num_images_per_reference or (
            num_images_per_reference < 1
        ):
            raise EngineError("expected a positive integer", item="num_images_per_reference")
        device = self._execution_device
        rows = self._condition(reference, uni_rows)
        per_reference = int(num_images_per_reference)
        if (
            per_reference == 1
            and seeds is not None
            and not isinstance(seeds, (int, np.integer))
            and len(seeds) > rows.shape[0]
            and len(seeds) % rows.shape[0] == 0
        ):
            per_reference = len(seeds) // rows.shape[0]  # one variation per seed
        rows = rows.repeat_interleave(per_reference, dim=0)
        count = rows.shape[0]
        seed_list, gen = self._seeds(seeds, generator, count)

        cfg = self.transformer.config
        side = int(cfg.sample_size)
        latents = randn_tensor(
            (count, int(cfg.in_channels), side, side),
            generator=gen,
            device=device,
            dtype=torch.float32,
        )
        self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        latents = latents * self.scheduler.init_noise_sigma
        latents = self.denoise(
            latents,
            self.scheduler.timesteps,
            rows,
            guidance_scale,
            gen,
            adapter=adapter,
            control=checked_control(control, count),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        if output_type == "latent":
            images: Any = latents
        else:
            images = self.codec.decode(latents, output="numpy")
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(im) for im in images]
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, seed_list
        return VariationPipelineOutput(images=images, seeds=seed_list)
