"""LoRA style adapters: create, save, load, verify, switch and fuse them on a PixCell base.

An adapter is a peft LoRA on the cross-attention projections only (``attn2.to_q``,
``attn2.to_k``, ``attn2.to_v``, ``attn2.to_out.0`` of every block; r = 4, α = 4, A gaussian,
B zero), so self-attention (the geometry) stays frozen and a fresh adapter changes nothing.

On disk an adapter is one folder, in PEFT's own format plus one metadata file:

* ``adapter_model.safetensors``: the LoRA tensors with PEFT's key names
  (``base_model.model.transformer_blocks.0.attn2.to_q.lora_A.weight`` [r, in],
  ``....lora_B.weight`` [out, r]), as ``PeftModel.save_pretrained`` writes them, so
  ``PeftModel.from_pretrained(transformer, folder)`` reads it too;
* ``adapter_config.json``: the ``LoraConfig``;
* ``histosynth_adapter.json``: :class:`AdapterInfo` (domain, resolution, base id and base
  weight hash, r, α, targets, creation time, training-data checksum, validation metrics,
  histosynth version, sha256 of the weights file).

A library is a folder of such folders, one per adapter (``<root>/<name>/``); folders whose
name starts with ``.`` (temporary writes) are ignored. :func:`save_adapter` writes a whole
folder into a temporary sibling and renames it into place, so a reader never sees half an
adapter.

:func:`load_adapter` checks everything before the model is touched: the two JSON files
parse (size and depth limited) and keep their numbers within
:data:`~histosynth.synthesis.config_limits.LIMITS`; ``adapter_config.json`` sets no
LoRA field histosynth does not write (``use_dora``, ``modules_to_save``,
``layer_replication`` …: :func:`~histosynth.synthesis.config_limits.check_lora_config`);
the weights file matches the sha256 recorded in the metadata (required) *before* it is
parsed; targets / rank / α agree between the files and are the cross-attention targets,
every tensor has the shape the base expects and finite values no larger than
:data:`~histosynth.synthesis.config_limits.MAX_ADAPTER_WEIGHT`, the adapter's resolution
is the base's, and the base weight hash (:func:`base_weight_hash`) is the one the
adapter was made for. Any failure is one
:class:`EngineError` naming the folder or file and what was expected. Several adapters
can be loaded at once; :func:`activate` switches between them (or back to the plain base)
without reloading anything, and the plain base is restored exactly.

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from histosynth.synthesis.engine import tiny_transformer_config
    >>> from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
    >>> def base():
    ...     torch.manual_seed(0)
    ...     return PixCellTransformer2DModel.from_config(tiny_transformer_config(64))
    >>> model, other_model = base(), base()
    >>> library = Path(tempfile.mkdtemp())
    >>> info = create_adapter(model, "he-brightfield", domain="TCGA-BRCA", base_id="tiny")
    >>> # ... train the LoRA parameters (the only ones left trainable) ...
    >>> folder = save_adapter(model, "he-brightfield", library / "he-brightfield")
    >>> load_adapter(other_model, library / "he-brightfield").name  # verified, then active
    'he-brightfield'
    >>> activate(other_model, None)  # plain base again, bit for bit

Size: one concept, the adapter's life cycle on a peft model (create, save, verify, load,
switch, fuse); its checks share the folder format defined here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histosynth.common.files import file_sha256, replace_durably
from histosynth.common.version import histosynth_version
from histosynth.synthesis.config_limits import (
    ADAPTER_WEIGHTS_MAX_BYTES,
    MAX_ADAPTER_WEIGHT,
    JSONFileError,
    check_adapter_meta,
    check_lora_config,
    check_weights_finite,
    parse_json_file,
)
from histosynth.synthesis.errors import EngineError

if TYPE_CHECKING:  # torch and peft are imported where used: listing a library needs neither
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch import nn

__all__ = [
    "CONFIG_FILE",
    "CROSS_ATTENTION_TARGETS",
    "DEFAULT_LIBRARY",
    "METADATA_FILE",
    "VAE_DOWNSCALE",
    "WEIGHTS_FILE",
    "AdapterInfo",
    "activate",
    "active_adapter",
    "adapter_library",
    "base_weight_hash",
    "check_adapter",
    "create_adapter",
    "fuse",
    "fused_adapter",
    "list_adapters",
    "load_adapter",
    "loaded_adapters",
    "lora_config",
    "model_resolution",
    "read_adapter_info",
    "save_adapter",
    "unfuse",
    "unload_adapter",
    "validate_adapter_name",
]

CROSS_ATTENTION_TARGETS: tuple[str, ...] = (
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)
"""peft ``target_modules`` of a style adapter: the cross-attention projections only."""

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
METADATA_FILE = "histosynth_adapter.json"
METADATA_FORMAT = 1
"""Version of the ``histosynth_adapter.json`` layout."""

VAE_DOWNSCALE = 8
"""Pixels per latent cell of the SD3 VAE: a base's tile resolution is ``sample_size × 8``."""

