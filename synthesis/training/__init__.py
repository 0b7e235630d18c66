"""Training: LoRA style adapters and progressive full fine-tuning of the PixCell denoiser.

* :mod:`.config` — :class:`TrainConfig`, every hyper-parameter, checked once;
* :mod:`.data` — the seeded split, data order and per-sample random numbers;
* :mod:`.loop` — the ε-prediction loop on ``accelerate`` (:func:`run_training`);
* :mod:`.checkpoints` — atomic checkpoints, exact resume, the best k kept;
* :mod:`.lora` — :func:`train_lora` into the adapter library;
* :mod:`.controlnet` — :func:`train_controlnet` (vessel masks) into the ControlNet library;
* :mod:`.full` — :func:`grow_transformer` (256 → 512 → 1024 px) and :func:`train_full`;
* :mod:`.fit` — does a cache fit a model; :mod:`.samples` — validation sample grids.

The samples come from the feature cache (:mod:`histosynth.synthesis.cache`) or are
encoded on the fly; both give ``sample(index, generator)``.
"""

from __future__ import annotations

from histosynth.common.lazy import lazy_names

_LAZY = {
    "TrainConfig": "config",
    "split_indices": "data",
    "check_samples_fit": "fit",
    "grow_transformer": "full",
    "train_full": "full",
    "TrainResult": "loop",
    "run_training": "loop",
    "train_lora": "lora",
    "train_controlnet": "controlnet",
    "check_masks": "controlnet",
    "sample_grid": "samples",
    "controlnet_sample_grid": "samples",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(
    __name__, globals(), {name: f"{__name__}.{module}" for name, module in _LAZY.items()}
)
