"""The engine: a PixCell denoiser, the SD3 VAE and a conditioning encoder, loaded offline.

:func:`load_engine` turns a preset name (``"pixcell-1024"``, ``"pixcell-256"``,
``"tiny"``) or a local folder into an :class:`Engine`. Weights come from the places
:mod:`histosynth.synthesis.weights` searches (an explicit path, ``$HISTOSYNTH_WEIGHTS``, the
settings file, the local Hugging Face cache), never from the network; a missing component
is an :class:`EngineError` that lists every place tried and how to provide it. There is
no silent fallback to random weights: only the ``tiny`` preset is random, and it says so
(``Engine.trained`` is false, ``Engine.description`` contains "UNTRAINED").

The ``tiny`` engine is built from the same classes at a tiny size with a seeded random
initialisation (seed 0): a 2-block PixCell transformer (hidden 64 = 2 heads × 32, UNI
width 32), a 4-block ``AutoencoderKL`` with SD3's 16 latent channels, ×8 down-sampling and
SD3's scale/shift, and a :class:`~histosynth.synthesis.models.encoders.TinyEncoder`. Its
condition is always a 4×4 grid of rows (16 tokens), like PixCell-1024: the grid crops are
``tile_size / 4`` px (64 px at the default 256 px tile; 256 px — UNI's own crop — at a
1024 px tile), so one tiny design covers 256 px tiles (tests) and 1024 px tiles (the
demo's default) alike: ``load_engine("tiny", tile_size=1024)``.

Options, each one flag and off by default: ``kv_compress=R`` (KV-compressed
self-attention in the second half of the blocks), ``compile=True`` (``torch.compile`` of
the transformer, in place), ``attention`` (``"sdpa"``: PyTorch's scaled-dot-product
attention; ``"xformers"``: xFormers' memory-efficient attention, CUDA only; ``"auto"``:
xFormers when it is installed and the device is CUDA, SDPA otherwise). xFormers is applied
to every attention layer that is *not* KV-compressed; the compressed ones keep their own
(SDPA) processor.

Example:
    >>> engine = load_engine("tiny")
    >>> engine.trained, engine.tile_size, engine.mpp
    (False, 256, 0.5)
    >>> pipe = engine.variation_pipeline()  # histosynth.synthesis.pipelines.VariationPipeline

Size: the ``Engine`` and its folder format load and save as one unit (presets, folders,
the tiny engine, attention options); samplers are in ``schedulers.py``, devices in
``devices.py``, the weight report in ``model_report.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
)
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    XFormersAttnProcessor,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import is_xformers_available
from safetensors.torch import save_file

from histosynth.common.files import replace_durably
from histosynth.synthesis import defaults
from histosynth.synthesis.abilities import EngineAbilities, refusal
from histosynth.synthesis.config_limits import (
    check_before_loading,
    check_encoder_config,
    check_model_finite,
    check_scheduler_config,
    check_transformer_config,
    check_weights_finite,
    read_json_object,
)
from histosynth.synthesis.devices import move_model, resolve_device, resolve_dtype, vae_dtype
from histosynth.synthesis.errors import EngineError, UntrainedEngineWarning
from histosynth.synthesis.models.encoders import (
    GridEncoder,
    TinyEncoder,
    UNIEncoder,
    build_uni2h,
    load_checkpoint,
    load_state_strict,
)
from histosynth.synthesis.models.kv_compression import (
    KVCompressionAttnProcessor,
    disable_kv_compression,
    enable_kv_compression,
)
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
from histosynth.synthesis.models.vae import (
    SD3_LATENT_CHANNELS,
    SD3_SCALING_FACTOR,
    SD3_SHIFT_FACTOR,
    LatentCodec,
    load_vae,
)
from histosynth.synthesis.schedulers import PIXCELL_SCHEDULER_CONFIG, SCHEDULERS, make_scheduler
from histosynth.synthesis.weights import (
    AUTO_MODEL,
    COMPONENTS,
    ENGINE_FILE,
    PRESETS,
    PRODUCTION_PRESET,
    FoundWeights,
    check_model,
    default_model,
    find_component,
    find_preset,
    read_engine_meta,
)

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.synthesis.pipelines.inpaint import InpaintPipeline
    from histosynth.synthesis.pipelines.variation import VariationPipeline

__all__ = [
    "ENGINE_FILE",
    "PIXCELL_SCHEDULER_CONFIG",
    "SCHEDULERS",
    "TINY_SEED",
    "Engine",
    "load_engine",
    "make_scheduler",
    "resolve_device",
    "resolve_dtype",
    "save_engine",
    "tiny_engine",
]

"""Metadata file of a saved engine folder (preset, tile size, mpp, trained, model id)."""

TINY_SEED = 0
"""Seed of the tiny engine's random initialisation."""