#: Peft's key prefix in ``adapter_model.safetensors`` (what ``PeftModel.save_pretrained`` writes).
PEFT_PREFIX = "base_model.model."
#: Precision at which base weights are hashed (fp32 and bf16 copies of one base agree).
HASH_DTYPE = "bfloat16"

DEFAULT_LIBRARY = "~/.local/share/histosynth/adapters"
"""Where the adapter library lives unless ``$HISTOSYNTH_ADAPTERS`` names another folder."""


def adapter_library() -> Path:
    """The adapter library folder: ``$HISTOSYNTH_ADAPTERS``, else :data:`DEFAULT_LIBRARY`."""
    return Path(os.environ.get("HISTOSYNTH_ADAPTERS", DEFAULT_LIBRARY)).expanduser()


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- metadata


@dataclasses.dataclass
class AdapterInfo:
    """Metadata of one adapter (``histosynth_adapter.json``).

    ``resolution`` is the tile side in pixels the adapter was trained at (the base's
    ``sample_size × 8``); ``base_hash`` is :func:`base_weight_hash` of the base it was made
    on; ``created`` is ISO 8601 UTC (``2025-01-31T12:00:00Z``); ``metrics`` are validation
    metrics by name (e.g. ``{"fid": 15.7}``); ``training`` holds free-form training
    parameters (lr, steps, seed ...); ``weights_sha256`` is the sha256 of
    ``adapter_model.safetensors`` (filled by :func:`save_adapter`; required in the file,
    64 lower-case hex digits). ``folder`` is where it was read from (not stored in the
    file).
    """

    name: str
    base_hash: str
    resolution: int
    rank: int = 4
    alpha: float = 4
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: list(CROSS_ATTENTION_TARGETS)
    )
    domain: str = ""
    base_id: str = ""
    created: str = ""
    training_data_checksum: str = ""
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    histosynth_version: str = ""
    weights_sha256: str = ""
    folder: Path | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``histosynth_adapter.json`` (without ``folder``)."""
        data = dataclasses.asdict(self)
        data.pop("folder")
        return {"format": METADATA_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: Any, *, path: str | os.PathLike | None = None) -> AdapterInfo:
        """Validate a metadata object; :class:`EngineError` naming ``path`` and the key."""
        if not isinstance(data, Mapping):
            raise EngineError(f"expected a JSON object, found {type(data).__name__}", path=path)
        if data.get("format") != METADATA_FORMAT:
            raise EngineError(
                f"expected format {METADATA_FORMAT}, found {data.get('format')!r}",
                path=path,
                item="format",
            )
        fields = {f.name for f in dataclasses.fields(cls)} - {"folder"}
        required = (
            "name", "base_hash", "resolution", "rank", "alpha", "target_modules", "weights_sha256"
        )
        missing = [key for key in required if key not in data]
        if missing:
            raise EngineError(f"missing required keys {missing}", path=path)
        values = {key: data[key] for key in fields if key in data}

        def bad(key: str, expected: str) -> EngineError:
            return EngineError(f"expected {expected}, found {data[key]!r}", path=path, item=key)

        if not isinstance(values["name"], str) or not _NAME.fullmatch(values["name"]):
            raise bad("name", "a name of letters, digits, '_' and '-'")
        for key in ("base_hash", "weights_sha256"):  # the weights are checked against it
            if not isinstance(values[key], str) or not _SHA256.fullmatch(values[key]):
                raise bad(key, "64 lower-case hex digits (sha256)")
        for key in ("resolution", "rank"):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "a positive integer")
        alpha = values["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise bad("alpha", "a positive number")
        targets = values["target_modules"]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise bad("target_modules", "a list of module names")
        for key in (
            "domain",
            "base_id",
            "created",
            "training_data_checksum",
            "histosynth_version",
            "weights_sha256",
        ):
            if key in values and not isinstance(values[key], str):
                raise bad(key, "a string")
        if values.get("created"):
            try:
                datetime.fromisoformat(values["created"])
            except ValueError:
                raise bad("created", "an ISO 8601 time") from None
        metrics = values.get("metrics", {})
        if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in metrics.items()
        ):
            raise bad("metrics", "an object of numbers")
        if not isinstance(values.get("training", {}), Mapping):
            raise bad("training", "an object")
        check_adapter_meta(values, path or "")  # rank, alpha, resolution within LIMITS
        return cls(**values)


def _now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def lora_config(rank: int = 4, alpha: float = 4) -> LoraConfig:
    """peft config of a style adapter: cross-attention targets, A gaussian, B zero."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=list(CROSS_ATTENTION_TARGETS),
    )


# --------------------------------------------------------------------------- the base


def model_resolution(model: nn.Module) -> int:
    """Tile side in pixels the base is made for: ``config.sample_size × 8`` (SD3 VAE)."""
    return int(model.config.sample_size) * VAE_DOWNSCALE


def _tuner_layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    if "peft" not in sys.modules:  # no peft layer can exist yet; importing it costs seconds
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


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


def _add_adapter(model: nn.Module, config: LoraConfig, name: str) -> None:
    with warnings.catch_warnings():  # peft warns on every adapter after the first: intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        model.add_adapter(config, adapter_name=name)


