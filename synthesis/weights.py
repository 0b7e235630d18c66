"""Where model weights come from: local folders and the local Hugging Face cache, offline.

The engine never downloads. A component (``transformer``, ``vae``, ``encoder``) of a
preset is looked for, in this order:

1. an explicit path given by the caller (a weights folder or file, or a folder that holds
   ``<component>/`` or the repository's subfolder);
2. ``$HISTOSYNTH_WEIGHTS`` (one folder, or several joined with ``os.pathsep``), in the
   layouts ``<root>/<preset>/<component>``, ``<root>/<repo-name>/<subfolder>`` and
   ``<root>/<owner>/<repo-name>/<subfolder>`` (what ``hf download --local-dir`` writes);
3. the user settings file (``$HISTOSYNTH_CONFIG``, else
   ``$XDG_CONFIG_HOME/histosynth/settings.yaml``, else ``~/.config/histosynth/settings.yaml``),
   key ``weights: {<preset>: {<component>: <path>}}``; relative paths are relative to the
   settings file;
4. the local Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``), read from disk only — nothing here contacts the Hub.

A missing component is an :class:`EngineError` (``require=True``) that lists every place
looked in and how to provide the weights; there is never a silent fallback to random
weights. The ``tiny`` preset has no weights at all: it is untrained, built from a seeded
random initialisation, and says so (``source == "untrained"``). The ``default`` preset's
weights ship inside the package (``source == "embedded"``, :func:`embedded_folder`); the
places above may replace them. The feature extractors of ``histosynth evaluate``
(:data:`FEATURE_EXTRACTORS`, :func:`find_extractor_weights`) are found the same way.

Size: one concept, finding weights offline; presets, components and feature extractors
share the search order, the checks of a candidate and the messages.

Example:
    >>> found = find_component("pixcell-1024", "vae", require=False)
    >>> found.source in (None, "explicit", "env", "settings", "hf-cache")
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from huggingface_hub import try_to_load_from_cache

from histosynth.common.geometry import DEFAULT_MPP
from histosynth.synthesis import defaults
from histosynth.synthesis.abilities import EngineAbilities
from histosynth.synthesis.config_limits import check_engine_meta, read_json_object
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.sampling_defaults import SamplingDefaults, strength_of

__all__ = [
    "AUTO_MODEL",
    "COMPONENTS",
    "DEFAULT_PRESET",
    "FEATURE_EXTRACTORS",
    "INCEPTION_FILES",
    "PRESETS",
    "PRODUCTION_PRESET",
    "ComponentSpec",
    "ExtractorSpec",
    "FoundWeights",
    "ModelFacts",
    "PresetSpec",
    "default_model",
    "embedded_folder",
    "find_component",
    "find_extractor_weights",
    "find_preset",
    "hf_cache_dir",
    "model_facts",
    "preset_facts",
    "read_engine_meta",
    "read_json_object",
    "read_settings",
    "settings_path",
    "torch_hub_checkpoints",
]

COMPONENTS: tuple[str, ...] = ("transformer", "vae", "encoder")
"""Component names every preset is made of."""

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pth", ".pt")
TIMM_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
"""Weight file names of a timm checkpoint folder, in order of preference."""

Source = Literal["explicit", "env", "settings", "hf-cache", "untrained", "embedded"]

EMBEDDED_ROOT = Path(__file__).parent / "embedded"
"""Where the weights that ship inside the package live (one folder per embedded preset)."""


@dataclass(frozen=True)
class ComponentSpec:
    """Where one component lives on the Hub and what its files look like.

    ``kind`` is ``"diffusers"`` (a folder with ``config.json`` and weight files) or
    ``"timm"`` (a single checkpoint file, ``model.safetensors`` or ``pytorch_model.bin``).
    """

    repo: str
    subfolder: str = ""
    kind: Literal["diffusers", "timm"] = "diffusers"
    gated: bool = False


@dataclass(frozen=True)
class PresetSpec:
    """A model preset: tile size (px) at ``mpp`` (µm/px) and its components."""

    name: str
    title: str
    tile_size: int
    mpp: float
    trained: bool
    components: Mapping[str, ComponentSpec] = field(default_factory=dict)
    #: folder under :data:`EMBEDDED_ROOT` holding an engine folder shipped in the package
    embedded: str | None = None
    #: what it serves (an embedded engine's own ``histosynth_engine.json`` says it there)
    abilities: EngineAbilities = field(default_factory=EngineAbilities)


_VAE = ComponentSpec("stabilityai/stable-diffusion-3.5-large", "vae", "diffusers", gated=True)
_UNI = ComponentSpec("MahmoodLab/UNI2-h", "", "timm", gated=True)

#: the file an engine folder keeps its preset, tile size, sampler and training record in
ENGINE_FILE = "histosynth_engine.json"
DEFAULT_PRESET = "default"
"""The preset used when no model is named and PixCell-1024's weights are not installed."""
PRODUCTION_PRESET = "pixcell-1024"
"""The preset recommended for production (and used when no model is named, if installed)."""
AUTO_MODEL = "auto"
"""The model name that means "choose": :data:`PRODUCTION_PRESET` if installed, else default."""


