"""scripts/train_default_engine.py --quick trains every stage and writes a loadable engine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_default_engine.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_default_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_default_engine"] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_an_engine_that_inpaints(script, tmp_path):
    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.pipelines.inpaint import InpaintPipeline

    out = tmp_path / "engine"
    report = script.main(["--out", str(out), "--quick"])
    for name in ("transformer", "vae", "encoder", "scheduler", "histosynth_engine.json",
                 "MODEL_CARD.md", "training.json", "preview.jpg", "loss_curves.png"):
        assert (out / name).exists(), name
    assert report["vae"]["steps"] == 4 and report["dit"]["steps"] == 4
    assert report["dit"]["validation"] and "val_loss" in report["dit"]["metrics"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "BSD-3-Clause" in card and "PSNR" in card
    meta = json.loads((out / "histosynth_engine.json").read_text())
    assert meta["trained"] is True and meta["model_id"].startswith("histosynth-mini")

    engine = load_engine(out, device="cpu")
    assert engine.trained and "UNTRAINED" not in engine.description
    assert engine.tile_size == 64 and engine.codec.downsample == 4
    assert engine.kv_compress == 2
    pipe = InpaintPipeline(transformer=engine.transformer, vae=engine.vae,
                           scheduler=engine.make_scheduler(), encoder=engine.encoder)
    pipe.set_progress_bar_config(disable=True)
    tile = np.full((64, 64, 3), 200, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 20:44] = 255
    result = pipe(tile, mask, num_inference_steps=2, seeds=[0])
    assert result.images.shape == (1, 64, 64, 3) and result.images.dtype == np.uint8


def test_existing_output_is_refused(script, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(SystemExit):
        script.main(["--out", str(out), "--quick"])


def test_quick_engine_declares_seams_only_and_its_generator_generates(script, tmp_path):
    """The seam denoiser learns timesteps < 560 and says so; --generator-from trains a
    companion over all 1000, which an engine folder carries in generator/ and uses for
    generation from noise (and only then)."""
    import shutil

    from histosynth.synthesis.engine import load_engine
    from histosynth.synthesis.errors import EngineError

    out = tmp_path / "engine"
    script.main(["--out", str(out), "--quick", "--no-preview"])
    engine = load_engine(out, device="cpu")
    assert engine.abilities.timesteps == (0, 560) and not engine.abilities.generates
    assert engine.generator is None
    with pytest.raises(EngineError, match="generates no tile from noise"):
        engine.variation_pipeline()

    record = script.main(["--generator-from", str(out), "--out", str(tmp_path / "gen"),
                          "--quick"])
    assert record["steps"] == 4 and record["timestep_range"] == [0, 1000]
    assert (tmp_path / "gen" / "generator" / "config.json").is_file()
    assert json.loads((tmp_path / "gen" / "generator.json").read_text())["base"]
    shutil.copytree(tmp_path / "gen" / "generator", out / "generator")
    meta = json.loads((out / "histosynth_engine.json").read_text())
    meta["abilities"]["generates"] = True
    (out / "histosynth_engine.json").write_text(json.dumps(meta))
    engine = load_engine(out, device="cpu")
    assert engine.generator is not None
    pipe = engine.variation_pipeline()
    assert pipe.transformer is engine.generator  # generation uses the companion
    assert engine.inpaint_pipeline().transformer is engine.transformer  # seams do not
    pipe.set_progress_bar_config(disable=True)
    tiles = pipe(np.full((64, 64, 3), 200, np.uint8), seeds=[0], num_inference_steps=2)
    assert tiles.images.shape == (1, 64, 64, 3)
    # saved and loaded again, the generator travels with the engine
    again = load_engine(engine.save_pretrained(tmp_path / "saved"), device="cpu")
    assert again.generator is not None and again.abilities.generates

    config = json.loads((out / "generator" / "config.json").read_text())
    config["caption_num_tokens"] = 64
    (out / "generator" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError):
        load_engine(out, device="cpu")