def _require_peft(model: nn.Module) -> None:
    if not hasattr(model, "add_adapter") or not hasattr(model, "set_adapter"):
        raise EngineError(
            f"{type(model).__name__} takes no adapters (it is not a diffusers PeftAdapterMixin)"
        )


def _registry(model: nn.Module) -> dict[str, AdapterInfo]:
    registry = model.__dict__.get("_histosynth_adapters")
    if registry is None:
        registry = {}
        model.__dict__["_histosynth_adapters"] = registry
    return registry


def _target_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
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


# --------------------------------------------------------------------------- switching


def loaded_adapters(model: nn.Module) -> dict[str, AdapterInfo]:
    """Adapters on ``model`` by name (insertion order), with their metadata."""
    peft_names = list(getattr(model, "peft_config", {}) or {})
    registry = _registry(model)
    return {name: registry[name] for name in peft_names if name in registry}


def active_adapter(model: nn.Module) -> str | None:
    """Name of the adapter in use, or ``None`` when the plain base is used."""
    layers = _tuner_layers(model)
    if not layers or layers[0][1].disable_adapters:
        return None
    active = layers[0][1].active_adapters
    return active[0] if active else None


def fused_adapter(model: nn.Module) -> str | None:
    """Name of the adapter fused into the base weights, or ``None``."""
    fused = model.__dict__.get("_histosynth_fused")
    if fused is not None:
        return fused[0]
    for _, layer in _tuner_layers(model):
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
        if getattr(model, "peft_config", None) and _tuner_layers(model):
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
    _registry(model).pop(name, None)
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
    for module_name, layer in _tuner_layers(model):
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
    layers = dict(_tuner_layers(model))
    with torch.no_grad():
        for module_name, original in fused[1].items():
            layers[module_name].get_base_layer().weight.copy_(original)


_activate = activate  # load_adapter has a parameter of that name


# --------------------------------------------------------------------------- create / save


def validate_adapter_name(name: str) -> str:
    """``name`` when it is a valid adapter name (letters, digits, ``_``, ``-``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise EngineError(
            f"expected an adapter name of letters, digits, '_' and '-', got {name!r}",
            item="name",
        )
    return name


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
    _require_peft(model)
    if not _NAME.fullmatch(name):
        raise EngineError(f"expected an adapter name of letters, digits, '_' and '-', got {name!r}")
    if name in (getattr(model, "peft_config", {}) or {}):
        raise EngineError(f"an adapter named {name!r} is already loaded")
    if fused_adapter(model) is not None:
        unfuse(model)
    info = AdapterInfo(
        name=name,
        base_hash=base_weight_hash(model),
        resolution=int(resolution or model_resolution(model)),
        rank=int(rank),
        alpha=alpha,
        domain=domain,
        base_id=base_id,
        created=_now_utc(),
        training_data_checksum=training_data_checksum,
        histosynth_version=histosynth_version(),
    )
    _add_adapter(model, lora_config(rank, alpha), name)
    _registry(model)[name] = info
    activate(model, name)
    return info


def _config_json(config: LoraConfig, base_id: str) -> dict[str, Any]:
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    data["peft_type"] = str(getattr(data["peft_type"], "value", data["peft_type"]))
    data["base_model_name_or_path"] = base_id or None
    data["inference_mode"] = True
    return data


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
    info = info or _registry(model).get(name)
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
    from safetensors.torch import save_file

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
        created=info.created or _now_utc(),
        histosynth_version=info.histosynth_version or histosynth_version(),
        folder=None,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        info.weights_sha256 = file_sha256(tmp / WEIGHTS_FILE)
        config_text = json.dumps(_config_json(config, info.base_id), indent=2, sort_keys=True)
        (tmp / CONFIG_FILE).write_text(config_text + "\n", encoding="utf-8")
        meta_text = json.dumps(info.to_dict(), indent=2, sort_keys=True)
        (tmp / METADATA_FILE).write_text(meta_text + "\n", encoding="utf-8")
        for path in (tmp / WEIGHTS_FILE, tmp / CONFIG_FILE, tmp / METADATA_FILE):
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            replace_durably(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            replace_durably(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    info.folder = folder
    _registry(model)[name] = dataclasses.replace(info)
    return info


# --------------------------------------------------------------------------- read / list


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
    check_lora_config(data, _config_json(lora_config(info.rank, info.alpha), ""), path)
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
    for module, (n_out, n_in) in _target_shapes(model, info.target_modules).items():
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
    _require_peft(model)
    folder = Path(folder)
    info, config, tensors = _check_folder(model, folder, base_hash, base_id)
    name = name or info.name
    if not _NAME.fullmatch(name):
        raise EngineError(f"expected an adapter name of letters, digits, '_' and '-', got {name!r}")
    if name in (getattr(model, "peft_config", {}) or {}):
        raise EngineError(f"an adapter named {name!r} is already loaded", path=folder)
    if fused_adapter(model) is not None:
        unfuse(model)
    from peft.utils import set_peft_model_state_dict

    previous = active_adapter(model)
    _add_adapter(model, config, name)
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
    _registry(model)[name] = info
    _activate(model, name if activate else previous)
    return info
