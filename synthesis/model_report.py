"""``histosynth models list`` / ``models check``: where each preset's weights are, as text.

Imports no model library (only the offline weight search of
:mod:`histosynth.synthesis.weights`), so the report answers in well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from histosynth.synthesis.abilities import serves
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.weights import (
    AUTO_MODEL,
    COMPONENTS,
    EMBEDDED_ROOT,
    ENGINE_FILE,
    FEATURE_EXTRACTORS,
    PRESETS,
    PRODUCTION_PRESET,
    default_model,
    find_component,
    find_extractor_weights,
    hf_cache_dir,
    preset_facts,
)

__all__ = [
    "ComponentStatus",
    "check_preset",
    "describe_preset",
    "format_models_report",
    "model_card_summary",
]


@dataclass
class ComponentStatus:
    """Where one component of a preset was found (or not), for ``histosynth models``."""

    preset: str
    component: str
    path: Path | None
    source: str | None
    tried: list[str]
    how_to_provide: str
    error: str | None = None

    @property
    def found(self) -> bool:
        """True when the weights are there (or the preset needs none)."""
        return self.path is not None or self.source == "untrained"


def describe_preset(preset: str) -> list[ComponentStatus]:
    """Search every component of ``preset`` offline and say where it is or was looked for.

    Never raises for missing or misconfigured weights: the problem is in ``error``.

    Raises:
        EngineError: unknown preset.
    """
    if preset not in PRESETS:
        raise EngineError(f"unknown preset; expected one of {', '.join(PRESETS)}", item=preset)
    out = []
    for component in COMPONENTS:
        try:
            found = find_component(preset, component, require=False)
        except EngineError as err:
            out.append(ComponentStatus(preset, component, None, None, [], "", error=str(err)))
            continue
        how = found.how_to_provide
        if found.untrained:
            how = "nothing to provide: built from a seeded random initialisation (UNTRAINED)"
        out.append(
            ComponentStatus(preset, component, found.path, found.source, list(found.tried), how)
        )
    return out


def check_preset(preset: str) -> bool:
    """True when every component of ``preset`` is available offline (``tiny``: always)."""
    return all(status.found for status in describe_preset(preset))


def model_card_summary(preset: str) -> list[str]:
    """A few lines from an embedded preset's model card: data, training, held-out results."""
    folder = EMBEDDED_ROOT / str(PRESETS[preset].embedded)
    meta_file = folder / ENGINE_FILE
    if not meta_file.is_file():
        return [f"model card: missing ({folder} is not installed)"]
    try:
        training = json.loads(meta_file.read_text(encoding="utf-8")).get("training") or {}
    except (OSError, ValueError, AttributeError) as err:
        return [f"model card: unreadable {meta_file} ({type(err).__name__})"]
    out = [f"model card: {folder / 'MODEL_CARD.md'}"]
    for source in training.get("sources") or [training.get("data")]:
        if source:
            out.append(f"data: {source}")
    vae, val = training.get("vae_held_out") or {}, training.get("dit_val_loss") or {}
    if vae or val:
        out.append(
            f"trained: autoencoder {training.get('vae_steps')} steps (held-out PSNR "
            f"{vae.get('psnr', float('nan')):.1f} dB), denoiser {training.get('dit_steps')} "
            f"steps (held-out ε-MSE {val.get('val_loss_initial', float('nan')):.3f} → "
            f"{val.get('val_loss', float('nan')):.3f}) in "
            f"{training.get('minutes', float('nan')):.0f} min on "
            f"{training.get('hardware', 'the CPU')}"
        )
    return out


def format_models_report(preset: str | None = None) -> str:
    """The text of ``histosynth models list`` (``preset=None``) / ``models check PRESET``.

    One block per preset: title, tile size and scale, trained or UNTRAINED, and per
    component where its weights were found or that they are missing. For one preset the
    places tried and how to provide missing weights are listed too.
    """
    names = list(PRESETS) if preset is None else [preset]
    chosen = default_model()
    lines = [
        "Weights are searched offline: explicit path, $HISTOSYNTH_WEIGHTS, the settings file, "
        f"the local Hugging Face cache ({hf_cache_dir()}).",
        f"With no model named (or --model {AUTO_MODEL}): {chosen}"
        + (
            ""
            if chosen == PRODUCTION_PRESET
            else f" ({PRODUCTION_PRESET}'s weights are not "
            "all installed; it is the one to use in production)"
        ),
    ]
    for name in names:
        statuses = describe_preset(name)
        spec = PRESETS[name]
        ready = all(s.found for s in statuses)
        state = "ready" if ready else "MISSING WEIGHTS"
        trained = "trained" if spec.trained else "UNTRAINED (seeded random weights)"
        lines.append("")
        lines.append(f"{name}: {spec.title}")
        lines.append(f"  {spec.tile_size} px tiles at {spec.mpp} µm/px; {trained}; {state}")
        facts = preset_facts(name)
        lines.append(f"  {serves(facts.abilities, facts.trained)}")
        for status in statuses:
            if status.error:
                text = f"ERROR {status.error}"
            elif status.source == "untrained":
                text = "untrained (no weights needed)"
            elif status.path is not None:
                text = f"found ({status.source}) {status.path}"
            else:
                text = "missing"
            lines.append(f"  {status.component:<12} {text}")
            if preset is not None and not status.found and not status.error:
                lines.extend(f"      tried: {t}" for t in status.tried)
                lines.append(f"      to provide: {status.how_to_provide}")
        if spec.embedded is not None:
            lines.extend(f"  {line}" for line in model_card_summary(name))
    if preset is None:
        lines += [
            "",
            "Feature extractors of `histosynth evaluate --features NAME`:",
            "  default      the embedded engine's encoder (offline; not comparable with "
            "published numbers)",
        ]
        for name, spec in FEATURE_EXTRACTORS.items():
            try:
                text = f"found {find_extractor_weights(name)}"
            except EngineError:
                get = f"hf download {spec.repo}" if spec.repo else f"download {spec.source}"
                text = f"missing ({get}, or $HISTOSYNTH_WEIGHTS/{name}/)"
            lines.append(f"  {name:<12} {text}")
    return "\n".join(lines)