PRODUCTION_PRESET_TITLE = (
    f"PixCell-1024 (install its weights: histosynth models check {PRODUCTION_PRESET})"
)
"""How messages recommend the production engine."""

AttentionChoice = Literal["auto", "sdpa", "xformers"]

# --------------------------------------------------------------------------- the engine


@dataclass
class Engine:
    """Loaded models and what they are: one preset (or folder), one device, one dtype.

    Attributes:
        transformer: the PixCell denoiser (eval mode).
        vae: the SD3 ``AutoencoderKL`` (eval mode, frozen); ``codec`` wraps it.
        encoder: the conditioning encoder (UNI2-h, or the tiny stand-in).
        scheduler_config: the training noise schedule (see :func:`make_scheduler`).
        preset: preset id (``"pixcell-1024"``, ``"pixcell-256"``, ``"tiny"``) — for a
            folder, the preset its layout matches.
        tile_size: tile side, px, at ``mpp`` µm/px (what the pipelines accept).
        trained: false for random weights (the ``tiny`` preset).
        model_id: provenance id of the weights, e.g. ``StonyBrook-CVLab/PixCell-1024@<sha>``.
        sources: component → where its weights came from (``"hf-cache /path"``, ...).
        attention: the attention implementation in use (``"sdpa"`` or ``"xformers"``).
        kv_compress: KV-compression ratio in use, ``None`` when off.
        compiled: whether the transformer was ``torch.compile``-d.
        sampler: the scheduler the engine samples with unless told otherwise (kept in a
            saved folder's ``histosynth_engine.json``; ``dpm-solver++`` by default).
        strength: τ, the fraction of the schedule a seam regeneration re-runs unless told
            otherwise (``histosynth_engine.json``'s ``strength``; PixCell's 0.55 by
            default; an engine whose noise schedule or training asks for another says so
            there, e.g. the embedded default's 0.35, see its model card).
        abilities: what it serves — the timesteps its denoiser learnt, whether it
            generates from noise, its tile sizes (:mod:`histosynth.synthesis.abilities`);
            :meth:`check` refuses the rest.
        generator: a companion denoiser trained on the whole timestep range, used instead
            of ``transformer`` to generate from noise (variation, synthetic backgrounds),
            when the seam denoiser learnt only the timesteps of seam regeneration (an
            engine folder's ``generator/``); ``None``: the transformer does both.
    """

    transformer: PixCellTransformer2DModel
    vae: AutoencoderKL
    encoder: GridEncoder
    scheduler_config: dict[str, Any]
    preset: str
    tile_size: int
    mpp: float
    device: torch.device
    dtype: torch.dtype
    trained: bool
    model_id: str
    sources: dict[str, str] = field(default_factory=dict)
    title: str = ""
    attention: str = "sdpa"
    kv_compress: int | None = None
    compiled: bool = False
    sampler: str = "dpm-solver++"
    strength: float = defaults.STRENGTH
    abilities: EngineAbilities = field(default_factory=EngineAbilities)
    generator: PixCellTransformer2DModel | None = None
    codec: LatentCodec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.codec = LatentCodec(self.vae)

    @property
    def description(self) -> str:
        """One line saying what the engine is; says UNTRAINED for random weights."""
        text = f"{self.model_id} ({self.preset}): {self.tile_size} px tiles at {self.mpp} µm/px"
        if self.title:
            text = f"{self.title}; {text}"
        if not self.trained and "UNTRAINED" not in text:
            text += "; UNTRAINED (seeded random weights, the output is not histology)"
        if not self.preset.startswith("pixcell"):
            text += f"; for production use {PRODUCTION_PRESET_TITLE}"
        extras = [str(self.device), str(self.dtype).removeprefix("torch."), self.attention]
        if self.kv_compress:
            extras.append(f"KV-compression R={self.kv_compress}")
        if self.compiled:
            extras.append("compiled")
        return f"{text} [{', '.join(extras)}]"

    def check(self, mode: str, *, strength: float | None = None) -> None:
        """Refuse a mode this engine cannot serve (``"inpaint"`` at τ ``strength``,
        ``"variation"``, ``"synthetic background"``).

        Raises:
            EngineError: one line naming the engine, the mode and what to use instead.
        """
        line = refusal(self.preset, self.abilities, mode, strength=strength)
        if line is not None:
            raise EngineError(line, item=mode)

    def make_scheduler(self, name: str | None = None) -> SchedulerMixin:
        """A fresh scheduler ``name`` (``None``: :attr:`sampler`) on the training schedule."""
        return make_scheduler(name or self.sampler, self.scheduler_config)

    def variation_pipeline(
        self, scheduler: str | None = None, *, purpose: str = "variation"
    ) -> VariationPipeline:
        """A :class:`~histosynth.synthesis.pipelines.VariationPipeline` on these models.

        Raises:
            EngineError: the engine generates no tile from noise (its ``abilities``);
                ``purpose`` (``"variation"``, ``"synthetic background"``) names the mode.
        """
        from histosynth.synthesis.pipelines.variation import VariationPipeline

        self.check(purpose)
        return VariationPipeline(
            transformer=self.transformer if self.generator is None else self.generator,
            vae=self.vae,
            scheduler=self.make_scheduler(scheduler),
            encoder=self.encoder,
        )

    def inpaint_pipeline(self, scheduler: str | None = None) -> InpaintPipeline:
        """An :class:`~histosynth.synthesis.pipelines.inpaint.InpaintPipeline` (seam
        regeneration by partial diffusion) on these models, at :attr:`strength` unless a
        call names another τ."""
        from histosynth.synthesis.pipelines.inpaint import InpaintPipeline

        pipe = InpaintPipeline(
            transformer=self.transformer,
            vae=self.vae,
            scheduler=self.make_scheduler(scheduler),
            encoder=self.encoder,
        )
        pipe.default_strength = self.strength
        pipe.max_strength = self.abilities.max_strength
        return pipe

    def save_pretrained(
        self, folder: str | os.PathLike, *, training: dict[str, Any] | None = None
    ) -> Path:
        """Write the engine as a diffusers-layout folder (``model_index.json``, one
        subfolder per component, ``histosynth_engine.json``); see :func:`save_engine`."""
        return save_engine(self, folder, training=training)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **options: Any) -> Engine:
        """The engine saved in ``folder`` (this layout, or an older histosynth engine
        folder without ``model_index.json``); ``options`` as :func:`load_engine`."""
        return load_engine(folder, **options)