def _pixcell_preset(tile_size: int) -> PresetSpec:
    """PixCell-``tile_size``: StonyBrook's transformer, the SD3 VAE and UNI2-h, for
    ``tile_size`` px tiles at :data:`DEFAULT_MPP` µm/px."""
    return PresetSpec(
        f"pixcell-{tile_size}",
        f"PixCell-{tile_size} (PixArt-XL/2, UNI2-h, SD3 VAE)",
        tile_size=tile_size,
        mpp=DEFAULT_MPP,
        trained=True,
        components={
            "transformer": ComponentSpec(f"StonyBrook-CVLab/PixCell-{tile_size}", "transformer"),
            "vae": _VAE,
            "encoder": _UNI,
        },
        abilities=EngineAbilities(tile_sizes=(tile_size,)),
    )


PRESETS: dict[str, PresetSpec] = {
    "default": PresetSpec(
        "default",
        "histosynth-mini-512: the embedded default engine, a small model trained by histosynth "
        "on the CPU on the H&E images inside its dependencies (not PixCell; for demos and CPU "
        "runs, PixCell-1024 for production)",
        tile_size=512,
        mpp=DEFAULT_MPP,
        trained=True,
        components={},
        embedded="histosynth_mini_512",
    ),
    "pixcell-1024": _pixcell_preset(1024),
    "pixcell-256": _pixcell_preset(256),
    "tiny": PresetSpec(
        "tiny",
        "Tiny engine (UNTRAINED, seeded random weights; for tests)",
        tile_size=256,
        mpp=DEFAULT_MPP,
        trained=False,
        components={},
        # PixCell's design in miniature, at any multiple of 64 px; its weights are random,
        # which ``trained`` says (the workflows ask for allow_untrained before it paints)
        abilities=EngineAbilities(),
    ),
}


@dataclass
class FoundWeights:
    """The outcome of a search for one component.

    ``path`` is a folder (diffusers components) or a checkpoint file (timm), or ``None``
    when nothing was found (or the preset is untrained). ``source`` says where it was
    found; ``tried`` lists every place looked in, in order, with the reason it did not
    qualify; ``how_to_provide`` tells a user how to make the weights available.
    """

    preset: str
    component: str
    path: Path | None
    source: Source | None
    tried: list[str]
    how_to_provide: str

    @property
    def found(self) -> bool:
        """True when weights were found."""
        return self.path is not None

    @property
    def untrained(self) -> bool:
        """True for a preset that has no weights by design (seeded random init)."""
        return self.source == "untrained"


# --------------------------------------------------------------------------- places


