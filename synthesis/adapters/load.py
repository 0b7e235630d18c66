"""Reading, verifying and loading an adapter folder.

:func:`load_adapter` checks everything before the model is touched (see
:mod:`histosynth.synthesis.adapters` for the list): the JSON files, the weights checksum
before the weights are parsed, targets / rank / α, every tensor's shape and values, the
resolution and the base weight hash. Any failure is one :class:`EngineError` naming the
folder or file and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histosynth.synthesis.adapters.base import base_weight_hash, model_resolution, target_shapes
from histosynth.synthesis.adapters.folder import (
    CONFIG_FILE,
    CROSS_ATTENTION_TARGETS,
    METADATA_FILE,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    AdapterInfo,
    lora_config,
    lora_config_json,
)
from histosynth.synthesis.adapters.switch import activate as activate_adapter
from histosynth.synthesis.adapters.switch import (
    active_adapter,
    adapter_registry,
    add_lora_adapter,
    make_room_for,
    require_peft,
)
from histosynth.synthesis.config_limits import (
    ADAPTER_WEIGHTS_MAX_BYTES,
    MAX_ADAPTER_WEIGHT,
    JSONFileError,
    check_lora_config,
    check_weights_finite,
    parse_json_file,
)
from histosynth.synthesis.errors import EngineError

if TYPE_CHECKING:  # torch and peft are imported where used: listing a library needs neither
    import torch
    from peft import LoraConfig
    from torch import nn

__all__ = ["check_adapter", "list_adapters", "load_adapter", "read_adapter_info"]


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _own_file(folder: Path, name: str) -> Path:
    """``folder / name``, which must be a regular file of the adapter folder: a link that
    leads out of it, or a FIFO or device, is refused (one line naming it)."""
    path = folder / name
    if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise EngineError(
            f"a link to {path.resolve()}, outside the adapter folder; an adapter's files are "
            "its own", path=path,
        )
    if path.exists() and not path.is_file():
        raise EngineError("not a regular file", path=path)
    return path


def read_adapter_info(folder: str | os.PathLike) -> AdapterInfo:
    """Read and validate ``<folder>/histosynth_adapter.json`` (no tensors are read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EngineError("no such adapter folder", path=folder)
    path = _own_file(folder, METADATA_FILE)
    if not path.is_file():
        raise EngineError(
            f"missing; expected the histosynth metadata file next to {WEIGHTS_FILE} "
            f"(written by save_adapter)",
            path=path,
        )
    try:
        data = parse_json_file(path)  # size and depth limited
    except JSONFileError as err:
        raise EngineError(f"not readable JSON: {err}", path=path) from None
    info = AdapterInfo.from_dict(data, path=path)
    info.folder = folder
    return info


def list_adapters(root: str | os.PathLike) -> list[AdapterInfo]:
    """Metadata of every adapter folder directly under ``root``, sorted by folder name.

    Folders starting with ``.`` are skipped; any other folder without valid metadata is
    an :class:`EngineError` naming it. A missing ``root`` is an empty library.
    """
    root = Path(root)
    if not root.exists():
        return []
    if not root.is_dir():
        raise EngineError("expected an adapter library folder, found a file", path=root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    inside = root.resolve()
    for folder in folders:
        if folder.is_symlink() and not folder.resolve().is_relative_to(inside):
            raise EngineError(
                f"a link to {folder.resolve()}, outside the library; an adapter library "
                "holds its own folders", path=folder,
            )
    return [read_adapter_info(folder) for folder in folders]


def _read_config(folder: Path, info: AdapterInfo) -> LoraConfig:
    path = _own_file(folder, CONFIG_FILE)
    if not path.is_file():
        raise EngineError("missing; expected PEFT's LoRA config", path=path)
    try:
        data = parse_json_file(path)  # size and depth limited
    except JSONFileError as err:
        raise EngineError(f"not readable JSON: {err}", path=path) from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        found = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise EngineError(f"expected peft_type 'LORA', found {_short_repr(found)}", path=path)
    # only the fields histosynth writes, at its values: nothing else reaches peft
    check_lora_config(data, lora_config_json(lora_config(info.rank, info.alpha), ""), path)
    targets = data.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise EngineError(
            f"expected a list of module names, found {_short_repr(targets)}",
            path=path,
            item="target_modules",
        )
    found = sorted(targets)
    expected = sorted(CROSS_ATTENTION_TARGETS)
    if found != expected:
        raise EngineError(
            f"expected the cross-attention targets {expected}, found {found}",
            path=path,
            item="target_modules",
        )
    if sorted(info.target_modules) != expected:
        raise EngineError(
            f"expected the cross-attention targets {expected}, found {sorted(info.target_modules)}",
            path=folder / METADATA_FILE,
            item="target_modules",
        )
    rank, alpha = data.get("r", 8), data.get("lora_alpha", 8)  # peft's defaults
    if rank != info.rank:
        raise EngineError(
            f"expected r={info.rank} (as in {METADATA_FILE}), found r={rank}",
            path=path,
            item="r",
        )
    if not math.isclose(alpha, info.alpha):
        raise EngineError(
            f"expected lora_alpha={info.alpha} (as in {METADATA_FILE}), found {alpha}",
            path=path,
            item="lora_alpha",
        )
    return lora_config(info.rank, info.alpha)


def _read_weights(folder: Path, info: AdapterInfo) -> dict[str, torch.Tensor]:
    """The LoRA tensors, read once: size limit, then the checksum, then the parse (of the
    very bytes hashed: a file swapped in between is never parsed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = _own_file(folder, WEIGHTS_FILE)
    if not path.is_file():
        raise EngineError("missing; expected the LoRA tensors", path=path)
    try:
        size = path.stat().st_size
        if size > ADAPTER_WEIGHTS_MAX_BYTES:
            raise EngineError(
                f"{size} bytes exceed the limit {ADAPTER_WEIGHTS_MAX_BYTES}", path=path
            )
        data = path.read_bytes()
    except OSError as err:
        raise EngineError(f"not readable: {err}", path=path) from None
    found = hashlib.sha256(data).hexdigest()
    if found != info.weights_sha256:
        raise EngineError(
            f"checksum mismatch: expected sha256 {info.weights_sha256[:16]}… "
            f"(as in {METADATA_FILE}), found {found[:16]}…; the file was changed or corrupted",
            path=path,
        )
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        # KeyError: a dtype torch has no name for (e.g. "F8_E8M0")
        raise EngineError(f"not a readable safetensors file: {err}", path=path) from None
    return {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in tensors.items()}


def _check_tensors(
    model: nn.Module, folder: Path, info: AdapterInfo, tensors: dict[str, torch.Tensor]
) -> None:
    path = folder / WEIGHTS_FILE
    expected: dict[str, tuple[int, int]] = {}
    for module, (n_out, n_in) in target_shapes(model, info.target_modules).items():
        expected[f"{module}.lora_A.weight"] = (info.rank, n_in)
        expected[f"{module}.lora_B.weight"] = (n_out, info.rank)
    if not expected:
        raise EngineError(f"the base has no modules {info.target_modules}", path=folder)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} tensors the base has no place for, e.g. {unexpected[:3]}"
            )
        raise EngineError(
            f"does not fit the base ({'; '.join(parts)}); expected LoRA A/B tensors of "
            f"{len(expected) // 2} modules",
            path=path,
        )
    for key, shape in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise EngineError(
                f"expected shape {list(shape)} (rank {info.rank}), found {list(tensor.shape)}",
                path=path,
                item=key,
            )
        if not tensor.is_floating_point():
            raise EngineError(
                f"expected floating-point values, found {tensor.dtype}", path=path, item=key
            )
    # NaN / Inf / 1e30 would make every tile black
    pairs = ((key, tensors[key]) for key in expected)
    check_weights_finite(pairs, path, max_abs=MAX_ADAPTER_WEIGHT)


def _check_base(
    model: nn.Module, folder: Path, info: AdapterInfo, base_hash: str | None, base_id: str | None
) -> None:
    resolution = model_resolution(model)
    if info.resolution != resolution:
        raise EngineError(
            f"made for {info.resolution} px tiles, the loaded base works at {resolution} px",
            path=folder,
            item="resolution",
        )
    current = base_hash or base_weight_hash(model)
    if info.base_hash != current:
        made_for = f"base {info.base_id!r}" if info.base_id else "a base"
        loaded = f"the loaded base {base_id!r}" if base_id else "the loaded base"
        note = ""
        if any(str(p.dtype) == "torch.float16" for p in model.parameters()):
            note = " (an fp16 copy of a base hashes differently: load it in fp32 or bf16)"
        raise EngineError(
            f"made for {made_for} with weight hash {info.base_hash[:16]}…, {loaded} has "
            f"{current[:16]}…{note}; load the base it was trained on",
            path=folder,
            item="base weights",
        )


def check_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    base_hash: str | None = None,
    base_id: str | None = None,
) -> AdapterInfo:
    """Verify that the adapter in ``folder`` can be used on ``model``, touching nothing.

    Checks the files (metadata, config, weights checksum), the targets / rank / α, every
    tensor's shape against the base, the resolution and the base weight hash (pass a
    precomputed ``base_hash`` to skip hashing; ``base_id`` only names the base in the
    error). Raises :class:`EngineError` naming the folder or file and what differs.
    """
    _check_folder(model, Path(folder), base_hash, base_id)
    return read_adapter_info(folder)


def _check_folder(
    model: nn.Module, folder: Path, base_hash: str | None, base_id: str | None
) -> tuple[AdapterInfo, LoraConfig, dict[str, torch.Tensor]]:
    info = read_adapter_info(folder)
    config = _read_config(folder, info)
    tensors = _read_weights(folder, info)
    _check_tensors(model, folder, info, tensors)
    _check_base(model, folder, info, base_hash, base_id)
    return info, config, tensors


# --------------------------------------------------------------------------- load


def load_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    name: str | None = None,
    activate: bool = True,
    base_hash: str | None = None,
    base_id: str | None = None,
) -> AdapterInfo:
    """Verify the adapter in ``folder`` (see :func:`check_adapter`), then add it to ``model``.

    It is added under ``name`` (default: the name in its metadata) next to any adapters
    already loaded, and becomes the active one if ``activate``; otherwise the adapter
    that was active stays active. A fused adapter is unfused first. Nothing is changed
    when a check fails.
    """
    require_peft(model)
    folder = Path(folder)
    info, config, tensors = _check_folder(model, folder, base_hash, base_id)
    name = name or info.name
    make_room_for(model, name, path=folder)
    from peft.utils import set_peft_model_state_dict

    previous = active_adapter(model)
    add_lora_adapter(model, config, name)
    result = set_peft_model_state_dict(model, tensors, adapter_name=name)
    not_loaded = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if result.unexpected_keys or not_loaded:
        model.delete_adapters(name)
        raise EngineError(
            f"peft could not place tensors (unexpected {result.unexpected_keys[:3]}, "
            f"missing {not_loaded[:3]})",
            path=folder / WEIGHTS_FILE,
        )
    info = dataclasses.replace(info, name=name)
    adapter_registry(model)[name] = info
    activate_adapter(model, name if activate else previous)
    return info
