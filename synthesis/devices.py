"""Where and in which precision the engine runs: device and dtype names resolved, and
models moved there (the SD-family VAE kept out of float16).
"""

from __future__ import annotations

import torch

from histosynth.synthesis.errors import EngineError

__all__ = ["move_model", "resolve_device", "resolve_dtype", "vae_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` → ``cuda`` when available, else ``cpu``; a CUDA device must exist.

    Raises:
        EngineError: CUDA requested on a machine without it.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise EngineError(f"not a torch device ({err})", item=str(device)) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("CUDA was requested but torch sees no CUDA device", item=str(device))
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` → ``bfloat16`` on CUDA, ``float32`` elsewhere; names such as ``"bf16"`` work."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise EngineError("expected float32, bfloat16 or float16", item=str(dtype))
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise EngineError(f"unknown dtype; expected one of {', '.join(_DTYPES)}", item=str(dtype))
    return _DTYPES[key]


def move_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(device, dtype)``, without diffusers' warning about float32 modules when
    the model has none to keep in float32."""
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(device=device, dtype=dtype)
    return torch.nn.Module.to(model, device=device, dtype=dtype)


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    # SD-family VAEs overflow in float16; bfloat16 has float32's range and is fine
    return torch.float32 if dtype == torch.float16 else dtype
