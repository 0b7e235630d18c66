"""Limits on what an engine or adapter folder may hold, checked before anything is built.

A model folder (``transformer/``, ``vae/``, ``encoder/``, ``scheduler/``,
``histosynth_engine.json``) or an adapter folder (``adapter_config.json``,
``histosynth_adapter.json``, ``adapter_model.safetensors``) may come from anyone. Its
configs decide how much memory the model classes allocate, so every size-like number is
checked against :data:`LIMITS` *before* any class is built, and a hostile or broken file
fails with one :class:`EngineError` line naming the file, the key and the limit, e.g.
``…/transformer/config.json: num_layers = 1000000 exceeds the limit 256``.

The limits are generous — several times the real models histosynth loads
(``docs/engine-facts.md``: PixCell-1024 = PixArt-XL/2, 28 blocks, 16 heads × 72 = hidden
1152, sample_size 128, patch 2, UNI2-h rows 16 × 1536, ≈0.61 B parameters; the SD3 VAE,
block_out_channels [128, 256, 512, 512], 16 latent channels, ≈84 M parameters; the
embedded histosynth-mini-512 and the tiny test engines are far below) — and bound what
one folder can make the process allocate (:data:`MAX_TRANSFORMER_PARAMETERS`,
:data:`MAX_VAE_PARAMETERS`, :data:`MAX_TOKENS`).

Also here: reading a JSON file with a size and depth limit (:func:`parse_json_file`: a
file of 100 000 nested ``[`` is one line, not a ``RecursionError``), the LoRA config
fields a histosynth adapter may set (:func:`check_lora_config`), the non-finite / absurd
weight check (:func:`check_weights_finite`), and the sha256 manifest an engine folder may publish
in ``histosynth_engine.json`` (:func:`verify_weight_hashes`, :func:`record_weight_hashes`).

Imports neither torch nor peft at module level (listing an adapter library stays cheap).

Size: one concept, what a model or adapter folder may hold before histosynth uses it; the
table, the JSON reader, the LoRA field rule, the weight-value and checksum checks share
the one-line messages and are applied together by the engine and adapter readers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from histosynth.common.files import file_sha256
from histosynth.synthesis.defaults import SEAM_MODES
from histosynth.synthesis.errors import EngineError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ADAPTER_WEIGHTS_MAX_BYTES",
    "LIMITS",
    "MAX_ADAPTER_WEIGHT",
    "MAX_HIDDEN",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_TOKENS",
    "MAX_TRANSFORMER_PARAMETERS",
    "MAX_VAE_PARAMETERS",
    "WEIGHT_HASHES_KEY",
    "JSONFileError",
    "Limit",
    "check_adapter_meta",
    "check_before_loading",
    "check_encoder_config",
    "check_engine_meta",
    "check_limits",
    "check_lora_config",
    "check_model_finite",
    "check_scheduler_config",
    "check_transformer_config",
    "check_vae_config",
    "check_weights_finite",
    "parse_json_file",
    "read_json_object",
    "record_weight_hashes",
    "verify_weight_hashes",
]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Limit:
    """Bounds of one config value (both ends inclusive).

    ``kind``: ``"int"`` (an integer, not a bool), ``"number"`` (a finite int or float),
    ``"ints"`` / ``"numbers"`` (a list of those, at most ``max_items``), ``"int_or_ints"``
    (one integer or a list of them), ``"list"`` (any list of at most ``max_items``, the
    items not checked). ``nullable``: ``null`` is accepted. ``why``: unit, the real sizes
    and the reason for the bound.
    """

    low: float
    high: float
    kind: Literal["int", "number", "ints", "numbers", "int_or_ints", "list"] = "int"
    nullable: bool = False
    max_items: int = 0
    why: str = ""


LIMITS: dict[str, dict[str, Limit]] = {
    # transformer/config.json (and generator/config.json): PixCellTransformer2DModel
    "transformer": {
        "num_layers": Limit(1, 256, why="blocks; PixCell 28, the embedded engine 4, tiny 2"),
        "num_attention_heads": Limit(1, 256, why="heads; PixCell 16, tiny 2"),
        "attention_head_dim": Limit(1, 1024, why="channels per head; PixCell 72, tiny 32"),
        "in_channels": Limit(1, 1024, why="latent channels in; SD3 VAE 16"),
        "out_channels": Limit(1, 2048, nullable=True, why="channels out; PixCell 32 (ε, σ)"),
        "cross_attention_dim": Limit(
            1, 16384, nullable=True, why="condition width; PixCell 1152, tiny 64"
        ),
        "sample_size": Limit(1, 2048, why="latent side, cells (×8 px); PixCell-1024 128"),
        "patch_size": Limit(1, 64, why="latent cells per patch side; PixCell 2"),
        "caption_channels": Limit(
            1, 16384, nullable=True, why="UNI row width; UNI2-h 1536, tiny 32"
        ),
        "caption_num_tokens": Limit(1, 4096, why="UNI rows per tile; PixCell-1024 16"),
        "num_embeds_ada_norm": Limit(1, 100_000, nullable=True, why="PixArt 1000"),
        "norm_num_groups": Limit(1, 1024, why="group-norm groups; PixArt 32"),
        "kv_compress_ratio": Limit(
            1, 64, nullable=True, why="KV pooling per axis (conv kernel side); PixArt-Σ 2"
        ),
        "kv_compress_blocks": Limit(
            0, 255, kind="ints", nullable=True, max_items=256, why="block indices"
        ),
        "interpolation_scale": Limit(
            1 / 1024, 1024, kind="number", nullable=True, why="PixCell 0.5 / 2"
        ),
        "norm_eps": Limit(0, 1, kind="number", why="PixArt 1e-6"),
        "dropout": Limit(0, 1, kind="number", why="probability; 0 at inference"),
    },
    # vae/config.json: diffusers AutoencoderKL
    "vae": {
        "in_channels": Limit(1, 64, why="image channels; 3"),
        "out_channels": Limit(1, 64, why="image channels; 3"),
        "latent_channels": Limit(1, 1024, why="SD3 16"),
        "block_out_channels": Limit(
            1, 4096, kind="ints", max_items=8, why="widths per level; SD3 [128, 256, 512, 512]"
        ),
        "down_block_types": Limit(0, 0, kind="list", max_items=8, why="one per level"),
        "up_block_types": Limit(0, 0, kind="list", max_items=8, why="one per level"),
        "layers_per_block": Limit(1, 16, why="resnets per level; SD3 2"),
        "norm_num_groups": Limit(1, 1024, why="SD3 32"),
        "sample_size": Limit(
            1, 65536, kind="int_or_ints", max_items=2, why="px (tiling only); SD3 1024"
        ),
        "latents_mean": Limit(
            -1e6, 1e6, kind="numbers", nullable=True, max_items=1024, why="per channel; SD3 null"
        ),
        "latents_std": Limit(
            0, 1e6, kind="numbers", nullable=True, max_items=1024, why="per channel; SD3 null"
        ),
        "scaling_factor": Limit(1e-6, 1e6, kind="number", why="SD3 1.5305"),
        "shift_factor": Limit(-1e6, 1e6, kind="number", nullable=True, why="SD3 0.0609"),
    },
    # encoder/config.json of a TinyEncoder (UNI2-h has no config: its architecture is fixed)
    "encoder": {
        "dim": Limit(1, 16384, why="row width; tiny 32 (UNI2-h 1536)"),
        "seed": Limit(0, 2**63 - 1, why="projection seed"),
        "crop": Limit(1, 8192, why="crop side, px; 256 (tiny engines tile / 4)"),
    },
    # scheduler/scheduler_config.json: any diffusers scheduler's training schedule
    "scheduler": {
        "num_train_timesteps": Limit(1, 10_000, why="T; PixCell 1000 (arrays of T are built)"),
        "solver_order": Limit(1, 3, why="DPM-Solver supports 1–3"),
        "steps_offset": Limit(0, 10_000, why="timesteps"),
        "beta_start": Limit(0, 1, kind="number", why="PixCell 1e-4"),
        "beta_end": Limit(0, 1, kind="number", why="PixCell 0.02"),
        "trained_betas": Limit(
            0, 1, kind="numbers", nullable=True, max_items=10_000, why="one β per timestep"
        ),
    },
    # histosynth_engine.json
    "engine": {
        "tile_size": Limit(1, 16384, nullable=True, why="px; presets 256 / 512 / 1024"),
        "mpp": Limit(1e-3, 100, kind="number", nullable=True, why="µm/px; 0.5"),
        "inpaint_steps": Limit(1, 1000, nullable=True, why="full-schedule steps; PixCell 50"),
        "inpaint_guidance": Limit(
            1, 50, kind="number", nullable=True, why="CFG scale; PixCell 2.5, 1 = no CFG"
        ),
        "variation_steps": Limit(1, 1000, nullable=True, why="steps; PixCell 20"),
        "variation_guidance": Limit(1, 50, kind="number", nullable=True, why="CFG; PixCell 1.5"),
    },
    "engine.abilities": {
        "tile_sizes": Limit(1, 16384, kind="ints", max_items=64, why="px"),
    },
    # adapter_config.json (peft LoraConfig)
    "adapter_config": {
        "r": Limit(1, 512, why="LoRA rank; histosynth 4; above ~hidden/2 it is not low-rank"),
        "lora_alpha": Limit(1e-3, 4096, kind="number", why="α (scale α / r); histosynth 4"),
    },
    # histosynth_adapter.json
    "adapter": {
        "rank": Limit(1, 512, why="as adapter_config.json's r"),
        "alpha": Limit(1e-3, 4096, kind="number", why="as adapter_config.json's lora_alpha"),
        "resolution": Limit(8, 16384, why="tile side, px; PixCell-1024 1024"),
    },
}
"""Every limit, by file (``transformer``, ``vae``, ``encoder``, ``scheduler``, ``engine``,
``adapter_config``, ``adapter``) and key; keys a file lacks take the class default."""

MAX_HIDDEN = 16384
"""Transformer width ``num_attention_heads × attention_head_dim``; PixCell 1152."""
MAX_TOKENS = 65536
"""Latent patches per tile ``(sample_size / patch_size)²`` (the position-embedding buffer
is tokens × hidden); PixCell-1024 4096 (64²); 65536 is a 4096 px tile at patch 2."""
MAX_TRANSFORMER_PARAMETERS = 4e9
"""Estimated parameters + position embedding of a transformer; PixCell ≈ 0.61 B (16 GB
in float32 at the limit)."""
MAX_VAE_PARAMETERS = 2e9
"""Estimated parameters of a VAE (an upper estimate); the SD3 VAE ≈ 84 M."""
MAX_JSON_BYTES = 16 * 2**20
"""Bytes of one config / metadata file; real ones are < 10 kB (training records < 1 MB)."""
MAX_JSON_DEPTH = 64
"""Nesting depth of one JSON file; real ones nest ≤ 4 levels. Deeper structures make
``copy.deepcopy`` (diffusers' configs) and ``json`` recurse past Python's limit."""
MAX_ADAPTER_WEIGHT = 1e4
"""Largest |w| of a LoRA tensor. A and B of a trained style adapter are O(1) (A starts
gaussian with std 1/r, B at 0); 1e4 is far above any trained value, while 1e30 (or
NaN / Inf) makes every tile black."""
ADAPTER_WEIGHTS_MAX_BYTES = 2**30
"""Size of ``adapter_model.safetensors``, read whole into memory to be hashed and parsed;
rank 512 on PixCell-1024's 28 × 4 cross-attention projections is ≈ 0.5 GB in float32."""
WEIGHT_HASHES_KEY = "weights_sha256"
"""Key of ``histosynth_engine.json`` holding ``{"<component>/<file>.safetensors": sha256}``."""
#: components whose weight files an engine folder's manifest may list
HASHED_COMPONENTS = ("transformer", "generator", "vae", "encoder")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEY = re.compile(r"(transformer|generator|vae|encoder)/[A-Za-z0-9][A-Za-z0-9._-]*")


# --------------------------------------------------------------------------- JSON


class JSONFileError(ValueError):
    """A JSON file that cannot be read; ``str(err)`` is the one-line reason."""


def parse_json_file(path: PathLike) -> Any:
    """The JSON value of a small file (a config or metadata file), with limits.

    Raises:
        JSONFileError: unreadable, over :data:`MAX_JSON_BYTES`, not UTF-8 JSON, or nested
            deeper than :data:`MAX_JSON_DEPTH` (callers turn it into an :class:`EngineError`
            in their own words).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise JSONFileError(f"{size} bytes exceed the limit {MAX_JSON_BYTES}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise JSONFileError(f"nested deeper than the limit {MAX_JSON_DEPTH}") from None
    except JSONFileError:
        raise
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError too
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        why = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise JSONFileError(why) from err
    if _depth(data) > MAX_JSON_DEPTH:
        raise JSONFileError(f"nested deeper than the limit {MAX_JSON_DEPTH}")
    return data




def read_json_object(path: Path, *, what: str = "JSON") -> dict:
    """A JSON object from a small metadata file (an engine's, a config), read with the
    limits of :func:`parse_json_file`; ``what`` names it in the message of a file that
    cannot be read ("cannot read <what> (…)").

    Raises:
        EngineError: unreadable, not JSON, larger or deeper than the limits, or not an
            object — naming the file.
    """
    try:
        data = parse_json_file(path)
    except JSONFileError as err:  # unreadable, too large, not JSON, nested too deep
        raise EngineError(f"cannot read {what} ({err})", path=path) from None
    if not isinstance(data, dict):
        raise EngineError("expected a JSON object", path=path)
    return data
def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


# --------------------------------------------------------------------------- limits


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bound(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_scalar(key: str, value: Any, limit: Limit, integer: bool, path: PathLike) -> None:
    expected = "an integer" if integer else "a finite number"
    ok_type = not isinstance(value, bool) and isinstance(value, int if integer else int | float)
    if not ok_type or (not integer and not math.isfinite(value)):
        raise EngineError(
            f"{key} = {_show(value)}: expected {expected} from {_bound(limit.low)} to "
            f"{_bound(limit.high)}",
            path=path,
        )
    if value > limit.high:
        raise EngineError(f"{key} = {_show(value)} exceeds the limit {_bound(limit.high)}",
                          path=path)
    if value < limit.low:
        raise EngineError(
            f"{key} = {_show(value)} is below the minimum {_bound(limit.low)}", path=path
        )


def _check_value(key: str, value: Any, limit: Limit, path: PathLike) -> None:
    if value is None and limit.nullable:
        return
    kind = limit.kind
    if kind == "int_or_ints":
        kind = "ints" if isinstance(value, list) else "int"
    if kind in ("int", "number"):
        _check_scalar(key, value, limit, kind == "int", path)
        return
    if not isinstance(value, list):
        raise EngineError(f"{key} = {_show(value)}: expected a list", path=path)
    if len(value) > limit.max_items:
        raise EngineError(
            f"{key} has {len(value)} items, exceeding the limit {limit.max_items}", path=path
        )
    if kind == "list":
        return
    for i, item in enumerate(value):
        _check_scalar(f"{key}[{i}]", item, limit, kind == "ints", path)


def check_limits(config: Mapping[str, Any], kind: str, path: PathLike, prefix: str = "") -> None:
    """Check every key of ``config`` that :data:`LIMITS` ``[kind]`` bounds.

    Raises:
        EngineError: ``<path>: <key> = <value> exceeds the limit <limit>`` (or is below
            the minimum, or is not an integer / finite number / list).
    """
    for key, limit in LIMITS[kind].items():
        if key in config:
            _check_value(prefix + key, config[key], limit, path)


def _get(config: Mapping[str, Any], key: str, default: Any) -> Any:
    value = config.get(key, default)
    return default if value is None else value


def _check_parameters(estimate: float, limit: float, sizes: str, path: PathLike) -> None:
    """Refuse a config whose estimated number of parameters (from ``sizes``, the keys it
    is made of) exceeds ``limit``."""
    if estimate > limit:
        raise EngineError(
            f"about {estimate:.3g} parameters ({sizes}) exceed the limit {limit:g}", path=path
        )


def check_transformer_config(config: Mapping[str, Any], path: PathLike) -> None:
    """Limits of a PixCell transformer ``config.json`` (keys, then width, tokens and an
    estimate of its parameters), before the class is built.

    Raises:
        EngineError: naming ``path``, the key (or the derived size) and the limit.
    """
    check_limits(config, "transformer", path)
    heads = _get(config, "num_attention_heads", 16)
    hidden = heads * _get(config, "attention_head_dim", 72)
    if hidden > MAX_HIDDEN:
        raise EngineError(
            f"num_attention_heads × attention_head_dim = {hidden} exceeds the limit "
            f"{MAX_HIDDEN}",
            path=path,
        )
    side = -(-_get(config, "sample_size", 128) // _get(config, "patch_size", 2))
    if side * side > MAX_TOKENS:
        raise EngineError(
            f"(sample_size / patch_size)² = {side * side} tokens exceeds the limit {MAX_TOKENS}",
            path=path,
        )
    layers = _get(config, "num_layers", 28)
    blocks = config.get("kv_compress_blocks") or []
    if any(b >= layers for b in blocks):
        bad = max(blocks)
        raise EngineError(
            f"kv_compress_blocks holds block {bad}; num_layers = {layers}", path=path
        )
    cross = _get(config, "cross_attention_dim", hidden)
    caption = _get(config, "caption_channels", 0)
    patch2 = _get(config, "patch_size", 2) ** 2
    estimate = (
        layers * (14 * hidden * hidden + 2 * cross * hidden)
        + 8 * hidden * hidden
        + side * side * hidden
        + caption * hidden
        + _get(config, "caption_num_tokens", 1) * caption
        + patch2 * hidden * (_get(config, "in_channels", 4) + _get(config, "out_channels", 8))
    )
    _check_parameters(
        estimate, MAX_TRANSFORMER_PARAMETERS, "num_layers, widths and tokens together", path
    )


def check_vae_config(config: Mapping[str, Any], path: PathLike) -> None:
    """Limits of an ``AutoencoderKL`` ``config.json`` (keys, then an upper estimate of its
    parameters), before the class is built.

    Raises:
        EngineError: naming ``path``, the key and the limit.
    """
    check_limits(config, "vae", path)
    widths = _get(config, "block_out_channels", [64])
    layers = _get(config, "layers_per_block", 1)
    estimate = sum((2 * layers + 3) * 18 * c * c for c in widths) + 80 * max(widths, default=0) ** 2
    _check_parameters(estimate, MAX_VAE_PARAMETERS, "block_out_channels × layers_per_block", path)


def check_encoder_config(config: Mapping[str, Any], path: PathLike) -> None:
    """Limits of a ``TinyEncoder`` ``config.json`` (``dim``, ``seed``, ``crop``)."""
    check_limits(config, "encoder", path)


def check_scheduler_config(config: Mapping[str, Any], path: PathLike) -> None:
    """Limits of a ``scheduler_config.json`` (``num_train_timesteps`` …)."""
    check_limits(config, "scheduler", path)


def check_engine_meta(meta: Mapping[str, Any], path: PathLike) -> None:
    """Limits and types of ``histosynth_engine.json``'s numbers, flags and weight manifest.

    Raises:
        EngineError: naming ``path`` and the key.
    """
    check_limits(meta, "engine", path)
    if "trained" in meta and not isinstance(meta["trained"], bool):
        raise EngineError(f"trained = {_show(meta['trained'])}: expected true or false",
                          path=path)
    abilities = meta.get("abilities")
    if isinstance(abilities, Mapping):
        check_limits(abilities, "engine.abilities", path, prefix="abilities.")
    for key in ("preset", "title", "model_id", "sampler"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise EngineError(f"{key} = {_show(meta[key])}: expected a string", path=path)
    if meta.get("harmonise") is not None and meta["harmonise"] not in SEAM_MODES:
        raise EngineError(
            f"harmonise = {_show(meta['harmonise'])}: expected one of {', '.join(SEAM_MODES)}",
            path=path,
        )
    manifest = meta.get(WEIGHT_HASHES_KEY)
    if manifest is None:
        return
    if not isinstance(manifest, Mapping) or len(manifest) > 256:
        raise EngineError(
            f"{WEIGHT_HASHES_KEY}: expected an object of at most 256 "
            '"<component>/<file>": sha256 entries',
            path=path,
        )
    for name, digest in manifest.items():
        if not _MANIFEST_KEY.fullmatch(name) or ".." in name:
            raise EngineError(
                f"{WEIGHT_HASHES_KEY}: {_show(name)}: expected <component>/<file> with a "
                f"component of {', '.join(HASHED_COMPONENTS)}",
                path=path,
            )
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise EngineError(
                f"{WEIGHT_HASHES_KEY}: {name}: expected 64 lower-case hex digits (sha256), "
                f"found {_show(digest)}",
                path=path,
            )


def check_adapter_meta(data: Mapping[str, Any], path: PathLike) -> None:
    """Limits of ``histosynth_adapter.json`` (``rank``, ``alpha``, ``resolution``)."""
    check_limits(data, "adapter", path)


# --------------------------------------------------------------------------- LoRA config

#: adapter_config.json keys histosynth writes with a value of its own (checked by the
#: adapter reader or here); every other LoraConfig field must hold histosynth's value.
LORA_OWN_KEYS = frozenset(
    {"peft_type", "r", "lora_alpha", "target_modules", "init_lora_weights",
     "base_model_name_or_path", "revision", "inference_mode", "peft_version"}
)


def check_lora_config(
    data: Mapping[str, Any], reference: Mapping[str, Any], path: PathLike
) -> None:
    """Accept only the ``adapter_config.json`` a histosynth style adapter has.

    ``reference`` is the config histosynth writes (every ``LoraConfig`` field of the
    installed peft, at histosynth's values). ``r`` and ``lora_alpha`` are checked against
    :data:`LIMITS`; ``init_lora_weights`` must be ``"gaussian"`` or ``true`` (the tensors
    replace the initial values); ``base_model_name_or_path``, ``revision`` and
    ``peft_version`` are strings (or null), ``inference_mode`` a flag. Every other field
    peft knows — ``layer_replication``, ``modules_to_save``, ``use_dora``,
    ``rank_pattern``, ``target_parameters``, ``lora_bias``, ``exclude_modules`` … — would
    build something else, and is refused unless it holds histosynth's value. Keys the
    installed peft does not know are ignored: they never reach peft.

    Raises:
        EngineError: naming ``path`` and the key.
    """
    check_limits(data, "adapter_config", path)
    init = data.get("init_lora_weights", True)
    if not (init == "gaussian" or init is True):
        raise EngineError(
            f"init_lora_weights = {_show(init)}: expected \"gaussian\" or true", path=path
        )
    for key in ("base_model_name_or_path", "revision", "peft_version"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 1000):
            raise EngineError(f"{key} = {_show(value)}: expected a string or null", path=path)
    if not isinstance(data.get("inference_mode", True), bool):
        raise EngineError(
            f"inference_mode = {_show(data['inference_mode'])}: expected true or false",
            path=path,
        )
    for key, value in data.items():
        if key in LORA_OWN_KEYS or key not in reference:
            continue
        expected = reference[key]
        if value != expected or isinstance(value, bool) != isinstance(expected, bool):
            raise EngineError(
                f"{key} = {_show(value)}: a histosynth style adapter leaves it at "
                f"{_show(expected)} (it changes what peft builds); refused",
                path=path,
            )


# --------------------------------------------------------------------------- weights


def check_weights_finite(
    tensors: Iterable[tuple[str, torch.Tensor]],
    path: PathLike,
    *,
    max_abs: float | None = None,
) -> None:
    """Refuse tensors holding NaN or ±Inf (or, with ``max_abs``, any |value| above it).

    Cheap: one float32 sum per tensor on its own device (NaN / Inf make the sum
    non-finite) and one host sync; only a tensor whose sum is not finite is looked at
    element by element (a sum can also overflow, past 3.4e38, on finite values: those
    pass). ``max_abs`` adds one max per tensor. The first bad tensor (in the order
    given) is named.

    Raises:
        EngineError: ``<path>: <key>: not finite (NaN or Inf values)`` or
            ``<path>: <key>: max |w| = 1e+30 exceeds the limit 10000``.
    """
    import torch

    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    common = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    items = [  # float8 and other rare dtypes lack CPU reductions: checked in float32
        (n, t.detach() if t.dtype in common else t.detach().float())
        for n, t in pairs
        if t.is_floating_point() and t.numel()
    ]
    if not items:
        return
    device = items[0][1].device
    sums = torch.stack([t.sum(dtype=torch.float32).to(device) for _, t in items])
    for index in torch.nonzero(~torch.isfinite(sums)).flatten().tolist():  # one host sync
        name, t = items[index]
        if not bool(torch.isfinite(t).all()):
            raise EngineError("not finite (NaN or Inf values)", path=path, item=name)
    if max_abs is None:
        return
    peaks = torch.stack([t.abs().amax().float().to(device) for _, t in items]).cpu()
    for (name, _), peak in zip(items, peaks.tolist(), strict=True):
        if peak > max_abs:
            raise EngineError(
                f"max |w| = {peak:.3g} exceeds the limit {max_abs:g}", path=path, item=name
            )


# --------------------------------------------------------------------------- checksums


def record_weight_hashes(folder: PathLike) -> dict[str, str]:
    """Write the sha256 of every ``*.safetensors`` of an engine folder's components into
    its ``histosynth_engine.json`` (key :data:`WEIGHT_HASHES_KEY`); returns the manifest.

    Run it after the last change to the weights (a script that rewrites them in float16
    afterwards must run it again).
    """
    folder = Path(folder)
    meta_file = folder / "histosynth_engine.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    manifest = {
        f"{component}/{file.name}": file_sha256(file)
        for component in HASHED_COMPONENTS
        if (folder / component).is_dir()
        for file in sorted((folder / component).glob("*.safetensors"))
    }
    meta[WEIGHT_HASHES_KEY] = manifest
    meta_file.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return manifest


def check_before_loading(
    root: Path | None, meta: Mapping[str, Any], paths: Mapping[str, Path | None]
) -> None:
    """Everything about an engine's files that can be checked before a weight is read:
    the limits of every component's ``config.json`` (transformer, ``root/generator``,
    VAE, a TinyEncoder's) and the sha256 manifest ``root``'s ``histosynth_engine.json``
    (``meta``) may publish (:func:`verify_weight_hashes`).

    ``paths``: component → the folder (or checkpoint file) it will be loaded from.

    Raises:
        EngineError: naming the file and the key (or the weight file).
    """
    paths = dict(paths)
    if root is not None and (root / "generator" / "config.json").is_file():
        paths["generator"] = root / "generator"
    for component, where in paths.items():
        if where is None:
            continue
        folder = Path(where) if Path(where).is_dir() else Path(where).parent
        if component == "vae" and not (folder / "config.json").is_file():
            folder = folder / "vae"  # load_vae takes a folder holding vae/ too
        file = folder / "config.json"
        if not file.is_file():
            continue
        config = read_json_object(file)
        if component in ("transformer", "generator"):
            check_transformer_config(config, file)
        elif component == "vae":
            check_vae_config(config, file)
        elif config.get("_class_name") == "TinyEncoder":  # UNI2-h's architecture is fixed
            check_encoder_config(config, file)
    if root is not None:
        verify_weight_hashes(root, meta, paths)


def verify_weight_hashes(
    root: Path, meta: Mapping[str, Any], paths: Mapping[str, Path | None]
) -> None:
    """Check the weight files of the components loaded from ``root`` against the manifest
    its ``histosynth_engine.json`` (``meta``) publishes, before any of them is opened.

    ``paths``: component → the folder (or file) it is loaded from; only those inside
    ``root/<component>/`` are checked, plus ``root/generator/`` when it exists. Nothing to
    check when ``meta`` publishes no manifest. Every ``*.safetensors`` of such a component
    must be listed; every listed file of it must exist and hash to its entry.

    Raises:
        EngineError: naming the weight file and ``histosynth_engine.json``.
    """
    manifest = meta.get(WEIGHT_HASHES_KEY)
    if not manifest:
        return
    name = "histosynth_engine.json"
    if (root / "generator" / "config.json").is_file():
        paths = {**paths, "generator": root / "generator"}
    for component, where in paths.items():
        if where is None or root / component not in (Path(where), Path(where).parent):
            continue
        listed = {k: v for k, v in manifest.items() if k.split("/", 1)[0] == component}
        present = sorted((root / component).glob("*.safetensors"))
        for file in present:
            if f"{component}/{file.name}" not in listed:
                raise EngineError(
                    f"not listed in {name}'s {WEIGHT_HASHES_KEY} (the folder publishes the "
                    "checksum of every weight file)",
                    path=file,
                )
        for key, expected in listed.items():
            file = root / key
            if not file.is_file():
                raise EngineError(f"missing; {name} lists its sha256", path=file)
            found = file_sha256(file)
            if found != expected:
                raise EngineError(
                    f"checksum mismatch: expected sha256 {expected[:16]}… (as in {name}), "
                    f"found {found[:16]}…; the file was changed or corrupted",
                    path=file,
                )


def check_model_finite(model: torch.nn.Module, folder: PathLike) -> None:
    """:func:`check_weights_finite` over a loaded model's ``state_dict``, naming its weight file
    (the folder when it holds several)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    check_weights_finite(model.state_dict().items(), files[0] if len(files) == 1 else folder)
