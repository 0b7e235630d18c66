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

    from histosynth.synthesis.metrics import features as module
    from histosynth.workflows.evaluate import evaluate

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


# ----------------------------------------------------------------------------- Inception, CLIP


def _random_inception_file(path) -> None:
    """FID Inception-v3's parameter names and shapes (torchvision's network with the
    TensorFlow graph's 1008 classes) with seeded random values: the network torch-fidelity
    builds loads it as it loads the published file."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    state = net.state_dict()
    state["fc.weight"] = torch.randn(1008, 2048) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, path)


def test_the_inception_space_runs_fids_network_from_a_weights_file(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    file = tmp_path / "random-inception.pth"
    _random_inception_file(file)
    space = load_feature_space("inception", weights=file)
    tiles = np.random.default_rng(2).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    features = space(tiles)
    assert features.shape == (3, 2048) == (3, space.dim) and np.isfinite(features).all()
    assert not space.comparable  # not the published file
    # the same features as torch-fidelity's own extractor on the same uint8 input
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(file))
    (expected,) = reference(torch.as_tensor(tiles).permute(0, 3, 1, 2).contiguous())
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-5)
    # found offline in $HISTOSYNTH_WEIGHTS/inception/ under the published file name
    from histosynth.synthesis.weights import INCEPTION_FILES

    (tmp_path / "w" / "inception").mkdir(parents=True)
    file.rename(tmp_path / "w" / "inception" / INCEPTION_FILES[0])
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(tmp_path / "w"))
    found = load_feature_space("inception")
    assert found.weights_id == space.weights_id and not found.comparable  # hash differs


def test_a_file_that_is_not_inception_is_one_clear_error(tmp_path):
    pytest.importorskip("torch_fidelity")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(EngineError, match="not the FID Inception-v3 weights") as err:
        load_feature_space("inception", weights=bad)
    assert str(bad) in str(err.value)


def _tiny_clip_folder(path, image_size: int = 32) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=image_size, patch_size=8,
                              projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(path)


@pytest.mark.parametrize(("name", "normalised"), [("clip", False), ("clip-l14-336", True)])
def test_the_clip_spaces_embed_with_a_local_clip_folder(tmp_path, name, normalised):
    from transformers import CLIPVisionModelWithProjection

    _tiny_clip_folder(tmp_path / "clip")
    space = load_feature_space(name, weights=tmp_path / "clip")
    tiles = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    features = space(tiles)
    assert features.shape == (2, 16) == (2, space.dim) and not space.comparable
    norms = np.linalg.norm(features, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalised
    # what transformers' own model gives on CLIP's normalisation of the resized tiles
    model = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip").eval()
    x = torch.as_tensor(tiles).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=(x.clamp(0, 1) - mean) / std).image_embeds
    if normalised:
        expected = torch.nn.functional.normalize(expected, dim=-1)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_missing_inception_and_clip_weights_name_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HISTOSYNTH_CONFIG", str(tmp_path / "settings.yaml"))
    pytest.importorskip("torch_fidelity")
    with pytest.raises(EngineError) as err:
        load_feature_space("inception")
    message = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and "\n" not in message
    with pytest.raises(EngineError) as err:
        load_feature_space("clip")
    assert "hf download openai/clip-vit-base-patch32" in str(err.value)
    with pytest.raises(EngineError, match="cannot load a CLIP vision model"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        (tmp_path / "empty" / "model.safetensors").write_bytes(b"x")
        load_feature_space("clip", weights=tmp_path / "empty")


class _Planted:
    """A pickle with a side effect: unpickling it writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("place", ["explicit", "env", "settings", "torch hub"])
def test_a_planted_pickle_never_runs_wherever_the_weights_are_searched(
    place, tmp_path, monkeypatch
):
    """evaluate --features inception opens its weights with weights_only=True (torch-fidelity
    itself unpickles whatever path it is given): a pickle placed where the weights are
    searched is refused with one line, and its code never runs."""
    pytest.importorskip("torch_fidelity")
    import pickle

    from histosynth.synthesis.weights import INCEPTION_FILES

    marker = tmp_path / "pwned"
    name = INCEPTION_FILES[0]
    folders = {"explicit": tmp_path / "x", "env": tmp_path / "w" / "inception",
               "settings": tmp_path / "s", "torch hub": tmp_path / "torch" / "hub" / "checkpoints"}
    folder = folders[place]
    folder.mkdir(parents=True)
    planted = folder / name
    planted.write_bytes(pickle.dumps({"fc.weight": _Planted(str(marker))}))
    for var in ("HISTOSYNTH_WEIGHTS", "TORCH_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HISTOSYNTH_CONFIG", str(tmp_path / "settings.yaml"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    explicit = None
    if place == "explicit":
        explicit = planted
    elif place == "env":
        monkeypatch.setenv("HISTOSYNTH_WEIGHTS", str(tmp_path / "w"))
    elif place == "settings":
        settings = f"weights:\n  features:\n    inception: {planted}\n"
        (tmp_path / "settings.yaml").write_text(settings)
    else:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(EngineError, match="not the FID Inception-v3 weights") as err:
        load_feature_space("inception", weights=explicit)
    assert str(planted) in str(err.value)
    assert not marker.exists(), "the planted pickle ran"
