"""The base an adapter is made for: its tile resolution, weight hash and LoRA target shapes.

An adapter records the base's resolution and :func:`base_weight_hash`; loading checks
both, and every LoRA tensor's shape against :func:`target_shapes` of the base.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from histosynth.synthesis.adapters.folder import HASH_DTYPE, VAE_DOWNSCALE
from histosynth.synthesis.adapters.switch import fused_adapter
from histosynth.synthesis.errors import EngineError

if TYPE_CHECKING:  # torch is imported where used: listing a library needs it not
    import torch
    from torch import nn

__all__ = ["base_weight_hash", "model_resolution", "target_shapes"]


def model_resolution(model: nn.Module) -> int:
    """Tile side in pixels the base is made for: ``config.sample_size × 8`` (SD3 VAE)."""
    return int(model.config.sample_size) * VAE_DOWNSCALE


def base_weight_hash(model: nn.Module) -> str:
    """sha256 (64 hex digits) identifying the base weights of ``model``.

    Covers every ``state_dict`` entry (parameters and persistent buffers such as the null
    condition) in name order: the name, the shape and the values rounded to bfloat16, so
    an fp32 and a bf16 copy of one base hash alike (an fp16 copy does not: its rounding
    differs). Left out: LoRA tensors (``lora_*``), so a base hashes the same with or
    without adapters (peft's ``.base_layer`` is dropped from names), and the
    KV-compression processors (``attn1.processor.*``), which are a reversible speed
    option. Cost: one sha256 pass over the bf16 weights, tensors in parallel threads
    (PixCell's 0.6 B parameters = 1.2 GB: about 5 s on 2 slow cores).
    Refused while an adapter is fused (the base weights are then altered).
    """
    import torch

    fused = fused_adapter(model)
    if fused is not None:
        raise EngineError(
            f"adapter {fused!r} is fused into the base weights; unfuse it before hashing the base"
        )
    entries = []
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts) or "processor" in parts:
            continue
        entries.append((".".join(p for p in parts if p != "base_layer"), tensor))
    entries.sort(key=lambda entry: entry[0])

    def tensor_digest(tensor: torch.Tensor) -> bytes:
        # hashlib releases the GIL on large buffers: tensors are hashed in parallel threads
        return hashlib.sha256(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())).digest()

    digest = hashlib.sha256(b"histosynth-base-weights/1 bf16\n")
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = []
        for key, tensor in entries:
            tensor = tensor.detach()
            if tensor.is_floating_point():
                tensor = tensor.to(getattr(torch, HASH_DTYPE))
                kind = "float"
            else:
                kind = str(tensor.dtype).removeprefix("torch.")
            header = f"{key}\0{kind}\0{list(tensor.shape)}\n".encode()
            jobs.append((header, pool.submit(tensor_digest, tensor.contiguous().cpu())))
        for header, job in jobs:
            digest.update(header)
            digest.update(job.result())
    return digest.hexdigest()


def target_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """Module name → (out_features, in_features) of every base Linear a target names."""
    from torch import nn

    shapes = {}
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, nn.Linear):
            shapes[name] = (base.out_features, base.in_features)
    return shapes
