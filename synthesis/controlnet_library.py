"""The ControlNet library: one folder per trained vessel-mask ControlNet (issue 29).

A library is a folder of ControlNet folders (``$HISTOSYNTH_CONTROLNETS``, else
``~/.local/share/histosynth/controlnets``), beside the adapter library. One ControlNet is
one folder::

    NAME/
      config.json                            PixCellControlNet's config (diffusers' layout)
      diffusion_pytorch_model.safetensors    its weights (safetensors only: no pickle)
      histosynth_controlnet.json             metadata (:class:`ControlNetInfo`)

The metadata names the base it was trained on (``base_id`` and ``base_hash``, the
:func:`~histosynth.synthesis.adapters.base_weight_hash` of its transformer), the tile
``resolution`` (px), ``layers`` (blocks copied), the training cache's content hash, the
validation metrics and the training settings; :func:`load_controlnet` refuses it for a
transformer of another base or resolution, and checks the weights' sha256 before reading
them. The folder is written under a temporary name and renamed into place.

The embedded engine may ship its own ControlNet as ``<engine folder>/controlnet/`` in the
same layout (:func:`engine_controlnet_folder`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histosynth.common.files import file_sha256, folder_written_in_place
from histosynth.common.version import histosynth_version
from histosynth.synthesis.adapters.folder import ADAPTER_NAME, check_shared_meta, now_utc
from histosynth.synthesis.config_limits import (
    JSONFileError,
    check_transformer_config,
    parse_json_file,
)
from histosynth.synthesis.errors import EngineError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from histosynth.synthesis.models.controlnet import PixCellControlNet

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_CONTROLNET_LIBRARY",
    "EMBEDDED_FOLDER",
    "METADATA_FILE",
    "WEIGHTS_FILE",
    "ControlNetInfo",
    "controlnet_library",
    "engine_controlnet_folder",
    "list_controlnets",
    "load_controlnet",
    "read_controlnet_info",
    "resolve_controlnet",
    "save_controlnet",
    "validate_controlnet_name",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
METADATA_FILE = "histosynth_controlnet.json"
METADATA_FORMAT = 1
EMBEDDED_FOLDER = "controlnet"
"""The sub-folder of an engine folder that holds the engine's own ControlNet."""

DEFAULT_CONTROLNET_LIBRARY = "~/.local/share/histosynth/controlnets"
"""Where the library lives unless ``$HISTOSYNTH_CONTROLNETS`` names another folder."""

_MAX_ENCODER_WIDTH = 4096


def controlnet_library() -> Path:
    """The ControlNet library: ``$HISTOSYNTH_CONTROLNETS``, else the default folder."""
    return Path(
        os.environ.get("HISTOSYNTH_CONTROLNETS", DEFAULT_CONTROLNET_LIBRARY)
    ).expanduser()


def validate_controlnet_name(name: str) -> str:
    """``name`` when it is a valid ControlNet name (letters, digits, ``_``, ``-``)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise EngineError(
            f"expected a ControlNet name of letters, digits, '_' and '-', got {name!r}",
            item="name",
        )
    return name


@dataclasses.dataclass
class ControlNetInfo:
    """Metadata of one ControlNet (``histosynth_controlnet.json``).

    ``resolution``: tile side, px; ``layers``: base blocks copied; ``base_hash``: the
    base transformer's weight hash; ``training_data_checksum``: the training cache's
    content hash; ``metrics``: validation metrics by name (``val_loss`` …);
    ``training``: the settings and measurements of the run (``mask_dropout`` …);
    ``generation``: the settings it generates best with, as measured (``inside_strength``
    in [0, 1], ``mask_guidance`` ≥ 1; ``synthesize`` uses them when not given);
    ``weights_sha256``: sha256 of the weights file. ``folder``: where it was read from.
    """

    name: str
    base_hash: str
    resolution: int
    layers: int
    base_id: str = ""
    created: str = ""
    training_data_checksum: str = ""
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    generation: dict[str, float] = dataclasses.field(default_factory=dict)
    histosynth_version: str = ""
    weights_sha256: str = ""
    folder: Path | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``histosynth_controlnet.json`` (without ``folder``)."""
        data = dataclasses.asdict(self)
        data.pop("folder")
        return {"format": METADATA_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: Any, *, path: str | os.PathLike | None = None) -> ControlNetInfo:
        """Validate a metadata object; :class:`EngineError` naming ``path`` and the key."""
        if not isinstance(data, Mapping):
            raise EngineError(f"expected a JSON object, found {type(data).__name__}", path=path)
        if data.get("format") != METADATA_FORMAT:
            raise EngineError(
                f"expected format {METADATA_FORMAT}, found {data.get('format')!r}",
                path=path,
                item="format",
            )
        required = ("name", "base_hash", "resolution", "layers", "weights_sha256")
        missing = [key for key in required if key not in data]
        if missing:
            raise EngineError(f"missing required keys {missing}", path=path)
        fields = {f.name for f in dataclasses.fields(cls)} - {"folder"}
        values = {key: data[key] for key in fields if key in data}

        def bad(key: str, expected: str) -> EngineError:
            return EngineError(f"expected {expected}, found {data[key]!r}", path=path, item=key)

        check_shared_meta(values, bad)
        for key, top in (("resolution", 16384), ("layers", 256)):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise bad(key, f"an integer in 1..{top}")
        _check_generation(values.get("generation", {}), bad)
        return cls(**values)


