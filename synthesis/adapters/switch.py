"""The adapters a model carries: which are loaded, which is active, switching and fusing.

Several adapters can be on one peft-wrapped base at once; :func:`activate` switches
between them (or back to the plain base) without reloading anything, and :func:`fuse` /
:func:`unfuse` merge one into the base weights and restore the originals bit for bit.
The metadata of each loaded adapter is kept on the model (:func:`adapter_registry`).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING

from histosynth.synthesis.adapters.folder import ADAPTER_NAME
from histosynth.synthesis.errors import EngineError

if TYPE_CHECKING:  # torch and peft are imported where used: listing a library needs neither
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch import nn

    from histosynth.synthesis.adapters.folder import AdapterInfo

__all__ = [
    "activate",
    "active_adapter",
    "adapter_registry",
    "add_lora_adapter",
    "fuse",
    "fused_adapter",
    "loaded_adapters",
    "make_room_for",
    "require_peft",
    "tuner_layers",
    "unfuse",
    "unload_adapter",
]


def tuner_layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    """(module name, peft LoRA layer) of every adapter-wrapped layer of ``model``."""
    if "peft" not in sys.modules:  # no peft layer can exist yet; importing it costs seconds
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def add_lora_adapter(model: nn.Module, config: LoraConfig, name: str) -> None:
    """Add a LoRA adapter ``name`` with ``config`` to ``model`` (peft's repeat warning muted)."""
    with warnings.catch_warnings():  # peft warns on every adapter after the first: intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        model.add_adapter(config, adapter_name=name)


def require_peft(model: nn.Module) -> None:
    """:class:`EngineError` unless ``model`` can take adapters (a diffusers PeftAdapterMixin)."""
    if not hasattr(model, "add_adapter") or not hasattr(model, "set_adapter"):
        raise EngineError(
            f"{type(model).__name__} takes no adapters (it is not a diffusers PeftAdapterMixin)"
        )


def make_room_for(model: nn.Module, name: str, *, path: str | os.PathLike | None = None) -> None:
    """Before adding adapter ``name`` to ``model``: the name is valid and not yet loaded
    (else :class:`EngineError` naming ``path``), and no adapter stays fused."""
    if not ADAPTER_NAME.fullmatch(name):
        raise EngineError(f"expected an adapter name of letters, digits, '_' and '-', got {name!r}")
    if name in (getattr(model, "peft_config", {}) or {}):
        raise EngineError(f"an adapter named {name!r} is already loaded", path=path)
    if fused_adapter(model) is not None:
        unfuse(model)


def adapter_registry(model: nn.Module) -> dict[str, AdapterInfo]:
    """The metadata of the adapters on ``model`` by name, kept on the model itself."""
    registry = model.__dict__.get("_histosynth_adapters")
    if registry is None:
        registry = {}
        model.__dict__["_histosynth_adapters"] = registry
    return registry


def loaded_adapters(model: nn.Module) -> dict[str, AdapterInfo]:
    """Adapters on ``model`` by name (insertion order), with their metadata."""
    peft_names = list(getattr(model, "peft_config", {}) or {})
    registry = adapter_registry(model)
    return {name: registry[name] for name in peft_names if name in registry}


def active_adapter(model: nn.Module) -> str | None:
    """Name of the adapter in use, or ``None`` when the plain base is used."""
    layers = tuner_layers(model)
    if not layers or layers[0][1].disable_adapters:
        return None
    active = layers[0][1].active_adapters
    return active[0] if active else None


def fused_adapter(model: nn.Module) -> str | None:
    """Name of the adapter fused into the base weights, or ``None``."""
    fused = model.__dict__.get("_histosynth_fused")
    if fused is not None:
        return fused[0]
    for _, layer in tuner_layers(model):
        if layer.merged:
            return ",".join(layer.merged_adapters)
    return None


def activate(model: nn.Module, name: str | None) -> None:
    """Use adapter ``name`` from now on, or the plain base for ``None``; nothing reloads.

    A fused adapter is unfused first (exactly, see :func:`unfuse`). Switching back to
    ``None`` or to an earlier adapter gives bit-identical outputs.
    """
    if fused_adapter(model) is not None:
        unfuse(model)
    if name is None:
        if getattr(model, "peft_config", None) and tuner_layers(model):
            model.disable_adapters()
        return
    names = list(getattr(model, "peft_config", {}) or {})
    if name not in names:
        raise EngineError(f"no adapter {name!r} is loaded (loaded: {names})")
    model.enable_adapters()
    model.set_adapter(name)


def unload_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``model``; the base weights are left as they were.

    If it was the active adapter, the plain base is active afterwards; otherwise the
    active adapter stays.
    """
    names = list(getattr(model, "peft_config", {}) or {})
    if name not in names:
        raise EngineError(f"no adapter {name!r} is loaded (loaded: {names})")
    if fused_adapter(model) is not None:
        unfuse(model)
    previous = active_adapter(model)
    adapter_registry(model).pop(name, None)
    if names == [name]:  # the last one: take peft's wrappers out, the plain modules are back
        model.unload_lora()
        return
    with warnings.catch_warnings():  # "was active which is now deleted": handled just below
        warnings.filterwarnings("ignore", message=".* was active which is now deleted")
        model.delete_adapters(name)
    activate(model, None if previous == name else previous)


def fuse(model: nn.Module, name: str | None = None) -> None:
    """Merge adapter ``name`` (default: the active one) into the base weights for speed.

    The original weights of the wrapped layers are kept on the CPU, so :func:`unfuse`
    restores them bit for bit (peft's own unmerge subtracts the delta again and loses
    precision, in bf16 noticeably).
    """
    name = name or active_adapter(model)
    if name is None:
        raise EngineError("no adapter is active; name the adapter to fuse")
    current = fused_adapter(model)
    if current == name:
        return
    activate(model, name)  # unfuses another one first
    originals = {}
    for module_name, layer in tuner_layers(model):
        weight = layer.get_base_layer().weight
        originals[module_name] = weight.detach().to("cpu", copy=True)
    model.fuse_lora(adapter_names=[name])
    model.__dict__["_histosynth_fused"] = (name, originals)


def unfuse(model: nn.Module) -> None:
    """Undo :func:`fuse`: the base weights are the originals again; the adapter stays active."""
    fused = model.__dict__.pop("_histosynth_fused", None)
    if fused is None:
        if fused_adapter(model) is not None:  # merged by peft directly: its own unmerge
            model.unfuse_lora()
        return
    import torch

    model.unfuse_lora()
    layers = dict(tuner_layers(model))
    with torch.no_grad():
        for module_name, original in fused[1].items():
            layers[module_name].get_base_layer().weight.copy_(original)
