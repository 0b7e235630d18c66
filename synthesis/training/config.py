"""Training settings: one record for ``train lora`` and ``train full``, checked once.

:class:`TrainConfig` holds every hyper-parameter of a run. :meth:`TrainConfig.fingerprint`
is the part a checkpoint must agree with to be resumed (everything that changes the
weights; not the reversible speed options — compile, attention, gradient checkpointing —
nor how often checkpoints, validation and samples are made).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from histosynth.synthesis.errors import EngineError

__all__ = ["MixedPrecision", "TrainConfig"]

MixedPrecision = Literal["no", "fp16", "bf16"]

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
"""Names diffusers' ``get_scheduler`` takes that need no extra arguments."""

#: Settings a resumed run may change (speed options and bookkeeping, not the weights).
NOT_FINGERPRINTED = frozenset(
    {
        "compile",
        "attention",
        "gradient_checkpointing",
        "checkpoint_every",
        "keep_best",
        "validate_every",
        "sample_every",
        "sample_steps",
        "steps",
        "epochs",
    }
)


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: the LoRA recipe).

    Attributes:
        steps: optimiser steps; or ``epochs`` (passes over the training samples, may be
            fractional) — exactly one of the two.
        batch_size: samples per process per forward; one optimiser step sees
            ``batch_size × processes × grad_accum`` samples.
        lr: AdamW learning rate (LoRA 1e-4, full fine-tuning 1e-6).
        lr_scheduler / lr_warmup_steps: diffusers ``get_scheduler`` name and warm-up.
        mixed_precision: ``no`` / ``fp16`` (CUDA) / ``bf16`` (accelerate autocast; trainable
            parameters stay float32).
        uncond_prob: probability of replacing a sample's condition by the learned null
            condition (classifier-free guidance dropout).
        snr_gamma: Min-SNR-γ loss weighting; ``None`` = plain MSE on ε.
        timestep_range: ``[low, high)`` of the training timesteps (default all 1000).
        kv_compress: KV-compression ratio R for self-attention (``None`` keeps what the
            model has; 1 turns it off).
        compile / attention / gradient_checkpointing: reversible speed options.
        ema / ema_decay: keep an exponential moving average of the trainable weights
            (validated and saved instead of the raw weights).
        val_fraction: share of the samples held out for validation (at least one when
            there are two or more samples).
        seed: seeds the split, the data order, the noise, the timesteps and the dropout.
        checkpoint_every: optimiser steps between checkpoints (also validation).
        keep_best: checkpoints kept besides the last one, the lowest validation loss first.
        sample_every: steps between sample grids (``None``: at every checkpoint; 0: never).
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision = "no"
    uncond_prob: float = 0.1
    snr_gamma: float | None = 5.0
    timestep_range: tuple[int, int] = (0, 1000)
    kv_compress: int | None = None
    compile: bool = False
    attention: str = "auto"
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.999
    val_fraction: float = 0.05
    seed: int = 0
    checkpoint_every: int = 100
    keep_best: int = 2
    validate_every: int | None = None
    sample_every: int | None = None
    sample_steps: int = 10

    def __post_init__(self) -> None:
        self.timestep_range = (int(self.timestep_range[0]), int(self.timestep_range[1]))
        self.validate()

    def validate(self) -> None:
        """Raise one :class:`EngineError` naming the first bad setting."""

        def bad(item: str, expected: str) -> EngineError:
            return EngineError(f"expected {expected}, got {getattr(self, item)!r}", item=item)

        if (self.steps is None) == (self.epochs is None):
            raise EngineError("give either steps or epochs (not both)", item="steps")
        if self.steps is not None and (int(self.steps) != self.steps or self.steps < 1):
            raise bad("steps", "a positive number of steps")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise bad("epochs", "a positive number of epochs")
        for item in ("batch_size", "grad_accum", "checkpoint_every", "sample_steps"):
            value = getattr(self, item)
            if int(value) != value or value < 1:
                raise bad(item, "a positive integer")
        if self.keep_best < 0:
            raise bad("keep_best", "0 or more")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a positive learning rate")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise bad("lr_scheduler", f"one of {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise bad("mixed_precision", "no, fp16 or bf16")
        if not 0 <= self.uncond_prob < 1:
            raise bad("uncond_prob", "a probability in [0, 1)")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise bad("snr_gamma", "a positive γ (or None for plain MSE)")
        low, high = self.timestep_range
        if not 0 <= low < high <= 1000:
            raise bad("timestep_range", "0 <= low < high <= 1000")
        if self.kv_compress is not None and (
            int(self.kv_compress) != self.kv_compress or self.kv_compress < 1
        ):
            raise bad("kv_compress", "a ratio >= 1 (1 = off)")
        if self.attention not in ("auto", "sdpa", "xformers"):
            raise bad("attention", "auto, sdpa or xformers")
        if not 0 < self.ema_decay < 1:
            raise bad("ema_decay", "a decay in (0, 1)")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", "a fraction in [0, 1)")
        if not 0 <= self.max_grad_norm:
            raise bad("max_grad_norm", "0 (no clipping) or more")

    def total_steps(self, train_samples: int, processes: int = 1) -> int:
        """Optimiser steps of the run for ``train_samples`` samples on ``processes``."""
        if self.steps is not None:
            return int(self.steps)
        per_step = self.batch_size * self.grad_accum * processes
        return max(1, math.ceil(float(self.epochs) * train_samples / per_step))

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed (JSON-able).

        ``steps`` / ``epochs`` may change on resume only with a constant learning rate;
        any other schedule depends on the run's length and fingerprints it.
        """
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}
        data["timestep_range"] = list(self.timestep_range)
        if self.lr_scheduler != "constant":
            data["steps"], data["epochs"] = self.steps, self.epochs
        return data

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-able (for run records and adapter metadata)."""
        data = dataclasses.asdict(self)
        data["timestep_range"] = list(self.timestep_range)
        return data
