"""Where weights come from: explicit paths, $HISTOSYNTH_WEIGHTS, settings, the HF cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml
from huggingface_hub import scan_cache_dir

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.weights import (
    COMPONENTS,
    PRESETS,
    find_component,
    find_preset,
    hf_cache_dir,
    settings_path,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def isolated(offline_weights: Path) -> Path:
    """Every place the search looks at points into tmp_path; the network is closed."""
    return offline_weights


def diffusers_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"_class_name": "X"}')
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    return path


def hub_cache_repo(
    cache: Path, repo: str, files: dict[str, bytes], *, commit: str = "a" * 40, ref=True
) -> Path:
    """A repository in the real hub-cache layout: blobs/, refs/main, snapshots/<sha>/ links."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snap / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
    return snap


VAE_FILES = {"vae/config.json": b'{"_class_name": "AutoencoderKL"}',
             "vae/diffusion_pytorch_model.safetensors": b"vae weights"}


def test_nothing_found_lists_every_place_and_how_to_provide(isolated: Path) -> None:
    with pytest.raises(EngineError) as info:
        find_component("pixcell-1024", "transformer")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("pixcell-1024/transformer: weights not found")
    assert "$HISTOSYNTH_WEIGHTS" in text
    assert str(settings_path()) in text
    assert str(isolated / "hub") in text
    assert "hf download StonyBrook-CVLab/PixCell-1024 --include 'transformer/*'" in text

    found = find_component("pixcell-1024", "transformer", require=False)
    assert found.path is None and found.source is None and not found.found
    assert len(found.tried) == 3
    assert "hf download" in found.how_to_provide


def test_env_layouts(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = isolated / "weights"
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(root))
    transformer = diffusers_folder(root / "pixcell-1024" / "transformer")
    vae = diffusers_folder(root / "stabilityai" / "stable-diffusion-3.5-large" / "vae")
    (root / "UNI2-h").mkdir(parents=True)
    (root / "UNI2-h" / "pytorch_model.bin").write_bytes(b"uni")
    pix256 = diffusers_folder(root / "PixCell-256" / "transformer")

    got = find_component("pixcell-1024", "transformer")
    assert (got.path, got.source) == (transformer, "env")
    assert find_component("pixcell-256", "vae").path == vae
    assert find_component("pixcell-256", "encoder").path == root / "UNI2-h" / "pytorch_model.bin"
    assert find_component("pixcell-256", "transformer").path == pix256
    # the 1024 preset does not take the 256 transformer
    assert find_component("pixcell-1024", "vae").source == "env"


def test_incomplete_folders_are_skipped_with_a_reason(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = isolated / "weights"
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(root))
    (root / "pixcell-1024" / "transformer").mkdir(parents=True)
    (root / "pixcell-1024" / "transformer" / "config.json").write_text("{}")
    found = find_component("pixcell-1024", "transformer", require=False)
    assert found.path is None
    assert any("no weight file" in t and "pixcell-1024/transformer" in t for t in found.tried)


def test_explicit_path(isolated: Path) -> None:
    folder = diffusers_folder(isolated / "mine" / "transformer")
    got = find_component("pixcell-1024", "transformer", explicit=folder)
    assert (got.path, got.source) == (folder, "explicit")
    # a parent folder that holds the component
    assert find_component("pixcell-1024", "transformer", explicit=folder.parent).path == folder
    # a checkpoint file for the encoder
    ckpt = isolated / "uni.safetensors"
    ckpt.write_bytes(b"x")
    assert find_component("pixcell-1024", "encoder", explicit=ckpt).path == ckpt
    # a wrong explicit path is an error naming it, never a fallback
    with pytest.raises(EngineError, match="nowhere: does not hold pixcell-1024/vae"):
        find_component("pixcell-1024", "vae", explicit=isolated / "nowhere")


