"""The embedded default engine (preset ``default``, histosynth-mini-512): shipped, offline,
chosen when no model is named and PixCell-1024 is not installed, and better than ``tiny``."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.color import rgb2lab

from histosynth.synthesis.engine import load_engine
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.model_report import format_models_report
from histosynth.synthesis.weights import (
    COMPONENTS,
    PRESETS,
    default_model,
    embedded_folder,
    find_component,
)


@pytest.fixture(autouse=True)
def isolated(offline_weights: Path) -> Path:
    """No weights anywhere but the package; the network is closed."""
    return offline_weights


@pytest.fixture(scope="module")
def engine():
    return load_engine("default", device="cpu")


def test_no_model_named_loads_the_embedded_default(engine) -> None:
    auto = load_engine(device="cpu")
    assert auto.preset == "default" and auto.model_id == engine.model_id == "histosynth-mini-512"
    assert auto.trained and auto.tile_size == 512 and auto.mpp == 0.5
    assert set(auto.sources) == set(COMPONENTS)
    assert all(source.startswith("embedded ") for source in auto.sources.values())
    # KV-compressed, persistent in the shipped config (not switched on at load time)
    config = json.loads((embedded_folder("default") / "transformer" / "config.json").read_text())
    assert config["kv_compress_ratio"] == 2 and config["kv_compress_blocks"]
    assert auto.kv_compress == 2
    assert "PixCell-1024" in auto.description and "UNTRAINED" not in auto.description


def test_auto_chooses_pixcell_1024_once_its_weights_are_installed(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert default_model() == "default"
    root = isolated / "weights"
    for component in ("transformer", "vae"):
        folder = root / "pixcell-1024" / component
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"w")
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(root))
    assert default_model() == "default"  # the encoder is still missing
    (root / "pixcell-1024" / "encoder").mkdir()
    (root / "pixcell-1024" / "encoder" / "model.safetensors").write_bytes(b"w")
    assert default_model() == "pixcell-1024"


def test_the_shipped_folder_is_small_and_documented() -> None:
    folder = embedded_folder("default")
    sizes = [f.stat().st_size for f in folder.rglob("*.safetensors")]
    assert len(sizes) == 3 and sum(sizes) <= 25e6
    card = (folder / "MODEL_CARD.md").read_text()
    for needle in ("BSD-3-Clause", "Held out", "PSNR", "steps", "KV-compression"):
        assert needle in card, needle
    meta = json.loads((folder / "histosynth_engine.json").read_text())
    assert meta["preset"] == "default" and meta["trained"] is True
    training = meta["training"]
    assert training["held_out_rows"] == "500-999" and training["sources"]
    assert training["dit_val_loss"]["val_loss"] < training["dit_val_loss"]["val_loss_initial"]
    for component in COMPONENTS:
        found = find_component("default", component)
        assert found.source == "embedded" and found.path == folder / component
    report = format_models_report(None)
    assert "default: histosynth-mini-512" in report
    assert f"model card: {folder / 'MODEL_CARD.md'}" in report
    assert "With no model named (or --model auto): default" in report


def test_default_makes_512_px_tiles_only() -> None:
    with pytest.raises(EngineError, match="default makes 512 px tiles"):
        load_engine("default", device="cpu", tile_size=256)
    assert PRESETS["default"].trained and PRESETS["default"].embedded


def _held_out_tile() -> np.ndarray:
    from histosynth.integration.demo.data import he_source_image

    region = he_source_image()[500:]  # the rows the engine never saw
    padded = cv2.copyMakeBorder(region, 0, 512 - region.shape[0], 0, 0, cv2.BORDER_REFLECT_101)
    return np.ascontiguousarray(padded[:512, 200:712])


def _band_delta_e(a: np.ndarray, b: np.ndarray, band: np.ndarray) -> float:
    diff = rgb2lab(a.astype(np.float64) / 255) - rgb2lab(b.astype(np.float64) / 255)
    return float(np.linalg.norm(diff, axis=-1)[band].mean())


def test_the_trained_default_regenerates_held_out_tissue_better_than_tiny(engine) -> None:
    from histosynth.synthesis.pipelines.inpaint import InpaintPipeline
    from histosynth.synthesis.training.autoencoder import reconstruct

    tile = _held_out_tile()
    recon = reconstruct(engine.vae, tile)
    mse = np.mean((recon.astype(np.float64) - tile) ** 2)
    assert 10 * np.log10(255**2 / mse) > 26.0  # held-out PSNR of the autoencoder, dB

    mask = np.zeros((512, 512), np.uint8)
    cv2.ellipse(mask, (256, 256), (150, 100), 20, 0, 360, 255, -1)
    band = (cv2.dilate(mask, np.ones((31, 31), np.uint8)) > 0) & (
        cv2.erode(mask, np.ones((31, 31), np.uint8)) == 0
    )
    errors = {}
    for name, eng in (("default", engine), ("tiny", load_engine("tiny", device="cpu",
                                                                 tile_size=512))):
        pipe = InpaintPipeline(transformer=eng.transformer, vae=eng.vae,
                               scheduler=eng.make_scheduler(), encoder=eng.encoder)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(tile, mask, strength=0.55, num_inference_steps=6, seeds=[0]).images[0]
        errors[name] = _band_delta_e(out, tile, band)
    assert errors["default"] < 0.6 * errors["tiny"], errors
    assert errors["default"] < 12.0, errors


def test_an_engine_folder_keeps_its_sampler(tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from histosynth.synthesis.engine import ENGINE_FILE, save_engine, tiny_engine

    folder = save_engine(tiny_engine(64, device="cpu"), tmp_path / "engine")
    meta_file = folder / ENGINE_FILE
    meta = json.loads(meta_file.read_text())
    assert meta["sampler"] == "dpm-solver++"
    assert isinstance(load_engine(folder, device="cpu").make_scheduler(),
                      DPMSolverMultistepScheduler)
    meta_file.write_text(json.dumps({**meta, "sampler": "ddim"}))
    engine = load_engine(folder, device="cpu")
    assert engine.sampler == "ddim" and isinstance(engine.make_scheduler(), DDIMScheduler)
    meta_file.write_text(json.dumps({**meta, "sampler": "nope"}))
    with pytest.raises(EngineError, match=r"sampler: .*unknown scheduler") as caught:
        load_engine(folder, device="cpu")
    assert str(meta_file) in str(caught.value)


def test_an_engine_folder_keeps_its_strength_and_its_pipelines_use_it(tmp_path: Path) -> None:
    from histosynth.synthesis import defaults
    from histosynth.synthesis.engine import ENGINE_FILE, save_engine, tiny_engine

    folder = save_engine(tiny_engine(64, device="cpu"), tmp_path / "engine")
    meta_file = folder / ENGINE_FILE
    meta = json.loads(meta_file.read_text())
    assert meta["strength"] == defaults.STRENGTH
    meta_file.write_text(json.dumps({**meta, "strength": 0.3}))
    engine = load_engine(folder, device="cpu")
    pipe = engine.inpaint_pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert engine.strength == pipe.default_strength == 0.3
    tile = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    own = pipe(tile, mask, num_inference_steps=10, seeds=[0])
    assert own.start_step == pipe(tile, mask, strength=0.3, num_inference_steps=10,
                                  seeds=[0]).start_step
    assert own.num_steps == 3
    assert pipe(tile, mask, strength=0.55, num_inference_steps=10, seeds=[0]).num_steps == 5
    for bad in (0, 1.5, "half", True):
        meta_file.write_text(json.dumps({**meta, "strength": bad}))
        with pytest.raises(EngineError, match="strength must be a number") as caught:
            load_engine(folder, device="cpu")
        assert str(meta_file) in str(caught.value)


def test_an_engine_folder_keeps_its_steps_and_guidance_and_its_pipelines_use_them(
    tmp_path: Path,
) -> None:
    """``histosynth_engine.json``'s inpaint / variation steps and CFG scales are the
    pipelines' defaults, read without loading a weight (model_facts), kept by a save, and
    held to their limits."""
    from histosynth.synthesis import defaults
    from histosynth.synthesis.engine import ENGINE_FILE, save_engine, tiny_engine
    from histosynth.synthesis.weights import model_facts

    folder = save_engine(tiny_engine(64, device="cpu"), tmp_path / "engine")
    meta_file = folder / ENGINE_FILE
    meta = json.loads(meta_file.read_text())
    assert (meta["inpaint_steps"], meta["inpaint_guidance"]) == (
        defaults.INPAINT_STEPS, defaults.INPAINT_GUIDANCE)
    own = {"inpaint_steps": 10, "inpaint_guidance": 1.0, "variation_steps": 3,
           "variation_guidance": 1.25}
    meta_file.write_text(json.dumps({**meta, **own}))
    facts = model_facts(folder)
    assert (facts.sampling.steps("inpaint"), facts.sampling.guidance("inpaint")) == (10, 1.0)
    assert (facts.sampling.steps("variation"), facts.sampling.guidance("variation")) == (3, 1.25)
    engine = load_engine(folder, device="cpu")
    pipe = engine.inpaint_pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.default_steps, pipe.default_guidance) == (10, 1.0)
    tile = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    unnamed = pipe(tile, mask, seeds=[0])
    named = pipe(tile, mask, num_inference_steps=10, guidance_scale=1.0, seeds=[0])
    assert unnamed.num_steps == int(10 * engine.strength)
    assert np.array_equal(unnamed.images, named.images)
    assert not np.array_equal(
        unnamed.images, pipe(tile, mask, num_inference_steps=10, guidance_scale=2.5,
                             seeds=[0]).images)
    variation = engine.variation_pipeline()
    assert (variation.default_steps, variation.default_guidance) == (3, 1.25)
    saved = save_engine(engine, tmp_path / "again")
    assert {k: json.loads((saved / ENGINE_FILE).read_text())[k] for k in own} == own
    for key, bad in (("inpaint_steps", 0), ("inpaint_steps", 10**6), ("inpaint_guidance", 0.5),
                     ("variation_guidance", float("inf"))):
        meta_file.write_text(json.dumps({**meta, key: bad}))
        with pytest.raises(EngineError, match=key) as caught:
            model_facts(folder)
        assert str(meta_file) in str(caught.value)


def test_the_embedded_default_engine_regenerates_at_its_own_strength() -> None:
    engine = load_engine("default", device="cpu")
    meta = json.loads((Path(engine.sources["transformer"].split(" ", 1)[1]).parent
                       / "histosynth_engine.json").read_text())
    assert engine.strength == meta["strength"] == 0.35


def test_an_engine_records_the_seam_mode_auto_picks_and_a_save_does_not_inherit_it(
    tmp_path: Path,
) -> None:
    from histosynth.synthesis.engine import ENGINE_FILE, save_engine, tiny_engine
    from histosynth.synthesis.weights import model_facts
    from histosynth.workflows.synthesize.run_checks import resolved_harmonise

    folder = save_engine(tiny_engine(64, device="cpu"), tmp_path / "engine")
    meta_file = folder / ENGINE_FILE
    meta = json.loads(meta_file.read_text())
    assert model_facts(folder).sampling.harmonise is None
    meta_file.write_text(json.dumps({**meta, "harmonise": "multiband"}))
    assert model_facts(folder).sampling.harmonise == "multiband"
    engine = load_engine(folder, device="cpu")
    assert engine.sampling.harmonise == "multiband"
    saved = save_engine(engine, tmp_path / "again")
    assert "harmonise" not in json.loads((saved / ENGINE_FILE).read_text())
    for bad in ("auto", "poisson", 3):
        meta_file.write_text(json.dumps({**meta, "harmonise": bad}))
        with pytest.raises(EngineError, match="harmonise") as caught:
            model_facts(folder)
        assert str(meta_file) in str(caught.value)
    # auto: a steered run (a ControlNet) diffuses; else the record; else by training
    assert resolved_harmonise("auto", True, "multiband") == "multiband"
    assert resolved_harmonise("auto", True, "multiband", steered=True) == "diffusion"
    assert resolved_harmonise("auto", True) == "diffusion"
    assert resolved_harmonise("auto", False) == "multiband"
    assert resolved_harmonise("none", True, "multiband", steered=True) == "none"
