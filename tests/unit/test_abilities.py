"""Engines declare what they serve (timesteps, generation from noise, tile sizes); every
mode is checked against that before any slide or weight is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from histosynth.synthesis.abilities import EngineAbilities, refusal, serves
from histosynth.synthesis.engine import load_engine
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.weights import EMBEDDED_ROOT, ENGINE_FILE, model_facts, preset_facts

SEAMS_ONLY = EngineAbilities(timesteps=(0, 560), generates=False, tile_sizes=(512,))


def test_the_embedded_default_declares_seams_only_in_its_own_file() -> None:
    meta = json.loads((EMBEDDED_ROOT / "histosynth_mini_512" / ENGINE_FILE).read_text())
    assert meta["abilities"] == {"timesteps": [0, 560], "generates": False, "tile_sizes": [512]}
    facts = preset_facts("default")
    assert facts.abilities == SEAMS_ONLY and facts.trained
    assert facts.abilities.max_strength == pytest.approx(0.56)
    # its own default τ lies inside what it serves
    assert meta["strength"] <= facts.abilities.max_strength


def test_pixcell_and_tiny_presets_serve_every_mode() -> None:
    for name, size in (("pixcell-1024", 1024), ("pixcell-256", 256)):
        abilities = preset_facts(name).abilities
        assert abilities.generates and abilities.timesteps == (0, 1000)
        assert abilities.tile_sizes == (size,)
        assert refusal(name, abilities, "variation") is None
    tiny = preset_facts("tiny")
    assert tiny.abilities.generates and not tiny.trained and tiny.abilities.tile_sizes == ()


@pytest.mark.parametrize(
    ("mode", "strength", "tile", "words"),
    [
        ("variation", None, None, ["'default'", "--mode variation", "0–559", "--mode inpaint"]),
        ("synthetic background", None, None, ["synthetic backgrounds", "--background real"]),
        ("inpaint", 0.8, None, ["--strength up to 0.56", "not 0.8", "multiband"]),
        ("inpaint", 0.35, 1024, ["512 px tiles", "not 1024 px", "--tile-size 512"]),
    ],
)
def test_each_refusal_is_one_line_naming_engine_mode_and_what_to_use(
    mode, strength, tile, words
) -> None:
    line = refusal("default", SEAMS_ONLY, mode, strength=strength, tile_size=tile)
    assert line is not None and "\n" not in line
    for word in words:
        assert word in line


def test_what_it_serves_is_served() -> None:
    assert refusal("default", SEAMS_ONLY, "inpaint", strength=0.56, tile_size=512) is None
    assert refusal("default", SEAMS_ONLY, "inpaint") is None
    assert "refuses variation" in serves(SEAMS_ONLY)
    assert "variation" in serves(EngineAbilities()) and "refuses" not in serves(EngineAbilities())


@given(
    low=st.integers(-5, 1005),
    high=st.integers(-5, 1005),
    generates=st.one_of(st.booleans(), st.none(), st.integers(), st.text(max_size=3)),
    sizes=st.one_of(st.lists(st.integers(-2, 2048), max_size=3), st.text(max_size=3)),
)
def test_abilities_parser_accepts_exactly_the_valid_objects(low, high, generates, sizes) -> None:
    data = {"timesteps": [low, high], "tile_sizes": sizes}
    if generates is not None:
        data["generates"] = generates
    valid = (
        0 <= low < high <= 1000
        and (generates is None or isinstance(generates, bool))
        and isinstance(sizes, list)
        and all(s > 0 for s in sizes)
    )
    if not valid:
        with pytest.raises(EngineError, match="abilities"):
            EngineAbilities.from_json(data, where="x.json")
        return
    parsed = EngineAbilities.from_json(data, where="x.json")
    assert parsed.timesteps == (low, high) and parsed.tile_sizes == tuple(sizes)
    assert parsed.generates == (high == 1000 if generates is None else generates)
    assert EngineAbilities.from_json(parsed.to_json()) == parsed  # round trip


def test_an_older_folder_without_abilities_serves_everything_at_its_size() -> None:
    assert EngineAbilities.from_json(None, tile_size=256) == EngineAbilities(tile_sizes=(256,))
    with pytest.raises(EngineError, match="abilities must be a JSON object"):
        EngineAbilities.from_json([0, 560])


def test_the_default_engine_refuses_generation_in_python_too() -> None:
    engine = load_engine("default", device="cpu")
    assert engine.abilities == SEAMS_ONLY
    with pytest.raises(EngineError, match="cannot make --mode variation"):
        engine.variation_pipeline()
    from histosynth.synthesis.pipelines.background import generate_background

    condition = np.full((512, 512, 3), 200, np.uint8)
    with pytest.raises(EngineError, match="cannot make synthetic backgrounds"):
        generate_background(engine, condition, seeds=[0])
    pipe = engine.inpaint_pipeline()
    assert pipe.max_strength == pytest.approx(0.56)
    composite = np.full((512, 512, 3), 200, np.uint8)
    mask = np.zeros((512, 512), np.uint8)
    mask[200:300, 200:300] = 255
    with pytest.raises(EngineError, match=r"up to 0\.56"):
        pipe(composite, mask, strength=0.9, num_inference_steps=2, seeds=[0])


def test_a_saved_folder_keeps_its_abilities_and_model_facts_read_them_without_weights(
    tmp_path: Path, untrained_engine
) -> None:
    folder = untrained_engine.save_pretrained(tmp_path / "saved")
    meta = json.loads((folder / ENGINE_FILE).read_text())
    assert meta["abilities"] == EngineAbilities().to_json()
    # declare it seams-only and remove every weight: the facts still come from the file
    meta["abilities"] = {"timesteps": [0, 300], "generates": False, "tile_sizes": [256]}
    (folder / ENGINE_FILE).write_text(json.dumps(meta))
    loaded = load_engine(folder, device="cpu")
    assert loaded.abilities.timesteps == (0, 300) and not loaded.abilities.generates
    shutil.rmtree(folder / "transformer")
    (folder / "transformer").mkdir()
    facts = model_facts(folder)
    assert facts.abilities == loaded.abilities and not facts.trained


def test_an_engine_saves_and_loads_in_diffusers_layout(untrained_engine, tmp_path):
    """save_pretrained writes model_index.json naming each component's class beside one
    folder per component; from_pretrained loads it, and an older folder without the
    index still loads; an index naming a folder that is not there is one line."""
    from histosynth.synthesis.engine import Engine
    from histosynth.synthesis.errors import EngineError

    folder = untrained_engine.save_pretrained(tmp_path / "saved")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"][1] == "PixCellTransformer2DModel"
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    for name in ("transformer", "vae", "encoder", "scheduler"):
        assert (folder / name).is_dir() and name in index
    again = Engine.from_pretrained(folder, device="cpu")
    assert again.tile_size == untrained_engine.tile_size and not again.trained
    older = Path(shutil.copytree(folder, tmp_path / "older"))
    (older / "model_index.json").unlink()
    assert Engine.from_pretrained(older, device="cpu").tile_size == untrained_engine.tile_size
    index["controlnet"] = ["histosynth", "Nothing"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(EngineError, match="names the component 'controlnet'"):
        Engine.from_pretrained(folder, device="cpu")