def settings_path() -> Path:
    """The user settings file (it need not exist)."""
    if os.environ.get("HISTOSYNTH_CONFIG"):
        return Path(os.environ["HISTOSYNTH_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "histosynth" / "settings.yaml"


def read_settings(path: Path | None = None) -> dict:
    """The settings file as a dict (``{}`` when the file does not exist).

    Raises:
        EngineError: the file is not YAML or not a mapping (naming the file).
    """
    path = settings_path() if path is None else Path(path)
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        reason = str(err).replace("\n", " ")
        raise EngineError(f"cannot read the settings file ({reason})", path=path) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EngineError(f"expected a mapping, found {type(data).__name__}", path=path)
    return data


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache folder, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "huggingface" / "hub"


def embedded_folder(preset: str) -> Path:
    """The engine folder of an embedded preset inside the installed package.

    Raises:
        EngineError: ``preset`` has no embedded weights, or the installation lacks them.
    """
    spec = PRESETS.get(preset)
    if spec is None or spec.embedded is None:
        raise EngineError("this preset has no embedded weights", item=preset)
    folder = EMBEDDED_ROOT / spec.embedded
    if not (folder / "transformer" / "config.json").is_file():
        raise EngineError(
            f"the embedded weights of the {preset} preset are missing from this installation; "
            "reinstall histosynth (they ship in its wheel)",
            path=folder,
        )
    return folder


def default_model() -> str:
    """The preset to use when no model is named: ``pixcell-1024`` when all of its weights
    are installed (found offline), else the embedded ``default`` engine."""
    ready = all(find_component(PRODUCTION_PRESET, c, require=False).found for c in COMPONENTS)
    return PRODUCTION_PRESET if ready else DEFAULT_PRESET


def _weights_roots() -> list[Path]:
    raw = os.environ.get("HISTOSYNTH_WEIGHTS", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


# --------------------------------------------------------------------------- checks


def _check(path: Path, spec: ComponentSpec | None) -> tuple[Path | None, str]:
    """``(usable path, "")`` or ``(None, reason)`` for one candidate location."""
    if not path.exists():
        return None, "missing"
    kind = spec.kind if spec is not None else "diffusers"
    if kind == "timm":
        if path.is_file():
            if path.suffix in WEIGHT_SUFFIXES:
                return path, ""
            return None, f"not a weights file (expected {', '.join(TIMM_FILES)})"
        for name in TIMM_FILES:
            if (path / name).is_file():
                return path / name, ""
        return None, f"no {' or '.join(TIMM_FILES)}"
    if not path.is_dir():
        return None, "not a folder (expected a diffusers folder with config.json)"
    if not (path / "config.json").is_file():
        return None, "no config.json"
    if not any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in path.iterdir()):
        return None, "config.json but no weight file (*.safetensors or *.bin)"
    return path, ""


def _candidates_in(folder: Path, component: str, spec: ComponentSpec | None) -> list[Path]:
    """``folder`` itself, then the component's subfolders inside it."""
    out = [folder]
    for sub in (component, spec.subfolder if spec else ""):
        if sub and folder / sub not in out:
            out.append(folder / sub)
    return out


def _env_candidates(
    root: Path, preset: str, component: str, spec: ComponentSpec | None
) -> list[Path]:
    out = [root / preset / component]
    if spec is not None:
        owner, name = spec.repo.split("/", 1)
        for base in (root / preset, root / name, root / owner / name):
            candidate = base / spec.subfolder if spec.subfolder else base
            if candidate not in out:
                out.append(candidate)
    return out


def _hf_cache_lookup(spec: ComponentSpec, cache: Path) -> tuple[Path | None, str]:
    """Look for ``spec`` in the hub cache ``cache`` on disk (no network)."""
    prefix = f"{spec.subfolder}/" if spec.subfolder else ""
    markers = TIMM_FILES if spec.kind == "timm" else ("config.json",)
    repo_dir = cache / ("models--" + spec.repo.replace("/", "--"))
    if not repo_dir.is_dir():
        return None, "not in the cache"
    reasons = []
    # the snapshot that refs/main points to first, then any other cached snapshot
    for marker in markers:
        hit = try_to_load_from_cache(spec.repo, prefix + marker, cache_dir=str(cache))
        if isinstance(hit, str):
            found, reason = _check(Path(hit) if spec.kind == "timm" else Path(hit).parent, spec)
            if found is not None:
                return found, ""
            reasons.append(reason)
    snapshots = repo_dir / "snapshots"
    if snapshots.is_dir():
        for snap in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            base = snap / spec.subfolder if spec.subfolder else snap
            found, reason = _check(base, spec)
            if found is not None:
                return found, ""
            reasons.append(reason)
    return None, reasons[0] if reasons else "no snapshot"


# --------------------------------------------------------------------------- search


def how_to_provide(preset: str, component: str) -> str:
    """Instructions for making a component's weights available (one line)."""
    spec = PRESETS[preset].components.get(component) if preset in PRESETS else None
    local = f"$HISTOSYNTH_WEIGHTS/{preset}/{component}"
    if spec is None:
        return f"put the weights in {local} or name them in {settings_path()}"
    include = f" --include '{spec.subfolder}/*'" if spec.subfolder else ""
    gated = (
        f"accept the licence on https://huggingface.co/{spec.repo} and log in "
        "(`hf auth login`), then "
        if spec.gated
        else ""
    )
    return (
        f"{gated}download once with `hf download {spec.repo}{include}` (fills the local "
        f"Hugging Face cache), or with `--local-dir $HISTOSYNTH_WEIGHTS/{spec.repo}` "
        f"(or copy the files to {local}), or set weights: {{{preset}: {{{component}: PATH}}}}"
        f" in {settings_path()}"
    )


def _first_usable(
    candidates: list[Path], spec: ComponentSpec | None, label: str, tried: list[str]
) -> tuple[Path | None, str]:
    """The first of ``candidates`` that holds the component (``(path, "")``), else
    ``(None, the first candidate's reason)``; each one looked at is noted in ``tried``."""
    first_reason = ""
    for candidate in candidates:
        found, reason = _check(candidate, spec)
        tried.append(f"{label} {candidate} ({reason or 'ok'})")
        if found is not None:
            return found, ""
        first_reason = first_reason or reason
    return None, first_reason


def _env_weights(
    preset: str, component: str, spec: ComponentSpec | None, tried: list[str]
) -> Path | None:
    """The component in a ``$HISTOSYNTH_WEIGHTS`` folder (``None`` when in none)."""
    roots = _weights_roots()
    if not roots:
        tried.append("$HISTOSYNTH_WEIGHTS (not set)")
    for root in roots:
        candidates = _env_candidates(root, preset, component, spec)
        found, _ = _first_usable(candidates, spec, "$HISTOSYNTH_WEIGHTS", tried)
        if found is not None:
            return found
    return None


def _settings_weights(
    preset: str, component: str, spec: ComponentSpec | None, tried: list[str]
) -> Path | None:
    """The component at the path the settings file names (``None`` when it names none).

    Raises:
        EngineError: the entry is not a path, or its path does not hold the component.
    """
    sfile = settings_path()
    key = f"weights.{preset}.{component}"
    entry = ((read_settings(sfile).get("weights") or {}).get(preset) or {}).get(component)
    if entry is None:
        state = "no entry" if sfile.is_file() else "missing"
        tried.append(f"settings {sfile} {key} ({state})")
        return None
    if not isinstance(entry, str):
        raise EngineError(f"expected a path, found {type(entry).__name__}", path=sfile, item=key)
    configured = Path(entry).expanduser()
    if not configured.is_absolute():
        configured = sfile.parent / configured
    candidates = _candidates_in(configured, component, spec)
    found, reason = _first_usable(candidates, spec, "settings", tried)
    if found is None:
        raise EngineError(
            f"{configured} does not hold {preset}/{component} weights ({reason})",
            path=sfile,
            item=key,
        )
    return found


def _embedded_weights(
    preset: str, component: str, spec: ComponentSpec | None, tried: list[str], require: bool
) -> Path | None:
    """The component shipped inside the package for an embedded preset.

    Raises:
        EngineError: it is missing from the installation and ``require`` is true.
    """
    embedded = EMBEDDED_ROOT / str(PRESETS[preset].embedded) / component
    found, reason = _first_usable([embedded], spec, "embedded", tried)
    if found is None and require:
        raise EngineError(
            f"the embedded {component} of the {preset} preset is missing from this "
            f"installation ({reason}); reinstall histosynth",
            path=embedded,
        )
    return found


def _hf_cache_weights(spec: ComponentSpec, tried: list[str]) -> Path | None:
    """The component in the local Hugging Face cache (``None`` when not there)."""
    cache = hf_cache_dir()
    found, reason = _hf_cache_lookup(spec, cache)
    where = f"{spec.repo}/{spec.subfolder}" if spec.subfolder else spec.repo
    tried.append(f"hf-cache {cache} {where} ({reason or 'ok'})")
    return found


def _component_spec(preset: str, component: str) -> ComponentSpec | None:
    """``PRESETS[preset].components.get(component)``, once both names are known.

    Raises:
        EngineError: unknown preset or component.
    """
    if preset not in PRESETS:
        raise EngineError(f"unknown preset; expected one of {', '.join(PRESETS)}", item=preset)
    if component not in COMPONENTS:
        raise EngineError(
            f"unknown component; expected one of {', '.join(COMPONENTS)}",
            item=f"{preset}/{component}",
        )
    return PRESETS[preset].components.get(component)


def find_component(
    preset: str,
    component: str,
    *,
    explicit: str | os.PathLike | None = None,
    require: bool = True,
) -> FoundWeights:
    """Find the weights of ``component`` of ``preset`` on this machine, offline.

    Args:
        preset: a key of :data:`PRESETS` (``"pixcell-1024"``, ``"pixcell-256"``, ``"tiny"``).
        component: ``"transformer"``, ``"vae"`` or ``"encoder"``.
        explicit: a path the caller names; it must hold the component (an error otherwise).
        require: raise when nothing is found (else return a result with ``path=None``).

    Returns:
        FoundWeights: ``path`` is the diffusers folder (transformer, vae) or the
        checkpoint file (encoder).

    Raises:
        EngineError: unknown preset/component; an explicit or settings path that does not
            hold the component; nothing found and ``require`` is true.
    """
    spec = _component_spec(preset, component)
    spec_p = PRESETS[preset]
    tried: list[str] = []
    hint = how_to_provide(preset, component)

    def result(path: Path | None, source: Source | None) -> FoundWeights:
        return FoundWeights(preset, component, path, source, tried, hint)

    # 1. explicit path: the caller asked for it, so a wrong one is an error
    if explicit is not None:
        folder = Path(explicit).expanduser()
        candidates = _candidates_in(folder, component, spec)
        found, reason = _first_usable(candidates, spec, "explicit", tried)
        if found is None:
            raise EngineError(
                f"does not hold {preset}/{component} weights ({reason})", path=folder
            )
        return result(found, "explicit")
    # 2. $HISTOSYNTH_WEIGHTS, 3. the settings file
    for source, search in (("env", _env_weights), ("settings", _settings_weights)):
        found = search(preset, component, spec, tried)
        if found is not None:
            return result(found, source)
    # 4. untrained presets have nothing more to look for; embedded ones ship in the package
    if not spec_p.trained:
        return result(None, "untrained")
    if spec_p.embedded is not None:
        found = _embedded_weights(preset, component, spec, tried, require)
        return result(found, "embedded" if found is not None else None)
    # 5. the local Hugging Face cache
    assert spec is not None
    found = _hf_cache_weights(spec, tried)
    if found is not None:
        return result(found, "hf-cache")
    if require:
        raise EngineError(
            f"weights not found; looked in: {'; '.join(tried)}. To provide them: {hint}",
            item=f"{preset}/{component}",
        )
    return result(None, None)


def check_model(model: str | os.PathLike | None) -> str:
    """The model a run will load — ``None`` / ``"auto"`` resolved by :func:`default_model` —
    checked without loading anything: a preset whose weights are all found offline (or
    that needs none), or an existing folder. Cheap (no model library imported), so
    commands call it before they write anything.

    Raises:
        EngineError: unknown preset and no such folder, a file instead of a folder, or a
            preset's weights missing (naming every place looked).
    """
    name = AUTO_MODEL if model is None else os.fspath(model)
    if name == AUTO_MODEL:
        return default_model()
    if name in PRESETS:
        find_preset(name, require=True)
        return name
    folder = Path(name).expanduser()
    if not folder.exists():
        raise EngineError(
            f"unknown preset and no such folder; expected one of {', '.join(PRESETS)}, "
            f"{AUTO_MODEL} or a local model folder",
            item=name,
        )
    if not folder.is_dir():
        raise EngineError("expected a model folder, found a file", path=folder)
    return name


@dataclass(frozen=True)
class ModelFacts:
    """What a model is, read from its folder's metadata without loading any weights."""

    name: str
    abilities: EngineAbilities
    trained: bool
    tile_size: int | None
    #: τ and the steps and CFG scale of each mode it runs at unless told otherwise
    strength: float = defaults.STRENGTH
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)


def model_facts(model: str | os.PathLike | None) -> ModelFacts:
    """The abilities and trained flag of the model a run will load (:func:`check_model`
    first), from the preset or the folder's ``histosynth_engine.json`` — no weight is read,
    so a command refuses a mode the engine cannot serve before any slide or model loads.

    Raises:
        EngineError: what :func:`check_model` raises; a malformed metadata file.
    """
    return _facts(check_model(model))


def preset_facts(preset: str) -> ModelFacts:
    """:func:`model_facts` of a preset, whether its weights are installed or not."""
    if preset not in PRESETS:
        raise EngineError(f"unknown preset; expected one of {', '.join(PRESETS)}", item=preset)
    return _facts(preset)


def read_engine_meta(path: Path) -> dict:
    """An engine folder's ``histosynth_engine.json``, its numbers within
    :data:`~histosynth.synthesis.config_limits.LIMITS` and its weight manifest well formed.

    Raises:
        EngineError: what :func:`read_json_object` raises; a value out of its limits.
    """
    meta = read_json_object(path)
    check_engine_meta(meta, path)
    return meta


def _facts(name: str) -> ModelFacts:
    spec = PRESETS.get(name)
    if spec is not None and spec.embedded is None:
        return ModelFacts(name, spec.abilities, spec.trained, spec.tile_size)
    if spec is not None:
        meta_file = EMBEDDED_ROOT / str(spec.embedded) / ENGINE_FILE
    else:
        meta_file = Path(name).expanduser() / ENGINE_FILE
    if not meta_file.is_file():
        return ModelFacts(name, EngineAbilities(), True, None)
    meta = read_engine_meta(meta_file)
    tile = meta.get("tile_size") if isinstance(meta.get("tile_size"), int) else None
    abilities = EngineAbilities.from_json(
        meta.get("abilities"), where=str(meta_file), tile_size=tile
    )
    return ModelFacts(
        name,
        abilities,
        bool(meta.get("trained", True)),
        tile,
        strength_of(meta, meta_file),
        SamplingDefaults.from_meta(meta),
    )


def find_preset(
    preset: str, *, explicit: str | os.PathLike | None = None, require: bool = True
) -> dict[str, FoundWeights]:
    """Find every component of ``preset`` (see :func:`find_component`).

    ``explicit`` is a folder holding the components as subfolders (``transformer/``,
    ``vae/``, ``encoder/``, or the repositories' own subfolder names); a component it
    does not hold is searched for as usual (e.g. a fine-tuned transformer with the stock
    VAE and encoder from the cache).
    """
    if preset not in PRESETS:
        raise EngineError(f"unknown preset; expected one of {', '.join(PRESETS)}", item=preset)
    if explicit is not None and not Path(explicit).expanduser().is_dir():
        raise EngineError("expected a folder of model components", path=explicit)
    out = {}
    for component in COMPONENTS:
        sub_explicit = None
        if explicit is not None:
            spec = PRESETS[preset].components.get(component)
            subs = _candidates_in(Path(explicit).expanduser(), component, spec)[1:]
            sub_explicit = next((c for c in subs if c.exists()), None)
        out[component] = find_component(preset, component, explicit=sub_explicit, require=require)
    return out


# --------------------------------------------------------------------------- feature extractors


@dataclass(frozen=True)
class ExtractorSpec:
    """Where a feature extractor's weights come from and what they look like.

    ``kind``: ``"timm"`` (one checkpoint file, ``model.safetensors`` / ``pytorch_model.bin``),
    ``"diffusers"`` (a Hugging Face folder with ``config.json`` and weight files; a
    transformers model too) or ``"file"`` (one of ``files``, e.g. the FID Inception
    weights, also looked for in torch's hub cache where torch-fidelity / pytorch-fid keep
    them). ``source``: where to get them (a Hub repo or a download address).
    """

    kind: Literal["timm", "diffusers", "file"]
    source: str
    repo: str = ""
    files: tuple[str, ...] = ()
    gated: bool = False


#: The FID Inception-v3 weights: torch-fidelity's file, or pytorch-fid's (same network).
INCEPTION_FILES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)

