"""The adapter folder and library format: file names, metadata, the LoRA config.

One adapter is one folder (``adapter_model.safetensors``, ``adapter_config.json``,
``histosynth_adapter.json``, see :mod:`histosynth.synthesis.adapters`); a library is a
folder of such folders. This module holds what those files contain, what a valid name
is, and where the library lives; nothing here imports torch or peft at import time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histosynth.common.files import file_sha256
from histosynth.synthesis.config_limits import check_adapter_meta
from histosynth.synthesis.errors import EngineError

__all__ = [
    "ADAPTER_NAME",
    "CONFIG_FILE",
    "CROSS_ATTENTION_TARGETS",
    "DEFAULT_LIBRARY",
    "HASH_DTYPE",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "PEFT_PREFIX",
    "SHA256_HEX",
    "VAE_DOWNSCALE",
    "WEIGHTS_FILE",
    "AdapterInfo",
    "adapter_library",
    "check_shared_meta",
    "lora_config",
    "lora_config_json",
    "now_utc",
    "validate_adapter_name",
    "write_adapter_files",
]

if TYPE_CHECKING:  # torch and peft are imported where used: listing a library needs neither
    import torch
    from peft import LoraConfig


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


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
"""A valid adapter name: letters, digits, ``_`` and ``-``, not starting with ``_``/``-``."""
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
"""A sha256 as written in the metadata: 64 lower-case hex digits."""


def validate_adapter_name(name: str) -> str:
    """``name`` when it is a valid adapter name (letters, digits, ``_``, ``-``)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise EngineError(
            f"expected an adapter name of letters, digits, '_' and '-', got {name!r}",
            item="name",
        )
    return name


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

        check_shared_meta(values, bad, strings=("domain",))
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
        check_adapter_meta(values, path or "")  # rank, alpha, resolution within LIMITS
        return cls(**values)


def check_shared_meta(
    values: Mapping[str, Any],
    bad: Callable[[str, str], EngineError],
    *,
    strings: Sequence[str] = (),
) -> None:
    """The keys an adapter's and a ControlNet's metadata share: ``name`` (letters, digits,
    ``_``, ``-``), ``base_hash`` and ``weights_sha256`` (sha256 hex), ``base_id``,
    ``created`` (ISO 8601), ``training_data_checksum``, ``histosynth_version`` and
    ``strings`` as strings, ``metrics`` an object of numbers, ``training`` an object;
    ``bad(key, expected)`` makes the error raised."""
    if not isinstance(values["name"], str) or not ADAPTER_NAME.fullmatch(values["name"]):
        raise bad("name", "a name of letters, digits, '_' and '-'")
    for key in ("base_hash", "weights_sha256"):  # the weights are checked against it
        if not isinstance(values[key], str) or not SHA256_HEX.fullmatch(values[key]):
            raise bad(key, "64 lower-case hex digits (sha256)")
    for key in (*strings, "base_id", "created", "training_data_checksum", "histosynth_version"):
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


def now_utc() -> str:
    """The current time as ISO 8601 UTC to the second (``2025-01-31T12:00:00Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lora_config(rank: int = 4, alpha: float = 4) -> LoraConfig:
    """peft config of a style adapter: cross-attention targets, A gaussian, B zero."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=list(CROSS_ATTENTION_TARGETS),
    )


def lora_config_json(config: LoraConfig, base_id: str) -> dict[str, Any]:
    """``adapter_config.json`` of ``config``: peft's dict, sets sorted, for inference."""
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    data["peft_type"] = str(getattr(data["peft_type"], "value", data["peft_type"]))
    data["base_model_name_or_path"] = base_id or None
    data["inference_mode"] = True
    return data


def write_adapter_files(
    folder: Path, state: dict[str, torch.Tensor], config: LoraConfig, info: AdapterInfo
) -> None:
    """Write an adapter's three files into the existing ``folder`` and flush them to disk.

    ``state`` holds the LoRA tensors under PEFT's key names; ``info.weights_sha256`` is
    set to the sha256 of the weights file written, before the metadata is written.
    """
    from safetensors.torch import save_file

    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    info.weights_sha256 = file_sha256(folder / WEIGHTS_FILE)
    config_text = json.dumps(lora_config_json(config, info.base_id), indent=2, sort_keys=True)
    (folder / CONFIG_FILE).write_text(config_text + "\n", encoding="utf-8")
    meta_text = json.dumps(info.to_dict(), indent=2, sort_keys=True)
    (folder / METADATA_FILE).write_text(meta_text + "\n", encoding="utf-8")
    for path in (folder / WEIGHTS_FILE, folder / CONFIG_FILE, folder / METADATA_FILE):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
