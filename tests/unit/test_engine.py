"""load_engine: presets, local folders, the UNTRAINED tiny engine, options, model reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from histosynth.synthesis.engine import (
    ENGINE_FILE,
    Engine,
    load_engine,
    make_scheduler,
    resolve_device,
    resolve_dtype,
    save_engine,
    set_attention,
    tiny_engine,
)
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.model_report import check_preset, describe_preset, format_models_report
from histosynth.synthesis.models.encoders import TinyEncoder
from histosynth.synthesis.models.kv_compression import KVCompressionAttnProcessor

TILE = 256


@pytest.fixture(autouse=True)
def isolated(offline_weights: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every place the weight search looks at is an empty folder; the network is closed."""
    for name in ("weights", "hub", "config"):
        (offline_weights / name).mkdir()
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(offline_weights / "weights"))
    return offline_weights


def reference() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)


def sample(engine: Engine, steps: int = 2) -> torch.Tensor:
    pipe = engine.variation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe(reference(), seeds=[11], num_inference_steps=steps, output_type="latent").images


# --------------------------------------------------------------------------- tiny


def test_tiny_engine_is_labelled_untrained(untrained_engine: Engine) -> None:
    assert untrained_engine.preset == "tiny" and untrained_engine.trained is False
    assert "UNTRAINED" in untrained_engine.description
    assert (untrained_engine.tile_size, untrained_engine.mpp) == (TILE, 0.5)
    assert (
        untrained_engine.device == torch.device("cpu") and untrained_engine.dtype == torch.float32
    )
    assert untrained_engine.model_id == "tiny-untrained-seed0-256px"
    assert all(src.startswith("untrained") for src in untrained_engine.sources.values())
    assert (
        untrained_engine.attention == "sdpa"
        and untrained_engine.kv_compress is None
        and not untrained_engine.compiled
    )
    cfg = untrained_engine.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (2, 2, 32)
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size) == (16, 32, TILE // 8)
    assert (cfg.caption_channels, cfg.caption_num_tokens) == (32, 16)
    assert (untrained_engine.codec.latent_channels, untrained_engine.codec.downsample) == (16, 8)
    assert isinstance(untrained_engine.encoder, TinyEncoder)
    assert untrained_engine.encoder.encode(reference()).shape == (
        1,
        16,
        32,
    )  # 4 × 4 grid of 64² crops
    assert untrained_engine.scheduler_config["beta_schedule"] == "linear"


def test_tiny_weights_are_seeded_and_leave_the_global_rng_alone(untrained_engine: Engine) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_engine("tiny", device="cpu")
    assert torch.equal(torch.rand(3), expected)
    for (key, a), b in zip(
        untrained_engine.transformer.state_dict().items(),
        again.transformer.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), key
    for a, b in zip(
        untrained_engine.vae.state_dict().values(), again.vae.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    other = tiny_engine(seed=1)
    assert not torch.equal(
        other.transformer.proj_out.weight, untrained_engine.transformer.proj_out.weight
    )


def test_tiny_engine_takes_1024_px_tiles_with_the_same_16_rows() -> None:
    big = load_engine("tiny", device="cpu", tile_size=1024)
    assert big.tile_size == 1024 and big.transformer.config.sample_size == 128
    assert big.encoder.crop == 256 and big.encoder.rows(1024, 1024) == 16
    assert big.transformer.config.interpolation_scale == 2  # as PixCell-1024's
    assert "UNTRAINED" in big.description
    with pytest.raises(EngineError, match="multiple of 64"):
        load_engine("tiny", tile_size=1000)


# --------------------------------------------------------------------------- presets


def test_missing_weights_are_an_error_listing_every_place(isolated: Path) -> None:
    with pytest.raises(EngineError) as info:
        load_engine("pixcell-1024", device="cpu")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("pixcell-1024/transformer: weights not found")
    assert f"$HISTOSYNTH_WEIGHTS {isolated / 'weights'}" in text
    assert "settings" in text and str(isolated / "config") in text
    assert f"hf-cache {isolated / 'hub'}" in text
    assert "hf download StonyBrook-CVLab/PixCell-1024" in text


def test_missing_vae_is_reported_even_when_the_transformer_is_there(
    isolated: Path, untrained_engine: Engine
) -> None:
    # a real PixCell-256-shaped transformer folder in $HISTOSYNTH_WEIGHTS, nothing else
    config = {**untrained_engine.transformer.config, "caption_num_tokens": 1}
    model = type(untrained_engine.transformer).from_config(config)
    model.save_pretrained(isolated / "weights" / "pixcell-256" / "transformer")
    with pytest.raises(EngineError, match=r"pixcell-256/vae: weights not found.*hf download"):
        load_engine("pixcell-256", device="cpu")
    statuses = {s.component: s for s in describe_preset("pixcell-256")}
    assert statuses["transformer"].found and statuses["transformer"].source == "env"
    assert not statuses["vae"].found and statuses["vae"].tried
    assert "stable-diffusion-3.5-large" in statuses["vae"].how_to_provide
    assert check_preset("pixcell-256") is False


def test_models_report(isolated: Path) -> None:
    everything = format_models_report()
    for name in ("pixcell-1024", "pixcell-256", "tiny"):
        assert f"\n{name}: " in everything
    assert "UNTRAINED" in everything and "MISSING WEIGHTS" in everything
    one = format_models_report("pixcell-1024")
    assert "tried: $HISTOSYNTH_WEIGHTS" in one and "to provide:" in one
    assert "MahmoodLab/UNI2-h" in one
    assert check_preset("tiny") is True
    assert all(s.source == "untrained" for s in describe_preset("tiny"))
    assert "UNTRAINED" in format_models_report("tiny")
    with pytest.raises(EngineError, match="unknown preset"):
        check_preset("pixcell-2048")


def test_found_components_make_the_preset_ready(isolated: Path) -> None:
    root = isolated / "weights" / "pixcell-256"
    for component in ("transformer", "vae"):
        (root / component).mkdir(parents=True)
        (root / component / "config.json").write_text("{}")
        (root / component / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (root / "encoder").mkdir()
    (root / "encoder" / "model.safetensors").write_bytes(b"x")
    assert check_preset("pixcell-256") is True
    assert "ready" in format_models_report("pixcell-256")


def test_bad_names_and_combinations(untrained_engine: Engine, isolated: Path) -> None:
    with pytest.raises(EngineError, match="unknown preset and no such folder"):
        load_engine("pixcell-2048")
    with pytest.raises(EngineError, match="1024 px tiles"):
        load_engine("pixcell-1024", tile_size=512)
    with pytest.raises(EngineError, match="no weights"):
        load_engine("tiny", weights=isolated)
    with pytest.raises(EngineError, match="transformer/"):
        load_engine(isolated / "weights")


# --------------------------------------------------------------------------- folders


def test_saved_tiny_folder_loads_back_identical_and_still_untrained(
    untrained_engine: Engine, tmp_path: Path
) -> None:
    folder = save_engine(untrained_engine, tmp_path / "engine")
    assert {p.name for p in folder.iterdir()} == {
        "transformer",
        "vae",
        "encoder",
        "scheduler",
        ENGINE_FILE,
        "model_index.json",
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    loaded = load_engine(folder, device="cpu")
    assert loaded.trained is False and "UNTRAINED" in loaded.description
    assert loaded.model_id == untrained_engine.model_id and loaded.preset == "tiny"
    assert loaded.tile_size == TILE and isinstance(loaded.encoder, TinyEncoder)
    assert loaded.sources["transformer"] == f"explicit {folder / 'transformer'}"
    assert torch.equal(sample(loaded), sample(untrained_engine))
    with pytest.raises(EngineError, match="not an empty folder"):
        save_engine(untrained_engine, folder)


def test_diffusers_style_folder_without_metadata(untrained_engine: Engine, tmp_path: Path) -> None:
    # what a user assembles by hand: save_pretrained folders and an encoder folder
    folder = tmp_path / "mine"
    untrained_engine.transformer.save_pretrained(folder / "transformer")
    untrained_engine.vae.save_pretrained(folder / "vae")
    encoder = folder / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(
        json.dumps({"_class_name": "TinyEncoder", "dim": 32, "seed": 0, "crop": 64})
    )
    from safetensors.torch import save_file

    save_file(dict(untrained_engine.encoder.state_dict()), str(encoder / "model.safetensors"))
    loaded = load_engine(folder, device="cpu")
    assert loaded.model_id == f"local:{folder.resolve()}"
    assert loaded.tile_size == TILE and loaded.preset == "pixcell-1024"  # 16 rows
    assert torch.equal(sample(loaded), sample(untrained_engine))


def test_bare_transformer_folder_takes_the_rest_from_the_preset_search(
    untrained_engine: Engine, tmp_path: Path
) -> None:
    untrained_engine.transformer.save_pretrained(tmp_path / "transformer-only")
    with pytest.raises(EngineError, match=r"pixcell-1024/vae: weights not found"):
        load_engine(tmp_path / "transformer-only", device="cpu")


def test_a_folder_that_is_not_a_pixcell_transformer(
    untrained_engine: Engine, tmp_path: Path
) -> None:
    untrained_engine.vae.save_pretrained(tmp_path / "x" / "transformer")
    (tmp_path / "x" / "vae").mkdir()
    with pytest.raises(EngineError, match="expected _class_name PixCellTransformer2DModel"):
        load_engine(tmp_path / "x", device="cpu")


# --------------------------------------------------------------------------- options


def test_kv_compress_flag(untrained_engine: Engine) -> None:
    engine = load_engine("tiny", device="cpu", kv_compress=2)
    processors = [b.attn1.processor for b in engine.transformer.transformer_blocks]
    assert not isinstance(processors[0], KVCompressionAttnProcessor)  # second half only
    assert isinstance(processors[1], KVCompressionAttnProcessor) and processors[1].ratio == 2
    assert engine.kv_compress == 2 and "KV-compression R=2" in engine.description
    for block in engine.transformer.transformer_blocks:  # cross-attention never compressed
        assert isinstance(block.attn2.processor, AttnProcessor2_0)
    compressed = sample(engine)
    assert torch.isfinite(compressed).all()
    assert not torch.equal(compressed, sample(untrained_engine))
    off = load_engine("tiny", device="cpu", kv_compress=1)
    assert off.kv_compress is None
    assert torch.equal(sample(off), sample(untrained_engine))  # off is exactly the plain model
    with pytest.raises(EngineError, match="KV-compression ratio"):
        load_engine("tiny", kv_compress=0)


def test_attention_choice() -> None:
    engine = load_engine("tiny", device="cpu", kv_compress=2, attention="sdpa")
    kv = engine.transformer.transformer_blocks[1].attn1.processor
    assert set_attention(engine, "sdpa") == "sdpa"
    assert engine.transformer.transformer_blocks[1].attn1.processor is kv  # kept
    assert isinstance(engine.transformer.transformer_blocks[0].attn1.processor, AttnProcessor2_0)
    assert set_attention(engine, "auto") in ("sdpa", "xformers")
    if engine.device.type == "cpu":
        assert set_attention(engine, "auto") == "sdpa"
        with pytest.raises(EngineError, match="xFormers"):
            load_engine("tiny", device="cpu", attention="xformers")
    with pytest.raises(EngineError, match="attention"):
        load_engine("tiny", device="cpu", attention="flash")


def test_compile_flag_compiles_the_transformer_in_place() -> None:
    engine = load_engine("tiny", device="cpu", compile=True)
    assert engine.compiled and "compiled" in engine.description
    assert engine.transformer._compiled_call_impl is not None  # nn.Module.compile, lazy
    assert "proj_out.weight" in engine.transformer.state_dict()  # same module, same keys


def test_device_and_dtype_defaults() -> None:
    cpu = torch.device("cpu")
    expected = torch.device("cuda") if torch.cuda.is_available() else cpu
    assert resolve_device(None) == expected
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(EngineError, match="unknown dtype"):
        resolve_dtype("int8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA device"):
            load_engine("tiny", device="cuda")
    half = load_engine("tiny", device="cpu", dtype="bfloat16")
    assert half.transformer.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert half.encoder.dtype == torch.bfloat16


def test_make_scheduler_names_and_config() -> None:
    dpm = make_scheduler()
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert (dpm.config.beta_start, dpm.config.beta_end) == (0.0001, 0.02)
    assert isinstance(make_scheduler("DPM++"), DPMSolverMultistepScheduler)
    # one config (here a DPM-Solver one, as PixCell's scheduler/ folder holds) for all
    ddpm = make_scheduler("ddpm", dict(dpm.config))
    assert isinstance(ddpm, DDPMScheduler) and ddpm.config.beta_schedule == "linear"
    assert isinstance(make_scheduler("ddim"), DDIMScheduler)
    with pytest.raises(EngineError, match="unknown scheduler"):
        make_scheduler("heun")


def test_importing_the_package_is_cheap() -> None:
    code = (
        "import sys, histosynth.synthesis as s\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "import histosynth.synthesis.models, histosynth.synthesis.pipelines\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "assert 'load_engine' in dir(s) and 'VariationPipeline' in dir(sys.modules[\n"
        "    'histosynth.synthesis.pipelines'])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    import histosynth.synthesis as synthesis

    assert synthesis.load_engine is load_engine
