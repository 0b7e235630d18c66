"""Creating a fresh style adapter on a base and writing one to its folder, atomically.

:func:`save_adapter` writes the whole folder (PEFT's two files plus
``histosynth_adapter.json``) under a temporary sibling name and renames it into place,
so a reader never sees half an adapter.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from histosynth.common.files import folder_written_in_place
from histosynth.common.version import histosynth_version
from histosynth.synthesis.adapters.base import base_weight_hash, model_resolution
from histosynth.synthesis.adapters.folder import (
    CROSS_ATTENTION_TARGETS,
    PEFT_PREFIX,
    AdapterInfo,
    lora_config,
    now_utc,
    write_adapter_files,
)
from histosynth.synthesis.adapters.switch import (
    activate,
    adapter_registry,
    add_lora_adapter,
    make_room_for,
    require_peft,
)
from histosynth.synthesis.errors import EngineError

if TYPE_CHECKING:  # torch is imported where used: listing a library needs it not
    from torch import nn

__all__ = ["create_adapter", "save_adapter"]


def create_adapter(
    model: nn.Module,
    name: str,
    *,
    rank: int = 4,
    alpha: float = 4,
    domain: str = "",
    resolution: int | None = None,
    base_id: str = "",
    training_data_checksum: str = "",
) -> AdapterInfo:
    """Add a fresh style adapter ``name`` to ``model`` and make it the active one.

    A is gaussian and B zero, so the model's outputs are unchanged until it is trained;
    peft leaves only the new LoRA parameters trainable. ``resolution`` defaults to the
    base's (:func:`model_resolution`). Returns its metadata (``base_hash`` of the base
    as it is now, ``created`` now).
    """
    require_peft(model)
    make_room_for(model, name)
    info = AdapterInfo(
        name=name,
        base_hash=base_weight_hash(model),
        resolution=int(resolution or model_resolution(model)),
        rank=int(rank),
        alpha=alpha,
        domain=domain,
        base_id=base_id,
        created=now_utc(),
        training_data_checksum=training_data_checksum,
        histosynth_version=histosynth_version(),
    )
    add_lora_adapter(model, lora_config(rank, alpha), name)
    adapter_registry(model)[name] = info
    activate(model, name)
    return info


def save_adapter(
    model: nn.Module,
    name: str,
    folder: str | os.PathLike,
    *,
    info: AdapterInfo | None = None,
    overwrite: bool = False,
) -> AdapterInfo:
    """Write adapter ``name`` of ``model`` to ``folder`` (PEFT files + metadata), atomically.

    ``info`` (default: the metadata from :func:`create_adapter` / :func:`load_adapter`)
    supplies domain, metrics, checksums ...; rank, α, targets, base hash and the weights
    checksum are taken from the model and the written file. The folder is written under
    a temporary name next to it and renamed into place; an existing folder is an error
    unless ``overwrite``. Returns the metadata written (``folder`` set).
    """
    folder = Path(folder)
    names = list(getattr(model, "peft_config", {}) or {})
    if name not in names:
        raise EngineError(f"no adapter {name!r} is loaded (loaded: {names})")
    info = info or adapter_registry(model).get(name)
    if info is None:
        raise EngineError(f"adapter {name!r} has no metadata; pass info=AdapterInfo(...)")
    config = model.peft_config[name]
    targets = config.target_modules
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    if sorted(targets) != sorted(CROSS_ATTENTION_TARGETS):
        raise EngineError(
            f"expected the cross-attention targets {sorted(CROSS_ATTENTION_TARGETS)}, "
            f"found {targets}",
            item=f"adapter {name!r}",
        )
    if folder.exists() and not overwrite:
        raise EngineError("already exists; pass overwrite=True to replace it", path=folder)
    from peft.utils import get_peft_model_state_dict

    state = {
        PEFT_PREFIX + key: tensor.detach().to("cpu").contiguous()
        for key, tensor in get_peft_model_state_dict(model, adapter_name=name).items()
    }
    info = dataclasses.replace(
        info,
        name=name,
        base_hash=base_weight_hash(model),
        rank=int(config.r),
        alpha=config.lora_alpha,
        target_modules=list(CROSS_ATTENTION_TARGETS),
        created=info.created or now_utc(),
        histosynth_version=info.histosynth_version or histosynth_version(),
        folder=None,
    )
    with folder_written_in_place(folder) as tmp:
        write_adapter_files(tmp, state, config, info)  # sets info.weights_sha256
    info.folder = folder
    adapter_registry(model)[name] = dataclasses.replace(info)
    return info
