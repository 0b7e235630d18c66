"""Samplers: PixCell's training schedule and the diffusers schedulers that sample it, by
name (``dpm-solver++``, the default, ``ddpm``, ``ddim``, ``euler``).
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from histosynth.synthesis.errors import EngineError

__all__ = ["PIXCELL_SCHEDULER_CONFIG", "SCHEDULERS", "make_scheduler"]

PIXCELL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}
"""PixCell's training schedule (PixArt's): 1000 steps, linear betas 1e-4 → 0.02, ε-prediction.

PixCell samples with ``DPMSolverMultistepScheduler`` read from the ``scheduler/`` folder of
its Hub repository; a loaded engine uses that file when it lies next to ``transformer/``.
"""

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "dpm-solver++": DPMSolverMultistepScheduler,
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
}
"""Sampler names accepted by :func:`make_scheduler` (DPM-Solver++ is the default)."""

_SCHEDULER_ALIASES = {
    "dpm": "dpm-solver++",
    "dpm++": "dpm-solver++",
    "dpmsolver++": "dpm-solver++",
    "dpm-solver": "dpm-solver++",
    "dpmsolver": "dpm-solver++",
    "dpmsolvermultistep": "dpm-solver++",
    "euler-discrete": "euler",
}


def make_scheduler(
    name: str = "dpm-solver++", config: dict[str, Any] | None = None
) -> SchedulerMixin:
    """A fresh scheduler ``name`` (``dpm-solver++``, ``ddpm``, ``ddim``, ``euler``) on ``config``.

    ``config`` is a training-schedule mapping (default :data:`PIXCELL_SCHEDULER_CONFIG`,
    or the ``scheduler_config.json`` of any diffusers scheduler); keys the chosen class
    does not take are ignored, so one config serves every sampler. DPM-Solver++ is
    second order (``algorithm_type="dpmsolver++"``, ``solver_order=2``) unless the config
    says otherwise.

    Raises:
        EngineError: unknown name.
    """
    key = _SCHEDULER_ALIASES.get(name.lower(), name.lower())
    if key not in SCHEDULERS:
        raise EngineError(f"unknown scheduler; expected one of {', '.join(SCHEDULERS)}", item=name)
    cls = SCHEDULERS[key]
    base = dict(PIXCELL_SCHEDULER_CONFIG if config is None else config)
    if key == "dpm-solver++":
        if base.get("algorithm_type") not in ("dpmsolver++", "sde-dpmsolver++"):
            base["algorithm_type"] = "dpmsolver++"
        base.setdefault("solver_order", 2)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls.from_config({k: v for k, v in base.items() if k in accepted})
