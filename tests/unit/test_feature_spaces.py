"""The feature spaces of ``histosynth evaluate``: the real architectures' shapes (built on
the meta device, no memory), tiny random models with the same code path, weights loaded
from a file offline, and one clear message when they are missing."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.metrics.features import ENCODERS, load_feature_space

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.mark.parametrize(("name", "dim"), [("uni2-h", 1536), ("virchow2", 2560),
                                           ("h-optimus-1", 1536)])
def test_the_real_architectures_have_the_published_dimensions(name, dim):
    spec = ENCODERS[name]()
    with torch.device("meta"):
        model = timm.create_model(spec.architecture, pretrained=False, **spec.kwargs)
        out = model(torch.zeros(1, 3, 224, 224, device="meta"))
    if spec.pooling == "cls+mean":
        assert out.shape[1] == spec.prefix_tokens + 256  # class and register tokens, 16² patches
        assert 2 * out.shape[-1] == dim
    else:
        assert out.shape == (1, dim)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_a_tiny_model_embeds_tiles_and_is_not_comparable(name):
    space = load_feature_space(name, weights="random", **TINY)
    tiles = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    features = space(tiles)
    doubled = ENCODERS[name]().pooling == "cls+mean"  # Virchow-2: class token + patch mean
    expected = TINY["embed_dim"] * (2 if doubled else 1)
    assert features.shape == (3, expected) == (3, space.dim)
    assert np.isfinite(features).all() and not space.comparable
    assert len(space.weights_id) == 64
    # tiles of other sizes are resized to the model's input: same dimension
    assert space(tiles[:, :64, :64]).shape == (3, expected)


def test_weights_load_from_a_file_offline_and_give_the_same_features(tmp_path):
    from safetensors.torch import save_file

    spec = ENCODERS["h-optimus-1"]()
    torch.manual_seed(0)
    model = timm.create_model(spec.architecture, pretrained=False, **{**spec.kwargs, **TINY})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    from_file = load_feature_space("h-optimus-1", weights=tmp_path, **TINY)
    random = load_feature_space("h-optimus-1", weights="random", **TINY)
    tiles = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(from_file(tiles), random(tiles), rtol=1e-5, atol=1e-6)
    assert from_file.weights_id == random.weights_id
    assert str(tmp_path) in from_file.description


def test_missing_weights_are_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HISTOSYNTH_CONFIG", str(tmp_path / "settings.yaml"))
    with pytest.raises(EngineError) as err:
        load_feature_space("virchow2")
    message = str(err.value)
    assert "paige-ai/Virchow2" in message and "$HISTOSYNTH_WEIGHTS/virchow2/" in message
    assert str(tmp_path / "weights" / "virchow2") in message and "\n" not in message
    with pytest.raises(EngineError, match="does not hold the uni2-h weights"):
        load_feature_space("uni2-h", weights=tmp_path / "nothing-here")


def test_evaluate_with_a_pathology_encoder_at_tiny_size(tmp_path, monkeypatch):
    """The whole evaluate path in the uni2-h space (tiny random model)."""
    import importlib

    from histosynth.evaluate import evaluate
    from histosynth.synthesis.metrics import features as module

    spec = importlib.util.spec_from_file_location(
        "test_evaluate_cli", __file__.replace("unit/test_feature_spaces.py",
                                              "e2e/test_evaluate_cli.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path / "cache"))
    real, run = tmp_path / "real", tmp_path / "run"
    helpers._write(real, "extracted", 8, 0)
    helpers._write(run, "inpainting", 6, 5000, refs=True)
    original = module.FEATURE_SPACES["uni2-h"]
    monkeypatch.setitem(module.FEATURE_SPACES, "uni2-h",
                        lambda device, **_: original(device, weights="random", **TINY))
    result = evaluate(run, real, features="uni2-h")
    rows = {r.metric: r.value for r in result.rows}
    assert rows["FID"] is not None and rows["cosine to the source tile"] is not None
    assert result.space == "uni2-h"
