"""The engine folder format: what a saved engine's files say, and writing one atomically.

An engine folder holds ``transformer/`` (+ ``generator/``), ``vae/``, ``encoder/``,
``scheduler/`` (diffusers' layout), ``histosynth_engine.json`` (:data:`ENGINE_FILE`:
preset, tile size, mpp, trained, model id, sampler, τ, abilities, training record) and
diffusers' ``model_index.json`` (:data:`MODEL_INDEX`: each component's library and
class). :func:`write_engine_folder` writes one beside its place and renames it in, so a
reader never sees half an engine; the readers here check what the metadata asks for.

Example:
    >>> from pathlib import Path
    >>> sampler_of({}, Path("histosynth_engine.json"))
    'dpm-solver++'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from histosynth.common.files import folder_written_in_place
from histosynth.synthesis.config_limits import check_scheduler_config, read_json_object
from histosynth.synthesis.engine_parts import save_encoder
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.sampling_defaults import strength_of
from histosynth.synthesis.schedulers import make_scheduler
from histosynth.synthesis.weights import ENGINE_FILE, read_engine_meta

__all__ = [
    "ENGINE_FILE",
    "MODEL_INDEX",
    "check_model_index",
    "has_adapters",
    "meta_near",
    "model_index",
    "sampler_of",
    "scheduler_config_near",
    "strength_of",
    "write_engine_folder",
]

MODEL_INDEX = "model_index.json"
"""diffusers' folder index: each component's library and class (written by
:func:`write_engine_folder`; engine folders from before it still load without one)."""

# --------------------------------------------------------------------------- reading


def meta_near(transformer_dir: Path) -> dict[str, Any]:
    """The ``histosynth_engine.json`` beside a transformer folder (``{}`` when none)."""
    meta_file = transformer_dir.parent / ENGINE_FILE
    return read_engine_meta(meta_file) if meta_file.is_file() else {}


def sampler_of(meta: dict[str, Any], where: Path) -> str:
    """The sampler an engine folder asks for (``dpm-solver++`` when it says nothing)."""
    name = str(meta.get("sampler") or "dpm-solver++")
    try:
        make_scheduler(name)
    except EngineError as err:
        raise EngineError(f"sampler: {err}", path=where) from err
    return name


def scheduler_config_near(transformer_dir: Path) -> dict[str, Any] | None:
    """The ``scheduler/scheduler_config.json`` beside a transformer folder, checked
    against its limits (``None`` when there is none)."""
    candidate = transformer_dir.parent / "scheduler" / "scheduler_config.json"
    if not candidate.is_file():
        return None
    config = read_json_object(candidate)
    check_scheduler_config(config, candidate)
    return config


def check_model_index(root: Path) -> None:
    """Every component ``model_index.json`` names must be a folder of the engine."""
    path = root / MODEL_INDEX
    index = read_json_object(path)
    for name, value in index.items():
        if name.startswith("_") or value in (None, [None, None]):
            continue
        if not isinstance(name, str) or "/" in name or name in (".", "..") \
                or not (root / name).is_dir():
            raise EngineError(f"names the component {name!r}, which is not a folder here",
                              path=path)


# --------------------------------------------------------------------------- writing


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether LoRA adapters (peft) are loaded on ``model``."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def model_index(
    parts: Mapping[str, torch.nn.Module | None], scheduler_config: dict[str, Any]
) -> dict[str, Any]:
    """``model_index.json`` of a saved engine: ``[library, class]`` per component of
    ``parts`` (``transformer``, ``vae``, ``encoder``; ``generator`` when not ``None``)
    and the scheduler's."""
    import diffusers

    def entry(module: Any) -> list[str]:
        kind = type(module)
        library = "diffusers" if kind.__module__.startswith("diffusers") else kind.__module__
        return [library, kind.__name__]

    index: dict[str, Any] = {
        "_class_name": "HistosynthEngine",
        "_diffusers_version": diffusers.__version__,
    }
    for name in ("transformer", "vae", "encoder"):
        index[name] = entry(parts[name])
    scheduler = make_scheduler("dpm-solver++", scheduler_config)
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    if parts.get("generator") is not None:
        index["generator"] = entry(parts["generator"])
    return index


def write_engine_folder(
    folder: str | os.PathLike,
    parts: Mapping[str, torch.nn.Module | None],
    scheduler_config: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write an engine folder: one subfolder per model of ``parts`` (``transformer``,
    ``vae``, ``encoder``; ``generator`` when not ``None``), ``scheduler/`` (DPM-Solver++
    on ``scheduler_config``), ``meta`` as :data:`ENGINE_FILE` and :data:`MODEL_INDEX`;
    written beside ``folder`` and renamed into it.

    Raises:
        EngineError: ``folder`` exists and is not empty; adapters are loaded on the
            transformer (they are saved on their own).
    """
    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EngineError("exists and is not an empty folder; not overwriting it", path=folder)
    if has_adapters(parts["transformer"]):
        raise EngineError(
            "the transformer carries LoRA adapters; unload them before saving the base "
            "(adapters are saved on their own)",
            path=folder,
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with folder_written_in_place(folder) as tmp:  # an empty folder there is replaced
        for name in ("transformer", "generator", "vae"):
            model = parts.get(name)
            if model is not None:
                model.save_pretrained(tmp / name, safe_serialization=True)
        save_encoder(parts["encoder"], tmp / "encoder")
        (tmp / "scheduler").mkdir()
        scheduler = make_scheduler("dpm-solver++", scheduler_config)
        scheduler.save_config(tmp / "scheduler")
        (tmp / ENGINE_FILE).write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
        index = model_index(parts, scheduler_config)
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n", "utf-8")
    return folder
