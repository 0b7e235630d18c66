"""Loading an engine's parts from a preset's weights or from a local engine folder.

:func:`preset_engine_fields` searches every component of a preset first (a missing one is
reported with every place tried, before anything loads), :func:`folder_engine_fields`
takes what a folder holds and searches the rest for the PixCell preset its transformer
fits. Both check every config's limits and any published checksums before a weight is
read, load the transformer, VAE and encoder, check that they fit together, load an
engine folder's companion generator, and return the keyword arguments of
:class:`~histosynth.synthesis.engine.Engine` (built by
:func:`~histosynth.synthesis.engine.load_engine`).

Example:
    >>> fields = preset_engine_fields("pixcell-1024", "cpu", torch.float32, None)  # doctest: +SKIP
    >>> sorted(fields)[:3]  # doctest: +SKIP
    ['abilities', 'device', 'dtype']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from histosynth.synthesis.abilities import EngineAbilities
from histosynth.synthesis.config_limits import check_before_loading
from histosynth.synthesis.devices import vae_dtype
from histosynth.synthesis.engine_folder import (
    MODEL_INDEX,
    check_model_index,
    meta_near,
    sampler_of,
    scheduler_config_near,
    strength_of,
)
from histosynth.synthesis.engine_parts import (
    check_parts_fit,
    load_encoder,
    load_generator,
    load_transformer,
    read_transformer_config,
)
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.vae import load_vae
from histosynth.synthesis.sampling_defaults import SamplingDefaults
from histosynth.synthesis.schedulers import PIXCELL_SCHEDULER_CONFIG
from histosynth.synthesis.weights import (
    ENGINE_FILE,
    PRESETS,
    FoundWeights,
    find_component,
    find_preset,
    read_engine_meta,
)

__all__ = ["folder_engine_fields", "preset_engine_fields"]


def _model_id(preset: str, found: FoundWeights) -> str:
    spec = PRESETS[preset].components.get("transformer")
    path = found.path
    if found.source == "embedded" and path is not None:
        return str(meta_near(path).get("model_id") or PRESETS[preset].embedded)
    if spec is not None and path is not None and found.source == "hf-cache":
        if "snapshots" in path.parts[:-1]:
            revision = path.parts[path.parts.index("snapshots") + 1]
            return f"{spec.repo}@{revision[:12]}"
        return spec.repo
    return f"{preset}:{path}"


def _preset_for(config: dict[str, Any]) -> str:
    """The PixCell preset whose VAE / encoder fit a transformer config."""
    tokens = config.get("caption_num_tokens", 1)
    return "pixcell-1024" if tokens == 16 else "pixcell-256"


def _load_parts(
    root: Path | None,
    meta: dict[str, Any],
    paths: dict[str, Path],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """``transformer``, ``vae`` and ``encoder`` from ``paths``, after every config's limits
    and any checksums ``meta`` publishes were checked (the VAE in
    :func:`~histosynth.synthesis.devices.vae_dtype`)."""
    check_before_loading(root, meta, paths)
    return {
        "transformer": load_transformer(paths["transformer"], device, dtype),
        "vae": load_vae(paths["vae"], device, vae_dtype(dtype)),
        "encoder": load_encoder(paths["encoder"], device, dtype),
    }


def _fitted(
    fields: dict[str, Any], *, where: Path, generator_root: Path | None
) -> dict[str, Any]:
    """``fields`` once its parts fit together, with the companion generator of
    ``generator_root`` (``None`` when there is no engine folder or it has none)."""
    transformer = fields["transformer"]
    check_parts_fit(transformer, fields["vae"], fields["encoder"], fields["tile_size"], where=where)
    if generator_root is not None:
        fields["generator"] = load_generator(
            generator_root, transformer, fields["device"], fields["dtype"]
        )
    return fields


def preset_engine_fields(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    weights: str | os.PathLike | None,
) -> dict[str, Any]:
    """The keyword arguments of the ``Engine`` of ``preset`` (a key of
    :data:`~histosynth.synthesis.weights.PRESETS` with weights), its components found
    offline (``weights``: a folder searched first).

    Raises:
        EngineError: a component not found (every place tried), a config over its limits,
            weights that do not load or do not fit.
    """
    spec = PRESETS[preset]
    # every component is searched (and a missing one reported) before anything loads
    found = find_preset(preset, explicit=weights)
    transformer_dir = found["transformer"].path
    assert transformer_dir is not None and found["vae"].path and found["encoder"].path
    meta, meta_file = meta_near(transformer_dir), transformer_dir.parent / ENGINE_FILE
    schedule = scheduler_config_near(transformer_dir) or dict(PIXCELL_SCHEDULER_CONFIG)
    paths = {c: f.path for c, f in found.items()}
    fields = _load_parts(transformer_dir.parent, meta, paths, device, dtype)
    fields.update(
        scheduler_config=schedule,
        preset=preset,
        tile_size=spec.tile_size,
        mpp=spec.mpp,
        device=device,
        dtype=dtype,
        trained=spec.trained,
        model_id=_model_id(preset, found["transformer"]),
        sampler=sampler_of(meta, meta_file),
        strength=strength_of(meta, meta_file),
        sampling=SamplingDefaults.from_meta(meta),
        sources={c: f"{f.source} {f.path}" for c, f in found.items()},
        title=spec.title,
        # an embedded engine says what it serves in its own file; the others in the preset
        abilities=EngineAbilities.from_json(
            meta.get("abilities"), where=str(meta_file), tile_size=spec.tile_size
        )
        if spec.embedded
        else spec.abilities,
    )
    root = transformer_dir.parent if spec.embedded else None
    return _fitted(fields, where=transformer_dir, generator_root=root)


def folder_engine_fields(folder: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The keyword arguments of the ``Engine`` in a local folder (``transformer/`` [+
    ``vae/``, ``encoder/``, ``scheduler/``, ``generator/``]) or a bare transformer folder;
    missing parts come from the matching PixCell preset search.

    Raises:
        EngineError: neither layout; metadata, configs or weights that do not pass their
            checks; a missing part of an untrained engine folder, or one not found.
    """
    if (folder / "transformer" / "config.json").is_file():
        transformer_dir, root = folder / "transformer", folder
    elif (folder / "config.json").is_file():
        transformer_dir, root = folder, None
    else:
        raise EngineError(
            "expected a folder holding transformer/ (a diffusers folder with config.json), "
            "or a transformer folder itself",
            path=folder,
        )
    meta = read_engine_meta(root / ENGINE_FILE) if root and (root / ENGINE_FILE).is_file() else {}
    if root is not None and (root / MODEL_INDEX).is_file():
        check_model_index(root)
    config = read_transformer_config(transformer_dir)
    schedule = scheduler_config_near(transformer_dir) or dict(PIXCELL_SCHEDULER_CONFIG)
    base = meta.get("preset") or _preset_for(config)
    if base not in PRESETS:
        raise EngineError(f"unknown preset {base!r}", path=root / ENGINE_FILE if root else folder)
    trained = bool(meta.get("trained", True))
    sources = {"transformer": f"explicit {transformer_dir}"}

    def part(component: str) -> Path:
        local = root / component if root is not None else None
        if local is not None and local.exists():
            sources[component] = f"explicit {local}"
            return local
        if not PRESETS[base].trained:
            raise EngineError(
                f"no {component}/ in this folder (an untrained {base} engine folder holds "
                "every component)",
                path=folder,
            )
        found = find_component(base, component)
        sources[component] = f"{found.source} {found.path}"
        assert found.path is not None
        return found.path

    paths = {"transformer": transformer_dir, "vae": part("vae"), "encoder": part("encoder")}
    fields = _load_parts(root, meta, paths, device, dtype)
    codec_down = 2 ** (len(fields["vae"].config.block_out_channels) - 1)
    tile_size = int(meta.get("tile_size") or fields["transformer"].config.sample_size * codec_down)
    where = root / ENGINE_FILE if root else folder
    fields.update(
        scheduler_config=schedule,
        preset=base,
        tile_size=tile_size,
        mpp=float(meta.get("mpp") or PRESETS[base].mpp),
        device=device,
        dtype=dtype,
        trained=trained,
        model_id=str(meta.get("model_id") or f"local:{folder.resolve()}"),
        sampler=sampler_of(meta, where),
        strength=strength_of(meta, where),
        sampling=SamplingDefaults.from_meta(meta),
        sources=sources,
        title=str(meta.get("title") or ""),
        abilities=EngineAbilities.from_json(  # an older folder: all, at its tile size
            meta.get("abilities"), where=str(where), tile_size=tile_size
        ),
    )
    return _fitted(fields, where=folder, generator_root=root)
