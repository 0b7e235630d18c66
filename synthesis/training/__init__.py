"""Training: LoRA style adapters and progressive full fine-tuning of the PixCell denoiser.

* :mod:`.config` — :class:`TrainConfig`, every hyper-parameter, checked once;
* :mod:`.data` — the seeded split, data order and per-sample random numbers;
* :mod:`.loop` — the ε-prediction loop on ``accelerate`` (:func:`run_training`);
* :mod:`.checkpoints` — atomic checkpoints, exact resume, the best k kept;
* :mod:`.lora` — :func:`train_lora` into the adapter library;
* :mod:`.full` — :func:`grow_transformer` (256 → 512 → 1024 px) and :func:`train_full`;
* :mod:`.fit` — does a cache fit a model; :mod:`.samples` — validation sample grids.

The samples come from the feature cache (:mod:`histosynth.synthesis.cache`) or are
encoded on the fly; both give ``sample(index, generator)``.
"""

from histosynth.synthesis.training.config import TrainConfig
from histosynth.synthesis.training.data import split_indices
from histosynth.synthesis.training.fit import check_samples_fit
from histosynth.synthesis.training.full import grow_transformer, train_full
from histosynth.synthesis.training.loop import TrainResult, run_training
from histosynth.synthesis.training.lora import train_lora
from histosynth.synthesis.training.samples import sample_grid

__all__ = [
    "TrainConfig",
    "TrainResult",
    "check_samples_fit",
    "grow_transformer",
    "run_training",
    "sample_grid",
    "split_indices",
    "train_full",
    "train_lora",
]