def _check_generation(generation: Any, bad: Any) -> None:
    """``generation``: ``inside_strength`` in [0, 1] and ``mask_guidance`` in [1, 100]."""
    bounds = {"inside_strength": (0.0, 1.0), "mask_guidance": (1.0, 100.0)}
    if not isinstance(generation, Mapping) or not set(generation) <= set(bounds):
        raise bad("generation", f"an object of {sorted(bounds)}")
    for key, value in generation.items():
        low, high = bounds[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= float(value) <= high
        ):
            raise bad("generation", f"{key} in [{low:g}, {high:g}]")


def _own_file(folder: Path, name: str) -> Path:
    """``folder / name`` as a regular file of the folder: a link out of it, a FIFO or a
    device is refused."""
    path = folder / name
    if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise EngineError(
            f"a link to {path.resolve()}, outside the ControlNet folder; its files are its own",
            path=path,
        )
    if path.exists() and not path.is_file():
        raise EngineError("not a regular file", path=path)
    if not path.is_file():
        raise EngineError(f"missing; a ControlNet folder holds {name}", path=path)
    return path


def read_controlnet_info(folder: str | os.PathLike) -> ControlNetInfo:
    """Read and validate ``<folder>/histosynth_controlnet.json`` (no tensors are read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EngineError("no such ControlNet folder", path=folder)
    path = _own_file(folder, METADATA_FILE)
    try:
        data = parse_json_file(path)
    except JSONFileError as err:
        raise EngineError(f"not readable JSON: {err}", path=path) from None
    info = ControlNetInfo.from_dict(data, path=path)
    info.folder = folder
    return info


def list_controlnets(root: str | os.PathLike | None = None) -> list[ControlNetInfo]:
    """Metadata of every ControlNet folder under ``root`` (default: the library), by name;
    folders starting with ``.`` (unfinished writes) are skipped; a missing root is empty."""
    root = Path(root) if root is not None else controlnet_library()
    if not root.exists():
        return []
    if not root.is_dir():
        raise EngineError("expected a ControlNet library folder, found a file", path=root)
    inside = root.resolve()
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.is_symlink() and not folder.resolve().is_relative_to(inside):
            raise EngineError(
                f"a link to {folder.resolve()}, outside the library", path=folder
            )
        out.append(read_controlnet_info(folder))
    return out


def engine_controlnet_folder(engine_folder: str | os.PathLike | None) -> Path | None:
    """The ControlNet an engine folder ships (``<folder>/controlnet/``), or ``None``."""
    if engine_folder is None:
        return None
    folder = Path(engine_folder) / EMBEDDED_FOLDER
    return folder if (folder / METADATA_FILE).is_file() else None


def resolve_controlnet(name: str, library: str | os.PathLike | None = None) -> Path:
    """The folder of ControlNet ``name`` in ``library`` (default: the library), or
    ``name`` itself when it is a path to a ControlNet folder."""
    candidate = Path(name).expanduser()
    if (os.sep in name or name.startswith(".")) and candidate.is_dir():
        return candidate
    validate_controlnet_name(name)
    root = Path(library).expanduser() if library is not None else controlnet_library()
    folder = root / name
    if not folder.is_dir():
        known = [i.name for i in list_controlnets(root)] if root.is_dir() else []
        raise EngineError(
            f"no ControlNet named {name!r} in the library (found: {known or 'none'}); "
            "train one with `histosynth train controlnet` or set $HISTOSYNTH_CONTROLNETS",
            path=root,
            item="--controlnet",
        )
    return folder


def save_controlnet(
    controlnet: PixCellControlNet,
    folder: str | os.PathLike,
    info: ControlNetInfo,
    *,
    overwrite: bool = False,
) -> ControlNetInfo:
    """Write ``controlnet`` and ``info`` to ``folder`` atomically (temporary sibling
    folder renamed into place); returns the metadata written (weights hash filled)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    validate_controlnet_name(info.name)
    if folder.exists() and not overwrite:
        raise EngineError("already exists; pass --overwrite to replace it", path=folder)
    with folder_written_in_place(folder) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in controlnet.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {k: v for k, v in dict(controlnet.config).items() if not k.startswith("_")}
        config["_class_name"] = type(controlnet).__name__
        config["mask_encoder_channels"] = list(config["mask_encoder_channels"])
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list) + "\n")
        info = dataclasses.replace(
            info,
            layers=int(controlnet.config.num_layers),
            created=info.created or now_utc(),
            histosynth_version=info.histosynth_version or histosynth_version(),
            weights_sha256=file_sha256(tmp / WEIGHTS_FILE),
            folder=None,
        )
        (tmp / METADATA_FILE).write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    info.folder = folder
    return info


