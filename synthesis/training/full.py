"""Progressive full fine-tuning: a PixCell checkpoint grown to a larger tile, all weights trained.

PixCell trains 256 → 512 → 1024 px at one magnification: the field of view grows, the
scale does not, so the UNI condition grows from 1 to 4 to 16 rows (one per 256 px crop)
and the latent grid from 32² to 64² to 128². :func:`grow_transformer` builds the larger
configuration and carries every weight over; what depends on the grid is made anew:

* the patch position embedding (diffusers recomputes it from ``sample_size`` and
  ``interpolation_scale``, which grows with the grid as in PixCell's configs: 0.5 at
  32², 2 at 128²);
* the UNI-grid position embedding (``y_pos_embed``, recomputed for the new grid);
* the learned null condition: ``"tile"`` repeats the old grid of null rows over the new
  grid (1 → 4 → 16 rows: each new row is the old row of the same place within its
  repeat), ``"reinit"`` draws it anew, N(0, 1/dim), seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
from histosynth.synthesis.training.config import TrainConfig
from histosynth.synthesis.training.data import (
    EncodedSamples,
    sample_generator,
    verified_checksum,
)
from histosynth.synthesis.training.loop import (
    TrainResult,
    apply_model_options,
    run_engine_training,
)

__all__ = ["NullInit", "grow_transformer", "train_full"]

NullInit = Literal["tile", "reinit"]
VAE_DOWNSCALE = 8
_GRID_KEYS = ("y_pos_embed.y_pos_embed", "caption_projection.uncond_embedding")


def _effective_interpolation_scale(config: Any) -> float:
    scale = config.get("interpolation_scale")
    return float(scale) if scale is not None else float(max(config["sample_size"] // 64, 1))


def grow_transformer(
    model: PixCellTransformer2DModel,
    resolution: int,
    *,
    null_condition: NullInit = "tile",
    seed: int = 0,
) -> PixCellTransformer2DModel:
    """A new transformer for ``resolution`` px tiles carrying ``model``'s weights (float32).

    ``resolution`` must keep the UNI crop grid whole: the grid side grows by
    ``resolution / old resolution`` (256 → 512 px: 1 → 4 rows; 16 → 64 rows for a
    model with 16 rows at 256 px). The same resolution gives a plain copy.

    Raises:
        EngineError: a model with adapters, or a resolution the crop grid cannot take.
    """
    if getattr(model, "_hf_peft_config_loaded", False):
        raise EngineError("the model carries LoRA adapters; grow the plain base")
    config = dict(model.config)
    old_res = int(config["sample_size"]) * VAE_DOWNSCALE
    old_side = math.isqrt(int(config["caption_num_tokens"]))
    new_side_exact = old_side * resolution / old_res
    whole = new_side_exact == int(new_side_exact) and int(new_side_exact) % old_side == 0
    if resolution % (VAE_DOWNSCALE * config["patch_size"]) or not whole:
        raise EngineError(
            f"cannot grow a {old_res} px model ({old_side}×{old_side} condition rows) to "
            f"{resolution} px: the crop grid must grow by a whole factor (e.g. {old_res * 2} px)",
            item="resolution",
        )
    new_side = int(new_side_exact)
    sample_size = resolution // VAE_DOWNSCALE
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(
        sample_size=sample_size,
        interpolation_scale=_effective_interpolation_scale(model.config)
        * sample_size
        / int(model.config.sample_size),
        caption_num_tokens=new_side * new_side,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = PixCellTransformer2DModel.from_config(config)
    state = {k: v for k, v in model.state_dict().items() if k not in _GRID_KEYS}
    missing, unexpected = grown.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _GRID_KEYS]
    if missing or unexpected:
        raise EngineError(
            f"the grown model does not take the weights: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    old_null = model.caption_projection.uncond_embedding.detach().float().cpu()
    dim = old_null.shape[-1]
    if null_condition == "tile":
        grid = old_null.reshape(old_side, old_side, dim)
        reps = new_side // old_side
        new_null = grid.repeat(reps, reps, 1).reshape(new_side * new_side, dim)
    elif null_condition == "reinit":
        g = sample_generator(seed, "null-condition", resolution)
        new_null = torch.randn((new_side * new_side, dim), generator=g) / dim**0.5
    else:
        raise EngineError("expected 'tile' or 'reinit'", item="null_condition")
    with torch.no_grad():
        grown.caption_projection.uncond_embedding.copy_(new_null)
    return grown.float()


def train_full(
    engine: Any,
    data: EncodedSamples,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    *,
    resolution: int,
    out: str | Path,
    config: TrainConfig,
    work_dir: str | Path,
    null_condition: NullInit = "tile",
    training_data_checksum: str = "",
    resume: bool = False,
    on_checkpoint: Callable[[Any, int], None] | None = None,
    progress: Callable[..., Any] | None = None,
) -> tuple[Path | None, TrainResult]:
    """Grow ``engine``'s transformer to ``resolution``, train every weight, save an engine.

    The folder ``out`` (written atomically by :func:`~histosynth.synthesis.engine.save_engine`
    with ``engine``'s VAE and encoder) loads with ``load_engine(out)`` and ``--model out``.
    Returns ``(out, result)`` (``out`` is ``None`` on processes other than the main one).

    From a cache, the checksum recorded is the one computed from its data (every sample
    read is verified; those training did not read are verified before saving).

    Raises:
        EngineError: ``out`` exists and is not empty; settings the model cannot take; a
            cache whose samples do not fit the model, fail their checks, or whose
            content hash is not ``training_data_checksum``.
    """
    from histosynth.synthesis.adapters import base_weight_hash
    from histosynth.synthesis.engine import Engine, save_engine

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EngineError("exists and is not an empty folder; not overwriting it", path=out)
    from histosynth.synthesis.training.lora import check_cache_fits

    from_hash = base_weight_hash(engine.transformer)
    model = grow_transformer(
        engine.transformer, resolution, null_condition=null_condition, seed=config.seed
    )
    check_cache_fits(data, model, training_data_checksum)  # the grown model's sizes
    apply_model_options(model.to(engine.device), config)
    model.requires_grad_(True).train()
    fingerprint = {
        "kind": "full",
        "from_hash": from_hash,
        "training_data": training_data_checksum,
        "resolution": int(resolution),
        "null_condition": null_condition,
    }
    result = run_engine_training(
        engine,
        model,
        data,
        train_indices,
        val_indices,
        config=config,
        work_dir=work_dir,
        fingerprint=fingerprint,
        resume=resume,
        on_checkpoint=on_checkpoint,
        progress=progress,
    )
    if not result.main_process:
        return None, result
    training_data_checksum = verified_checksum(data, training_data_checksum)
    if getattr(model, "_compiled_call_impl", None) is not None:
        model._compiled_call_impl = None  # save the plain module
    trained = Engine(
        transformer=model,
        vae=engine.vae,
        encoder=engine.encoder,
        scheduler_config=dict(engine.scheduler_config),
        preset=engine.preset,
        tile_size=int(resolution),
        mpp=engine.mpp,
        device=engine.device,
        dtype=engine.dtype,
        trained=True,
        model_id=f"histosynth-full-{resolution}px-from-{engine.model_id}",
        title=f"Fine-tuned at {resolution} px from {engine.model_id} ({result.steps} steps)",
    )
    training = {
        "from": engine.model_id,
        "from_hash": from_hash,
        "resolution": int(resolution),
        "null_condition": null_condition,
        "training_data_checksum": training_data_checksum,
        "config": config.to_dict(),
        "metrics": result.metrics,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
    }
    save_engine(trained, out, training=training)
    return out, result