#: The feature extractors of ``histosynth evaluate`` that need weights.
FEATURE_EXTRACTORS: dict[str, ExtractorSpec] = {
    "inception": ExtractorSpec(
        "file",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        + INCEPTION_FILES[0],
        files=INCEPTION_FILES,
    ),
    "clip": ExtractorSpec(
        "diffusers", "openai/clip-vit-base-patch32", repo="openai/clip-vit-base-patch32"
    ),
    "clip-l14-336": ExtractorSpec(
        "diffusers", "openai/clip-vit-large-patch14-336", repo="openai/clip-vit-large-patch14-336"
    ),
    "uni2-h": ExtractorSpec("timm", "MahmoodLab/UNI2-h", repo="MahmoodLab/UNI2-h", gated=True),
    "virchow2": ExtractorSpec("timm", "paige-ai/Virchow2", repo="paige-ai/Virchow2", gated=True),
    "h-optimus-1": ExtractorSpec(
        "timm", "bioptimus/H-optimus-1", repo="bioptimus/H-optimus-1", gated=True
    ),
}


def torch_hub_checkpoints() -> Path:
    """torch's hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``, default
    ``~/.cache/torch``), read from the environment without importing torch."""
    home = os.environ.get("TORCH_HOME")
    if not home:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        home = str(Path(cache) / "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def _check_extractor(path: Path, spec: ExtractorSpec) -> tuple[Path | None, str]:
    if spec.kind != "file":
        return _check(path, ComponentSpec(spec.repo, "", spec.kind, gated=spec.gated))
    if path.is_file():
        return (path, "") if path.suffix in WEIGHT_SUFFIXES else (None, "not a weights file")
    for name in spec.files:
        if (path / name).is_file():
            return path / name, ""
    return None, "missing" if not path.exists() else f"no {' or '.join(spec.files)}"


def find_extractor_weights(name: str, explicit: str | os.PathLike | None = None) -> Path:
    """The weights of the feature extractor ``name`` (a key of
    :data:`FEATURE_EXTRACTORS`), offline: ``explicit``; ``$HISTOSYNTH_WEIGHTS/<name>/`` or
    ``/<owner>/<repo-name>/``; ``weights: {features: {<name>: PATH}}`` in the settings
    file; the local HF cache (Hub extractors) or torch's hub cache (file extractors).
    A checkpoint file for ``timm`` and ``file`` extractors, a folder for ``diffusers``.

    Raises:
        EngineError: nothing found — naming every place looked at and how to fill one.
    """
    spec = FEATURE_EXTRACTORS[name]
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if explicit is not None:
        candidates.append(("explicit", Path(explicit).expanduser()))
    for root in _weights_roots():
        candidates.append(("$HISTOSYNTH_WEIGHTS", root / name))
        if spec.repo:
            owner, repo_name = spec.repo.split("/", 1)
            candidates += [
                ("$HISTOSYNTH_WEIGHTS", root / owner / repo_name),
                ("$HISTOSYNTH_WEIGHTS", root / repo_name),
            ]
    configured = (read_settings().get("weights") or {}).get("features") or {}
    if isinstance(configured, dict) and configured.get(name):
        candidates.append(("settings", Path(str(configured[name])).expanduser()))
    if spec.kind == "file":
        candidates.append(("torch hub cache", torch_hub_checkpoints()))
    for source, path in candidates:
        found, reason = _check_extractor(path, spec)
        if found is not None:
            return found
        tried.append(f"{source} {path} ({reason})")
        if source == "explicit":
            raise EngineError(f"does not hold the {name} weights ({reason})", path=path)
    if spec.repo:
        component = ComponentSpec(spec.repo, "", spec.kind, gated=spec.gated)
        found, reason = _hf_cache_lookup(component, hf_cache_dir())
        if found is not None:
            return found
        tried.append(f"Hugging Face cache {hf_cache_dir()} ({reason})")
    if spec.kind == "file":
        how = f"download {spec.source} and copy it to $HISTOSYNTH_WEIGHTS/{name}/"
    else:
        licence = f"accept the licence on https://huggingface.co/{spec.repo}, then " if (
            spec.gated) else ""
        what = " / ".join(TIMM_FILES) if spec.kind == "timm" else "the model folder"
        how = (f"{licence}`hf download {spec.repo}` (fills the cache) or copy {what} to "
               f"$HISTOSYNTH_WEIGHTS/{name}/")
    raise EngineError(
        f"the {name} feature extractor's weights are not on this machine (looked in: "
        + "; ".join(tried)
        + f"). To fix: {how}",
        item=name,
    )
