"""One part of an engine from a local folder: the PixCell transformer, the conditioning
encoder, the companion generator; and whether the parts fit together.

Every loader checks its ``config.json`` against the limits of
:mod:`histosynth.synthesis.config_limits` before a weight is read, refuses weights that do
not fit the config or are not finite, and raises :class:`EngineError` naming the folder
or file. The SD3 VAE's loader is :func:`histosynth.synthesis.models.vae.load_vae`.

Example:
    >>> transformer = load_transformer("~/weights/PixCell-1024/transformer")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from histosynth.synthesis.config_limits import (
    check_encoder_config,
    check_model_finite,
    check_transformer_config,
    check_weights_finite,
    read_json_object,
)
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.foreign_errors import as_engine_error
from histosynth.synthesis.models.encoders import (
    GridEncoder,
    TinyEncoder,
    UNIEncoder,
    build_uni2h,
    load_checkpoint,
    load_state_strict,
)
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
from histosynth.synthesis.models.vae import LatentCodec

__all__ = [
    "check_parts_fit",
    "load_encoder",
    "load_generator",
    "load_transformer",
    "read_transformer_config",
    "save_encoder",
]


def read_transformer_config(folder: Path) -> dict[str, Any]:
    """The transformer's ``config.json``, which must name ``PixCellTransformer2DModel``
    and keep its sizes within :data:`~histosynth.synthesis.config_limits.LIMITS`."""
    config = read_json_object(folder / "config.json")
    cls = config.get("_class_name")
    if cls != "PixCellTransformer2DModel":
        raise EngineError(
            f"expected _class_name PixCellTransformer2DModel, found {cls!r}",
            path=folder / "config.json",
        )
    check_transformer_config(config, folder / "config.json")
    return config


def load_transformer(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PixCellTransformer2DModel:
    """The PixCell denoiser from a local diffusers folder (``config.json`` + safetensors).

    Raises:
        EngineError: not a PixCell transformer folder, a config over its limits, weights
            that do not fit or are not finite.
    """
    folder = Path(folder).expanduser()
    read_transformer_config(folder)
    # diffusers raises OSError / ValueError / RuntimeError ...
    with as_engine_error("cannot load the transformer", path=folder):
        model, info = PixCellTransformer2DModel.from_pretrained(
            folder,
            torch_dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
        )
    problems = [
        f"{len(info[k])} {k.replace('_', ' ')} (e.g. {', '.join(map(str, info[k][:3]))})"
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        if info.get(k)
    ]
    if problems:
        raise EngineError(f"weights do not fit the config: {'; '.join(problems)}", path=folder)
    model = model.to(device).eval().requires_grad_(False)
    check_model_finite(model, folder)
    return model


def load_encoder(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GridEncoder:
    """A conditioning encoder from a local folder or checkpoint file.

    A folder with ``config.json`` naming ``TinyEncoder`` (what
    :func:`~histosynth.synthesis.engine.save_engine` writes for the tiny engine) gives a
    :class:`TinyEncoder`; anything else is read as a UNI2-h checkpoint
    (``model.safetensors`` / ``pytorch_model.bin``).
    """
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    if config_file.is_file():
        config = read_json_object(config_file)
        if config.get("_class_name") == "TinyEncoder":
            return _load_tiny_encoder(folder, config).to(device, dtype).eval()
    return build_uni2h(path, device=device, dtype=dtype)


def _load_tiny_encoder(folder: Path, config: dict[str, Any]) -> TinyEncoder:
    """``TinyEncoder.from_config`` + its weights (``save_pretrained``'s file, or the
    ``model.safetensors`` of engines saved before the encoders were ``ModelMixin`` s)."""
    with as_engine_error(
        "expected integer dim, seed and crop",
        path=folder / "config.json",
        catch=(TypeError, ValueError),
    ):
        for key in ("dim", "seed", "crop"):
            if isinstance(config.get(key), bool) or not isinstance(config.get(key), int):
                raise ValueError(f"{key} = {config.get(key)!r}")
        check_encoder_config(config, folder / "config.json")  # before the projection is built
        encoder = TinyEncoder.from_config(config)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        weights = folder / "model.safetensors"
    state = load_checkpoint(weights)
    check_weights_finite(state.items(), weights)
    load_state_strict(encoder, state, path=weights, what="TinyEncoder")
    return encoder


def save_encoder(encoder: GridEncoder, folder: Path) -> None:
    """Write ``encoder`` to ``folder`` as :func:`load_encoder` reads it back (float32).

    Raises:
        EngineError: an encoder of another type than the tiny one or UNI2-h.
    """
    if isinstance(encoder, TinyEncoder):
        copy = TinyEncoder.from_config(encoder.config)  # float32 on the CPU; the engine's stays
        copy.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in
                              encoder.state_dict().items()})
        copy.save_pretrained(folder, safe_serialization=True)
        return
    if not isinstance(encoder, UNIEncoder):
        raise EngineError(f"cannot save an encoder of type {type(encoder).__name__}")
    folder.mkdir(parents=True)
    state = encoder.model.state_dict()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"))


def check_parts_fit(
    transformer: PixCellTransformer2DModel,
    vae: AutoencoderKL,
    encoder: GridEncoder,
    tile_size: int,
    *,
    where: Path,
) -> None:
    """The three parts must fit together at ``tile_size`` px: latent channels, tile size,
    UNI rows and width.

    Raises:
        EngineError: every mismatch in one line, naming ``where``.
    """
    cfg = transformer.config
    codec = LatentCodec(vae)
    problems = []
    if cfg.in_channels != codec.latent_channels:
        problems.append(
            f"transformer takes {cfg.in_channels} latent channels, VAE gives "
            f"{codec.latent_channels}"
        )
    if cfg.sample_size * codec.downsample != tile_size:
        problems.append(
            f"transformer sample_size {cfg.sample_size} × {codec.downsample} ≠ tile size "
            f"{tile_size} px"
        )
    rows = encoder.rows(tile_size, tile_size)
    if rows != cfg.caption_num_tokens:
        problems.append(
            f"encoder gives {rows} rows per {tile_size} px tile, transformer takes "
            f"{cfg.caption_num_tokens}"
        )
    if encoder.dim != cfg.caption_channels:
        problems.append(
            f"encoder rows are {encoder.dim}-d, transformer takes {cfg.caption_channels}"
        )
    if problems:
        raise EngineError(f"the model parts do not fit: {'; '.join(problems)}", path=where)


def load_generator(
    root: Path,
    transformer: PixCellTransformer2DModel,
    device: torch.device,
    dtype: torch.dtype,
) -> PixCellTransformer2DModel | None:
    """The companion generator of an engine folder (``root/generator/``), checked to take
    the same latents and condition as ``transformer``; ``None`` when the folder has none.

    Raises:
        EngineError: a generator that does not load or does not fit the transformer.
    """
    folder = root / "generator"
    if not (folder / "config.json").is_file():
        return None
    generator = load_transformer(folder, device, dtype)
    mine, theirs = transformer.config, generator.config
    keys = ("in_channels", "sample_size", "caption_channels", "caption_num_tokens")
    differ = [k for k in keys if mine.get(k) != theirs.get(k)]
    if differ:
        raise EngineError(
            f"the generator does not fit the transformer ({', '.join(differ)} differ)",
            path=folder,
        )
    return generator