def test_settings_file(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = diffusers_folder(isolated / "models" / "vae")
    config = isolated / "config" / "histosynth" / "settings.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({"weights": {"pixcell-256": {"vae": "../../models/vae"}}}))
    assert settings_path() == config
    got = find_component("pixcell-256", "vae")
    assert (got.path.resolve(), got.source) == (folder.resolve(), "settings")
    # HISTOSYNTH_CONFIG wins over the default location
    other = isolated / "other.yaml"
    other.write_text(yaml.safe_dump({"weights": {"pixcell-256": {"vae": str(isolated / "x")}}}))
    monkeypatch.setenv("HISTOSYNTH_CONFIG", str(other))
    with pytest.raises(EngineError) as info:
        find_component("pixcell-256", "vae")
    assert str(info.value).startswith(f"{other}: weights.pixcell-256.vae: ")
    # not YAML / not a mapping
    other.write_text("weights: [unclosed")
    with pytest.raises(EngineError, match="cannot read the settings file"):
        find_component("pixcell-256", "vae")
    other.write_text("- a\n- b\n")
    with pytest.raises(EngineError, match="expected a mapping"):
        find_component("pixcell-256", "vae")


def test_hf_cache_real_layout(isolated: Path) -> None:
    cache = isolated / "hub"
    assert hf_cache_dir() == cache
    snap = hub_cache_repo(cache, "stabilityai/stable-diffusion-3.5-large", VAE_FILES)
    uni = hub_cache_repo(cache, "MahmoodLab/UNI2-h", {"config.json": b"{}",
                                                     "pytorch_model.bin": b"uni"})
    # huggingface_hub itself reads our fake cache as a valid one
    info = scan_cache_dir(cache)
    assert {r.repo_id for r in info.repos} == {"stabilityai/stable-diffusion-3.5-large",
                                                "MahmoodLab/UNI2-h"}

    got = find_component("pixcell-1024", "vae")
    assert (got.path, got.source) == (snap / "vae", "hf-cache")
    assert (got.path / "config.json").read_bytes() == VAE_FILES["vae/config.json"]
    enc = find_component("pixcell-256", "encoder")
    assert enc.path == uni / "pytorch_model.bin" and enc.path.read_bytes() == b"uni"


def test_hf_cache_without_ref_uses_a_cached_snapshot(isolated: Path) -> None:
    snap = hub_cache_repo(isolated / "hub", "stabilityai/stable-diffusion-3.5-large",
                          VAE_FILES, ref=False)
    assert find_component("pixcell-1024", "vae").path == snap / "vae"


def test_hf_home_is_used_when_hub_cache_is_not_set(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(isolated / "hfhome"))
    snap = hub_cache_repo(isolated / "hfhome" / "hub", "StonyBrook-CVLab/PixCell-256",
                          {"transformer/config.json": b"{}",
                           "transformer/diffusion_pytorch_model.safetensors": b"w"})
    assert find_component("pixcell-256", "transformer").path == snap / "transformer"


def test_search_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = hub_cache_repo(isolated / "hub", "stabilityai/stable-diffusion-3.5-large", VAE_FILES)
    settings_vae = diffusers_folder(isolated / "s" / "vae")
    monkeypatch.setenv("HISTOSYNTH_CONFIG", str(isolated / "s.yaml"))
    (isolated / "s.yaml").write_text(
        yaml.safe_dump({"weights": {"pixcell-1024": {"vae": str(settings_vae)}}})
    )
    assert find_component("pixcell-1024", "vae").source == "settings"
    env_vae = diffusers_folder(isolated / "w" / "pixcell-1024" / "vae")
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(isolated / "w"))
    assert find_component("pixcell-1024", "vae").path == env_vae
    explicit = diffusers_folder(isolated / "e" / "vae")
    got = find_component("pixcell-1024", "vae", explicit=explicit)
    assert (got.path, got.source) == (explicit, "explicit")
    # without the others, the cache answers
    monkeypatch.delenv("HISTOSYNTH_WEIGHTS")
    monkeypatch.delenv("HISTOSYNTH_CONFIG")
    assert find_component("pixcell-1024", "vae").path == snap / "vae"


def test_find_preset_with_a_partial_folder(isolated: Path) -> None:
    snap = hub_cache_repo(isolated / "hub", "stabilityai/stable-diffusion-3.5-large", VAE_FILES)
    mine = isolated / "finetuned"
    transformer = diffusers_folder(mine / "transformer")
    found = find_preset("pixcell-1024", explicit=mine, require=False)
    assert set(found) == set(COMPONENTS)
    assert (found["transformer"].path, found["transformer"].source) == (transformer, "explicit")
    assert (found["vae"].path, found["vae"].source) == (snap / "vae", "hf-cache")
    assert found["encoder"].path is None
    with pytest.raises(EngineError, match="pixcell-1024/encoder: weights not found"):
        find_preset("pixcell-1024", explicit=mine)


def test_tiny_is_untrained_and_unknown_names_fail() -> None:
    for component in COMPONENTS:
        got = find_component("tiny", component)
        assert got.path is None and got.untrained and got.source == "untrained"
    assert "UNTRAINED" in PRESETS["tiny"].title and not PRESETS["tiny"].trained
    with pytest.raises(EngineError, match="unknown preset; expected one of default, pixcell-1024"):
        find_component("pixcell-2048", "vae")
    with pytest.raises(EngineError, match="pixcell-1024/unet: unknown component"):
        find_component("pixcell-1024", "unet")


def test_presets_agree_with_the_plugin_manifest() -> None:
    manifest = yaml.safe_load((ROOT / "plugin.yaml").read_text())
    declared = {p["id"]: p for p in manifest["presets"]}
    assert set(declared) == set(PRESETS)
    for name, preset in PRESETS.items():
        entry = declared[name]
        assert (entry["tile_size"], entry["mpp"], entry["trained"]) == (
            preset.tile_size, preset.mpp, preset.trained)
        components = {
            key: {"repo": spec.repo, **({"subfolder": spec.subfolder} if spec.subfolder else {})}
            for key, spec in preset.components.items()
        }
        assert (entry.get("components") or {}) == components
