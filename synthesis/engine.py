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

The parts live beside it: loading one component in ``engine_parts.py``, loading a
preset's or a folder's parts in ``engine_loading.py``, the folder format in
``engine_folder.py``, the attention and KV-compression options in ``engine_options.py``,
the tiny design in ``tiny_models.py``, samplers in ``schedulers.py``, devices in
``devices.py``, the weight report in ``model_report.py``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from histosynth.synthesis import defaults
from histosynth.synthesis.abilities import EngineAbilities, refusal
from histosynth.synthesis.devices import resolve_device, resolve_dtype
from histosynth.synthesis.engine_folder import MODEL_INDEX, write_engine_folder
from histosynth.synthesis.engine_loading import folder_engine_fields, preset_engine_fields
from histosynth.synthesis.engine_options import (
    AttentionChoice,
    set_kv_compression,
    set_models_attention,
)
from histosynth.synthesis.engine_parts import load_encoder, load_transformer
from histosynth.synthesis.errors import EngineError, UntrainedEngineWarning
from histosynth.synthesis.models.encoders import GridEncoder
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
from histosynth.synthesis.models.vae import LatentCodec
from histosynth.synthesis.sampling_defaults import SamplingDefaults
from histosynth.synthesis.schedulers import PIXCELL_SCHEDULER_CONFIG, SCHEDULERS, make_scheduler
from histosynth.synthesis.tiny_models import (
    TINY_SEED,
    TINY_VAE_CONFIG,
    build_tiny_models,
    tiny_transformer_config,
)
from histosynth.synthesis.weights import (
    AUTO_MODEL,
    COMPONENTS,
    ENGINE_FILE,
    PRESETS,
    PRODUCTION_PRESET,
    check_model,
    default_model,
)

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.synthesis.pipelines.inpaint import InpaintPipeline
    from histosynth.synthesis.pipelines.variation import VariationPipeline

__all__ = [
    "ENGINE_FILE",
    "MODEL_INDEX",
    "PIXCELL_SCHEDULER_CONFIG",
    "SCHEDULERS",
    "TINY_SEED",
    "TINY_VAE_CONFIG",
    "AttentionChoice",
    "Engine",
    "load_encoder",
    "load_engine",
    "load_transformer",
    "make_scheduler",
    "resolve_device",
    "resolve_dtype",
    "save_engine",
    "set_attention",
    "tiny_engine",
    "tiny_transformer_config",
]

PRODUCTION_PRESET_TITLE = (
    f"PixCell-1024 (install its weights: histosynth models check {PRODUCTION_PRESET})"
)
"""How messages recommend the production engine."""

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
        sampling: the steps and CFG scale of each mode unless told otherwise
            (``histosynth_engine.json``; :mod:`histosynth.synthesis.defaults` when it
            names none), chosen by the engine's own bench.
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
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
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
        pipe = VariationPipeline(
            transformer=self.transformer if self.generator is None else self.generator,
            vae=self.vae,
            scheduler=self.make_scheduler(scheduler),
            encoder=self.encoder,
        )
        pipe.default_steps = self.sampling.variation_steps
        pipe.default_guidance = self.sampling.variation_guidance
        return pipe

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
        pipe.default_steps = self.sampling.inpaint_steps
        pipe.default_guidance = self.sampling.inpaint_guidance
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
    transformer, vae, encoder = build_tiny_models(tile_size, seed, dev, dt)
    warnings.warn(
        "the tiny engine is UNTRAINED (seeded random weights): its pixels are not histology; "
        "use PixCell-1024 for production (histosynth models check pixcell-1024)",
        UntrainedEngineWarning,
        stacklevel=2,
    )
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


# --------------------------------------------------------------------------- options


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
    if not isinstance(engine_or_model, Engine):
        return set_models_attention([engine_or_model], attention)
    engine = engine_or_model
    engine.attention = set_models_attention([engine.transformer, engine.vae], attention)
    return engine.attention


def _apply_options(
    engine: Engine,
    *,
    kv_compress: int | None,
    compile: bool,
    attention: AttentionChoice,
) -> Engine:
    engine.kv_compress = set_kv_compression(engine.transformer, kv_compress)
    set_attention(engine, attention)
    if compile:
        engine.transformer.compile()  # in place: the module, its config and state_dict stay
        engine.compiled = True
    return engine


# --------------------------------------------------------------------------- loading


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
            engine = Engine(**preset_engine_fields(name, dev, dt, weights))
    else:
        folder = Path(check_model(name)).expanduser()
        if weights is not None:
            raise EngineError("give either a model folder or weights=, not both", item="weights")
        engine = Engine(**folder_engine_fields(folder, dev, dt))
        if tile_size is not None and tile_size != engine.tile_size:
            raise EngineError(
                f"this model makes {engine.tile_size} px tiles, not {tile_size} px",
                path=folder,
                item="tile_size",
            )
    return _apply_options(engine, kv_compress=kv_compress, compile=compile, attention=attention)


# --------------------------------------------------------------------------- saving


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
    meta = {
        "preset": engine.preset,
        "title": engine.title,
        "tile_size": engine.tile_size,
        "mpp": engine.mpp,
        "trained": engine.trained,
        "model_id": engine.model_id,
        "sampler": engine.sampler,
        "strength": engine.strength,
        **engine.sampling.to_meta(),
        "abilities": engine.abilities.to_json(),
    }
    if training is not None:
        meta["training"] = training
    parts = {
        "transformer": engine.transformer,
        "generator": engine.generator,
        "vae": engine.vae,
        "encoder": engine.encoder,
    }
    return write_engine_folder(folder, parts, engine.scheduler_config, meta)