# --------------------------------------------------------------------------- tiny


def tiny_transformer_config(tile_size: int = 256) -> dict[str, Any]:
    """PixCell-1024's transformer config at a tiny size for ``tile_size`` px tiles.

    2 blocks, 2 heads × 32 (hidden 64), UNI width 32 in a 4×4 grid of 16 rows, latent side
    ``tile_size / 8``; ``interpolation_scale`` = latent side / 64 as PixCell's (0.5 at
    256 px, 2 at 1024 px).
    """
    if tile_size < 64 or tile_size % 64:
        raise EngineError(
            f"the tiny engine takes tiles of a multiple of 64 px, got {tile_size}",
            item="tile_size",
        )
    latent = tile_size // 8
    return {
        "num_attention_heads": 2,
        "attention_head_dim": 32,
        "in_channels": SD3_LATENT_CHANNELS,
        "out_channels": 2 * SD3_LATENT_CHANNELS,
        "num_layers": 2,
        "cross_attention_dim": 64,
        "attention_bias": True,
        "sample_size": latent,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": latent / 64,
        "use_additional_conditions": False,
        "caption_channels": 32,
        "caption_num_tokens": 16,
        "attention_type": "default",
    }


TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": SD3_LATENT_CHANNELS,
    "sample_size": 256,
    "scaling_factor": SD3_SCALING_FACTOR,
    "shift_factor": SD3_SHIFT_FACTOR,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