def _check_config(config: Any, path: Path) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise EngineError("expected a JSON object", path=path)
    check_transformer_config(config, path)
    widths = config.get("mask_encoder_channels", [])
    if (
        not isinstance(widths, list)
        or not 1 <= len(widths) <= 8
        or not all(
            isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= _MAX_ENCODER_WIDTH
            for w in widths
        )
    ):
        raise EngineError(
            f"expected 1..8 mask encoder widths in 1..{_MAX_ENCODER_WIDTH}, found {widths!r}",
            path=path,
            item="mask_encoder_channels",
        )
    from histosynth.synthesis.models.controlnet import PixCellControlNet

    allowed = set(inspect.signature(PixCellControlNet.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in allowed}


def load_controlnet(
    folder: str | os.PathLike, transformer: nn.Module, *, check_base: bool = True
) -> tuple[PixCellControlNet, ControlNetInfo]:
    """The ControlNet in ``folder`` for ``transformer``: on its device and dtype, with its
    attention implementation, in eval mode.

    Refused (one :class:`EngineError` line naming the folder) when made for another
    resolution, another number of blocks than the base has, or — with ``check_base`` —
    another base (weight hash); when its weights' sha256 is not the recorded one, or they
    do not fit the config.
    """
    from safetensors.torch import load_file

    from histosynth.synthesis.adapters import base_weight_hash
    from histosynth.synthesis.models.controlnet import (
        SHARED_KEYS,
        PixCellControlNet,
        match_transformer_options,
    )

    folder = Path(folder)
    info = read_controlnet_info(folder)
    config_path = _own_file(folder, CONFIG_FILE)
    config = _check_config(parse_json_file(config_path), config_path)
    base = transformer.config
    if int(config.get("sample_size", -1)) != int(base.sample_size):
        raise EngineError(
            f"made for {info.resolution} px tiles (latent grid {config.get('sample_size')}); "
            f"this engine's latent grid is {base.sample_size}",
            path=folder,
            item="resolution",
        )
    shapes = [k for k in SHARED_KEYS if k in config and config[k] != base.get(k, config[k])]
    if shapes or int(config.get("num_layers", 0)) > int(base.num_layers):
        raise EngineError(
            f"made for a transformer of another shape ({', '.join(shapes) or 'num_layers'}); "
            "train one for this engine",
            path=folder,
            item="base",
        )
    if check_base:
        base_hash = base_weight_hash(transformer)
        if base_hash != info.base_hash:
            raise EngineError(
                f"made for another base ({info.base_id or '?'}, weights "
                f"{info.base_hash[:12]}…); this engine's transformer is {base_hash[:12]}…",
                path=folder,
                item="base",
            )
    weights = _own_file(folder, WEIGHTS_FILE)
    if file_sha256(weights) != info.weights_sha256:
        raise EngineError(
            f"the weights' sha256 is not the one {METADATA_FILE} records", path=weights
        )
    controlnet = PixCellControlNet(**config)
    state = load_file(str(weights))
    expected = controlnet.state_dict()
    wrong = sorted(
        set(expected) ^ set(state)
        | {k for k in set(expected) & set(state) if expected[k].shape != state[k].shape}
    )
    if wrong:
        raise EngineError(f"weights do not fit its config ({wrong[:3]} …)", path=weights)
    controlnet.load_state_dict(state)
    weight = next(transformer.parameters())
    if controlnet.dtype != weight.dtype:
        controlnet.to(dtype=weight.dtype)
    controlnet.to(weight.device).eval().requires_grad_(False)
    match_transformer_options(controlnet, transformer)
    return controlnet, info