"""SD3's VAE structure (4 blocks: ×8 down, 16 latent channels, no quant convs) at a tiny width."""


def tiny_engine(
    tile_size: int = 256,
    *,
    seed: int = TINY_SEED,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Engine:
    """The UNTRAINED tiny engine: seeded random weights, for tests and the demo.

    The same ``seed`` gives the same weights on every machine (built on the CPU in float32
    without touching the global RNG, then moved to ``device`` / ``dtype``).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = tiny_transformer_config(tile_size)
    warnings.warn(
        "the tiny engine is UNTRAINED (seeded random weights): its pixels are not histology; "
        "use PixCell-1024 for production (histosynth models check pixcell-1024)",
        UntrainedEngineWarning,
        stacklevel=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = PixCellTransformer2DModel.from_config(config)
        vae = AutoencoderKL.from_config(TINY_VAE_CONFIG)
    encoder = TinyEncoder(dim=config["caption_channels"], seed=seed, crop=tile_size // 4)
    transformer = move_model(transformer, dev, dt).eval().requires_grad_(False)
    vae = move_model(vae, dev, vae_dtype(dt)).eval().requires_grad_(False)
    encoder = encoder.to(dev, dt).eval()
    untrained = f"untrained (seed {seed})"
    return Engine(
        transformer=transformer,
        vae=vae,
        encoder=encoder,
        scheduler_config=dict(PIXCELL_SCHEDULER_CONFIG),
        preset="tiny",
        tile_size=tile_size,
        mpp=PRESETS["tiny"].mpp,
        device=dev,
        dtype=dt,
        trained=False,
        model_id=f"tiny-untrained-seed{seed}-{tile_size}px",
        sources=dict.fromkeys(COMPONENTS, untrained),
        title=PRESETS["tiny"].title,
        abilities=PRESETS["tiny"].abilities,
    )


# --------------------------------------------------------------------------- loading parts


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _transformer_config(folder: Path) -> dict[str, Any]:
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
    _transformer_config(folder)
    try:
        model, info = PixCellTransformer2DModel.from_pretrained(
            folder,
            torch_dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
        )
    except EngineError:
        raise
    except Exception as err:  # diffusers raises OSError / ValueError / RuntimeError ...
        raise EngineError(f"cannot load the transformer ({_short(err)})", path=folder) from err
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

    A folder with ``config.json`` naming ``TinyEncoder`` (what :func:`save_engine` writes
    for the tiny engine) gives a :class:`TinyEncoder`; anything else is read as a UNI2-h
    checkpoint (``model.safetensors`` / ``pytorch_model.bin``).
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
    try:
        for key in ("dim", "seed", "crop"):
            if isinstance(config.get(key), bool) or not isinstance(config.get(key), int):
                raise ValueError(f"{key} = {config.get(key)!r}")
        check_encoder_config(config, folder / "config.json")  # before the projection is built
        encoder = TinyEncoder.from_config(config)
    except EngineError:
        raise
    except (TypeError, ValueError) as err:
        raise EngineError(
            f"expected integer dim, seed and crop ({_short(err)})", path=folder / "config.json"
        ) from err
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        weights = folder / "model.safetensors"
    state = load_checkpoint(weights)
    check_weights_finite(state.items(), weights)
    load_state_strict(encoder, state, path=weights, what="TinyEncoder")
    return encoder


def _save_encoder(encoder: GridEncoder, folder: Path) -> None:
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


# --------------------------------------------------------------------------- options


def _has_adapters(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def set_attention(
    engine_or_model: Engine | torch.nn.Module, attention: AttentionChoice = "auto"
) -> str:
    """Choose the attention implementation; returns the one applied (``sdpa``/``xformers``).

    ``xformers`` replaces the processor of every attention layer that is not
    KV-compressed (KV-compressed layers keep their own SDPA processor); ``sdpa`` puts
    diffusers' ``AttnProcessor2_0`` there. Works on an :class:`Engine` (transformer and
    VAE) or on one model.

    Raises:
        EngineError: ``xformers`` asked for without xFormers installed or off CUDA; an
            unknown choice.
    """
    models = (
        [engine_or_model.transformer, engine_or_model.vae]
        if isinstance(engine_or_model, Engine)
        else [engine_or_model]
    )
    device = next(models[0].parameters()).device
    xformers_ok = is_xformers_available() and device.type == "cuda"
    if attention == "auto":
        attention = "xformers" if xformers_ok else "sdpa"
    if attention not in ("sdpa", "xformers"):
        raise EngineError("expected attention 'auto', 'sdpa' or 'xformers'", item=str(attention))
    if attention == "xformers" and not xformers_ok:
        reason = (
            "xFormers is not installed"
            if not is_xformers_available()
            else (f"the engine runs on {device.type}, xFormers needs CUDA")
        )
        raise EngineError(
            f"cannot use xFormers attention: {reason}; use attention='sdpa' (or 'auto')",
            item="attention",
        )
    for model in models:
        for module in model.modules():
            if not isinstance(module, Attention):
                continue
            if isinstance(module.processor, KVCompressionAttnProcessor):
                continue  # compressed self-attention keeps its own processor
            module.set_processor(
                XFormersAttnProcessor() if attention == "xformers" else AttnProcessor2_0()
            )
    if isinstance(engine_or_model, Engine):
        engine_or_model.attention = attention
    return attention


def _apply_options(
    engine: Engine,
    *,
    kv_compress: int | None,
    compile: bool,
    attention: AttentionChoice,
) -> Engine:
    model = engine.transformer
    if kv_compress is not None:
        if int(kv_compress) != kv_compress or kv_compress < 1:
            raise EngineError(
                f"expected a KV-compression ratio >= 1 (1 = off), got {kv_compress}",
                item="kv_compress",
            )
        if kv_compress == 1:
            disable_kv_compression(model)
        else:
            enable_kv_compression(model, ratio=int(kv_compress))
    engine.kv_compress = model.config.get("kv_compress_ratio")
    set_attention(engine, attention)
    if compile:
        model.compile()  # in place: the module, its config and state_dict stay as they are
        engine.compiled = True
    return engine


# --------------------------------------------------------------------------- presets


def _meta_near(transformer_dir: Path) -> dict[str, Any]:
    """The ``histosynth_engine.json`` beside a transformer folder (``{}`` when none)."""
    meta_file = transformer_dir.parent / ENGINE_FILE
    return read_engine_meta(meta_file) if meta_file.is_file() else {}


def _sampler_of(meta: dict[str, Any], where: Path) -> str:
    """The sampler an engine folder asks for (``dpm-solver++`` when it says nothing)."""
    name = str(meta.get("sampler") or "dpm-solver++")
    try:
        make_scheduler(name)
    except EngineError as err:
        raise EngineError(f"sampler: {err}", path=where) from err
    return name


def _strength_of(meta: dict[str, Any], where: Path) -> float:
    """The τ an engine folder asks for (:data:`defaults.STRENGTH` when it says nothing)."""
    value = meta.get("strength", defaults.STRENGTH)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise EngineError(f"strength must be a number in (0, 1], not {value!r}", path=where)
    return float(value)


def _model_id(preset: str, found: FoundWeights) -> str:
    spec = PRESETS[preset].components.get("transformer")
    path = found.path
    if found.source == "embedded" and path is not None:
        return str(_meta_near(path).get("model_id") or PRESETS[preset].embedded)
    if spec is not None and path is not None and found.source == "hf-cache":
        if "snapshots" in path.parts[:-1]:
            revision = path.parts[path.parts.index("snapshots") + 1]
            return f"{spec.repo}@{revision[:12]}"
        return spec.repo
    return f"{preset}:{path}"


def _scheduler_config_near(transformer_dir: Path) -> dict[str, Any] | None:
    candidate = transformer_dir.parent / "scheduler" / "scheduler_config.json"
    if not candidate.is_file():
        return None
    config = read_json_object(candidate)
    check_scheduler_config(config, candidate)
    return config


def _load_preset(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    weights: str | os.PathLike | None,
) -> Engine:
    spec = PRESETS[preset]
    # every component is searched (and a missing one reported) before anything loads
    found = find_preset(preset, explicit=weights)
    transformer_dir = found["transformer"].path
    assert transformer_dir is not None and found["vae"].path and found["encoder"].path
    meta, meta_file = _meta_near(transformer_dir), transformer_dir.parent / ENGINE_FILE
    schedule = _scheduler_config_near(transformer_dir) or dict(PIXCELL_SCHEDULER_CONFIG)
    # every config's limits and any published checksums, before a weight is read
    check_before_loading(transformer_dir.parent, meta, {c: f.path for c, f in found.items()})
    transformer = load_transformer(transformer_dir, device, dtype)
    vae = load_vae(found["vae"].path, device, vae_dtype(dtype))
    encoder = load_encoder(found["encoder"].path, device, dtype)
    engine = Engine(
        transformer=transformer,
        vae=vae,
        encoder=encoder,
        scheduler_config=schedule,
        preset=preset,
        tile_size=spec.tile_size,
        mpp=spec.mpp,
        device=device,
        dtype=dtype,
        trained=spec.trained,
        model_id=_model_id(preset, found["transformer"]),
        sampler=_sampler_of(meta, meta_file),
        strength=_strength_of(meta, meta_file),
        sources={c: f"{f.source} {f.path}" for c, f in found.items()},
        title=spec.title,
        # an embedded engine says what it serves in its own file; the others in the preset
        abilities=EngineAbilities.from_json(
            meta.get("abilities"), where=str(meta_file), tile_size=spec.tile_size
        )
        if spec.embedded
        else spec.abilities,
    )
    _check_fit(engine, where=transformer_dir)
    if spec.embedded:
        engine.generator = _generator_near(transformer_dir.parent, engine, device, dtype)
    return engine


def _generator_near(
    root: Path, engine: Engine, device: torch.device, dtype: torch.dtype
) -> PixCellTransformer2DModel | None:
    """The companion generator of an engine folder (``generator/``), checked to take the
    same latents and condition as its transformer; ``None`` when the folder has none."""
    folder = root / "generator"
    if not (folder / "config.json").is_file():
        return None
    generator = load_transformer(folder, device, dtype)
    mine, theirs = engine.transformer.config, generator.config
    keys = ("in_channels", "sample_size", "caption_channels", "caption_num_tokens")
    differ = [k for k in keys if mine.get(k) != theirs.get(k)]
    if differ:
        raise EngineError(
            f"the generator does not fit the transformer ({', '.join(differ)} differ)",
            path=folder,
        )
    return generator


def _preset_for(config: dict[str, Any]) -> str:
    """The PixCell preset whose VAE / encoder fit a transformer config."""
    tokens = config.get("caption_num_tokens", 1)
    return "pixcell-1024" if tokens == 16 else "pixcell-256"


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype) -> Engine:
    """An engine from a local folder (``transformer/`` [+ ``vae/``, ``encoder/``]) or a
    bare transformer folder; missing parts come from the matching PixCell preset search."""
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
        _check_model_index(root)
    config = _transformer_config(transformer_dir)
    schedule = _scheduler_config_near(transformer_dir) or dict(PIXCELL_SCHEDULER_CONFIG)
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

    vae_path, encoder_path = part("vae"), part("encoder")
    # every config's limits and any published checksums, before a weight is read
    paths = {"transformer": transformer_dir, "vae": vae_path, "encoder": encoder_path}
    check_before_loading(root, meta, paths)
    transformer = load_transformer(transformer_dir, device, dtype)
    vae = load_vae(vae_path, device, vae_dtype(dtype))
    encoder = load_encoder(encoder_path, device, dtype)
    codec_down = 2 ** (len(vae.config.block_out_channels) - 1)
    tile_size = int(meta.get("tile_size") or transformer.config.sample_size * codec_down)
    engine = Engine(
        transformer=transformer,
        vae=vae,
        encoder=encoder,
        scheduler_config=schedule,
        preset=base,
        tile_size=tile_size,
        mpp=float(meta.get("mpp") or PRESETS[base].mpp),
        device=device,
        dtype=dtype,
        trained=trained,
        model_id=str(meta.get("model_id") or f"local:{folder.resolve()}"),
        sampler=_sampler_of(meta, root / ENGINE_FILE if root else folder),
        strength=_strength_of(meta, root / ENGINE_FILE if root else folder),
        sources=sources,
        title=str(meta.get("title") or ""),
        abilities=EngineAbilities.from_json(  # an older folder: all, at its tile size
            meta.get("abilities"), where=str(root / ENGINE_FILE if root else folder),
            tile_size=tile_size,
        ),
    )
    _check_fit(engine, where=folder)
    if root is not None:
        engine.generator = _generator_near(root, engine, device, dtype)
    return engine


def _check_fit(engine: Engine, *, where: Path) -> None:
    """The three parts must fit together: latent channels, tile size, UNI rows and width."""
    cfg = engine.transformer.config
    codec = engine.codec
    problems = []
    if cfg.in_channels != codec.latent_channels:
        problems.append(
            f"transformer takes {cfg.in_channels} latent channels, VAE gives "
            f"{codec.latent_channels}"
        )
    if cfg.sample_size * codec.downsample != engine.tile_size:
        problems.append(
            f"transformer sample_size {cfg.sample_size} × {codec.downsample} ≠ tile size "
            f"{engine.tile_size} px"
        )
    rows = engine.encoder.rows(engine.tile_size, engine.tile_size)
    if rows != cfg.caption_num_tokens:
        problems.append(
            f"encoder gives {rows} rows per {engine.tile_size} px tile, transformer takes "
            f"{cfg.caption_num_tokens}"
        )
    if engine.encoder.dim != cfg.caption_channels:
        problems.append(
            f"encoder rows are {engine.encoder.dim}-d, transformer takes {cfg.caption_channels}"
        )
    if problems:
        raise EngineError(f"the model parts do not fit: {'; '.join(problems)}", path=where)


def load_engine(
    model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    kv_compress: int | None = None,
    compile: bool = False,
    attention: AttentionChoice = "auto",
    weights: str | os.PathLike | None = None,
    tile_size: int | None = None,
) -> Engine:
    """Load an engine from a preset name or a local folder, offline.

    Args:
        model: ``None`` or ``"auto"`` → ``"pixcell-1024"`` when its weights are installed,
            else ``"default"`` (the embedded histosynth-mini-512, shipped in the package);
            ``"pixcell-1024"``, ``"pixcell-256"``, ``"default"``, ``"tiny"`` (UNTRAINED,
            seeded random weights, for tests), or a local folder: one holding
            ``transformer/`` (+ optional ``vae/``, ``encoder/``, ``scheduler/``, as
            :func:`save_engine` writes or like a diffusers repository), or a transformer
            folder itself; parts it lacks come from the PixCell preset its transformer fits
            (16 UNI rows → pixcell-1024).
        device: ``None`` → CUDA when available, else CPU.
        dtype: ``None`` → bfloat16 on CUDA, float32 on CPU (the VAE stays float32 when
            float16 is asked for).
        kv_compress: KV-compression ratio R for self-attention in the second half of the
            blocks (PixArt-Σ); ``1`` turns it off, ``None`` keeps what the weights say.
        compile: ``torch.compile`` the transformer (in place; the first call is slow).
        attention: ``"auto"`` (xFormers on CUDA when installed, else SDPA), ``"sdpa"``,
            ``"xformers"``.
        weights: a folder holding the preset's components (``transformer/``, ``vae/``,
            ``encoder/``); what it lacks is searched for as usual.
        tile_size: tile side, px; only the tiny engine takes another size than its
            preset's (a multiple of 64, e.g. 1024).

    Raises:
        EngineError: unknown preset or missing folder; weights not found (listing every
            place tried and how to provide them); weights that do not fit.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = AUTO_MODEL if model is None else os.fspath(model)
    if name == AUTO_MODEL:
        name = default_model()
    if name in PRESETS:
        spec = PRESETS[name]
        if name == "tiny":
            if weights is not None:
                raise EngineError(
                    "the tiny preset has no weights; load a saved engine folder by passing "
                    "it as the model instead",
                    item="weights",
                )
            engine = tiny_engine(tile_size or spec.tile_size, device=dev, dtype=dt)
        else:
            if tile_size is not None and tile_size != spec.tile_size:
                raise EngineError(
                    f"{name} makes {spec.tile_size} px tiles at {spec.mpp} µm/px, not "
                    f"{tile_size} px; choose the preset that fits the tile size",
                    item="tile_size",
                )
            engine = _load_preset(name, dev, dt, weights)
    else:
        folder = Path(check_model(name)).expanduser()
        if weights is not None:
            raise EngineError("give either a model folder or weights=, not both", item="weights")
        engine = _load_folder(folder, dev, dt)
        if tile_size is not None and tile_size != engine.tile_size:
            raise EngineError(
                f"this model makes {engine.tile_size} px tiles, not {tile_size} px",
                path=folder,
                item="tile_size",
            )
    return _apply_options(engine, kv_compress=kv_compress, compile=compile, attention=attention)


# --------------------------------------------------------------------------- saving


@contextmanager
def _temporary_sibling(folder: Path):
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_engine(
    engine: Engine, folder: str | os.PathLike, *, training: dict[str, Any] | None = None
) -> Path:
    """Write ``engine`` to ``folder`` (``transformer/``, ``vae/``, ``encoder/``,
    ``scheduler/``, ``histosynth_engine.json``, and diffusers' ``model_index.json``
    naming each component's class); :func:`load_engine` / :meth:`Engine.from_pretrained`
    read it back.

    ``training`` (JSON-able: how the weights were trained) is kept in the metadata file.

    The folder is written next to its place and renamed into it, so a reader never sees
    half an engine. The metadata keeps ``trained``: a saved tiny engine stays UNTRAINED.

    Raises:
        EngineError: ``folder`` exists and is not empty; adapters are loaded on the
            transformer (save them with :mod:`histosynth.synthesis.adapters`).
    """
    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EngineError("exists and is not an empty folder; not overwriting it", path=folder)
    if _has_adapters(engine.transformer):
        raise EngineError(
            "the transformer carries LoRA adapters; unload them before saving the base "
            "(adapters are saved on their own)",
            path=folder,
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_sibling(folder) as tmp:
        engine.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        if engine.generator is not None:
            engine.generator.save_pretrained(tmp / "generator", safe_serialization=True)
        engine.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        _save_encoder(engine.encoder, tmp / "encoder")
        (tmp / "scheduler").mkdir()
        scheduler = make_scheduler("dpm-solver++", engine.scheduler_config)
        scheduler.save_config(tmp / "scheduler")
        meta = {
            "preset": engine.preset,
            "title": engine.title,
            "tile_size": engine.tile_size,
            "mpp": engine.mpp,
            "trained": engine.trained,
            "model_id": engine.model_id,
            "sampler": engine.sampler,
            "strength": engine.strength,
            "abilities": engine.abilities.to_json(),
        }
        if training is not None:
            meta["training"] = training
        (tmp / ENGINE_FILE).write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
        index = _model_index(engine)
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n", "utf-8")
        if folder.exists():
            folder.rmdir()  # empty, checked above
        replace_durably(tmp, folder)
    return folder


MODEL_INDEX = "model_index.json"
"""diffusers' folder index: each component's library and class (written by
:func:`save_engine`; engine folders from before it still load without one)."""


def _check_model_index(root: Path) -> None:
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


def _model_index(engine: Engine) -> dict[str, Any]:
    """``model_index.json`` of a saved engine: ``[library, class]`` per component."""
    import diffusers

    def entry(module: Any) -> list[str]:
        kind = type(module)
        library = "diffusers" if kind.__module__.startswith("diffusers") else kind.__module__
        return [library, kind.__name__]

    index: dict[str, Any] = {
        "_class_name": "HistosynthEngine",
        "_diffusers_version": diffusers.__version__,
        "transformer": entry(engine.transformer),
        "vae": entry(engine.vae),
        "encoder": entry(engine.encoder),
        "scheduler": ["diffusers", type(make_scheduler("dpm-solver++",
                                                       engine.scheduler_config)).__name__],
    }
    if engine.generator is not None:
        index["generator"] = entry(engine.generator)
    return index


# --------------------------------------------------------------------------- reports


