"""Conditioning encoders: grid crops, UNI2-h construction and offline loading, TinyEncoder."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import (
    UNI2H_ARCHITECTURE,
    TinyEncoder,
    UNIEncoder,
    build_uni2h,
    create_uni2h,
    image_batch,
    load_checkpoint,
    uni2h_kwargs,
    uni_grid_crops,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def grid_tile(side: int = 1024, crop: int = 256) -> np.ndarray:
    """A tile whose crop (r, c) is filled with a colour unique to (r, c)."""
    n = side // crop
    tile = np.zeros((side, side, 3), np.uint8)
    for r in range(n):
        for c in range(n):
            tile[r * crop:(r + 1) * crop, c * crop:(c + 1) * crop] = (
                10 * (r * n + c), 255 - 7 * r, 30 + 11 * c)
    return tile


def noise_tiles(count: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_uni2h(**TINY).eval()


# --------------------------------------------------------------------------- grid crops


def test_grid_is_row_major() -> None:
    tile = grid_tile()
    crops = uni_grid_crops(tile, normalize=False)
    assert crops.shape == (1, 16, 3, 224, 224)
    for r in range(4):
        for c in range(4):
            expected = torch.tensor(tile[r * 256, c * 256] / 255.0, dtype=torch.float32)
            got = crops[0, r * 4 + c]
            assert torch.allclose(got, expected.view(3, 1, 1).expand_as(got), atol=1e-6)


def test_non_square_grid_is_row_major() -> None:
    tile = grid_tile(1024)[:512]  # 2 rows × 4 columns
    crops = uni_grid_crops(tile, normalize=False)
    assert crops.shape[1] == 8
    assert torch.allclose(crops[0, 5, :, 0, 0], torch.tensor(tile[256, 256] / 255.0).float())


def test_normalisation_values() -> None:
    tile = np.full((256, 256, 3), (200, 100, 50), np.uint8)
    crops = uni_grid_crops(tile)
    expected = (np.array([200, 100, 50]) / 255.0 - MEAN) / STD
    assert torch.allclose(crops[0, 0, :, 100, 100], torch.tensor(expected).float(), atol=1e-5)


def test_resize_is_torchvision_bilinear_antialias() -> None:
    tile = noise_tiles(1, 512)[0]
    crops = uni_grid_crops(tile, normalize=False)
    x = torch.from_numpy(tile).permute(2, 0, 1).float() / 255
    ref = TF.resize(x[:, 256:, :256], [224, 224], InterpolationMode.BILINEAR, antialias=True)
    assert torch.allclose(crops[0, 2], ref, atol=1e-5)


@pytest.mark.parametrize("side", [100, 300, 640])
def test_tile_side_not_a_multiple_of_256_fails(side: int) -> None:
    with pytest.raises(EngineError, match=f"tile of {side}×{side} px: expected sides that are "
                       "multiples of 256"):
        uni_grid_crops(np.zeros((side, side, 3), np.uint8))


def test_image_conventions() -> None:
    tile = noise_tiles(2, 256)
    from_numpy = image_batch(tile)
    from_tensor = image_batch(torch.from_numpy(tile).permute(0, 3, 1, 2).float() / 255)
    assert from_numpy.shape == (2, 3, 256, 256)
    assert torch.allclose(from_numpy, from_tensor)
    assert image_batch(list(tile)).shape == (2, 3, 256, 256)
    assert image_batch(tile[0]).shape == (1, 3, 256, 256)
    with pytest.raises(EngineError, match=r"expected float values in \[0, 1\]"):
        image_batch(torch.full((3, 8, 8), 2.0))
    with pytest.raises(EngineError, match="expected RGB numpy images"):
        image_batch(np.zeros((8, 8), np.uint8))
    with pytest.raises(EngineError, match="expected RGB tensors"):
        image_batch(torch.zeros(1, 4, 8, 8))


# --------------------------------------------------------------------------- TinyEncoder


@pytest.mark.parametrize(("side", "rows"), [(256, 1), (512, 4), (1024, 16)])
def test_rows_per_tile_size(side: int, rows: int) -> None:
    enc = TinyEncoder(dim=16)
    out = enc.encode(noise_tiles(2, side))
    assert out.shape == (2, rows, 16) and out.dtype == torch.float32
    assert enc.rows(side, side) == rows


def test_tiny_encoder_rows_follow_the_crops() -> None:
    enc = TinyEncoder(dim=16)
    tile = grid_tile()
    rows = enc.encode(tile)[0]
    for r in range(4):
        for c in range(4):
            crop = np.ascontiguousarray(tile[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256])
            assert torch.allclose(rows[r * 4 + c], enc.encode(crop)[0, 0], atol=1e-5)
    assert len({tuple(np.round(row.numpy(), 4)) for row in rows}) == 16


def test_tiny_encoder_is_seeded_and_batch_consistent() -> None:
    tiles = noise_tiles(3, 512, seed=1)
    a, b = TinyEncoder(seed=3), TinyEncoder(seed=3)
    batch = a.encode(tiles)
    assert torch.equal(batch, b.encode(tiles))
    assert not torch.allclose(batch, TinyEncoder(seed=4).encode(tiles))
    singles = torch.cat([a.encode(t) for t in tiles])
    assert torch.allclose(batch, singles, atol=1e-5)


def test_tiny_encoder_dtype() -> None:
    enc = TinyEncoder(dim=8).to(torch.float64)
    out = enc.encode(noise_tiles(1, 256))
    assert out.dtype == torch.float64 and enc.dtype == torch.float64
    assert torch.allclose(out.float(), TinyEncoder(dim=8).encode(noise_tiles(1, 256)), atol=1e-4)


# --------------------------------------------------------------------------- UNI2-h


def test_uni2h_kwargs_are_the_model_card_values() -> None:
    assert uni2h_kwargs() == {
        "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
        "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
        "mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU, "reg_tokens": 8,
        "dynamic_img_size": True,
    }
    assert UNI2H_ARCHITECTURE == "vit_giant_patch14_224"
    assert uni2h_kwargs(depth=2)["depth"] == 2


def test_real_size_architecture_on_meta_device() -> None:
    model = create_uni2h(device="meta")  # shapes only, no memory
    assert model.num_features == 1536
    assert sum(p.numel() for p in model.parameters()) == 681_394_176  # UNI2-h: 681 M
    state = model.state_dict()
    assert state["reg_token"].shape == (1, 8, 1536)
    assert state["pos_embed"].shape == (1, 256, 1536)  # no_embed_class: patches only
    assert state["blocks.0.mlp.fc1.weight"].shape == (8192, 1536)  # SwiGLU packed
    assert state["blocks.0.mlp.fc2.weight"].shape == (1536, 4096)
    assert "blocks.23.ls1.gamma" in state and "blocks.24.ls1.gamma" not in state


def test_uni_encoder_rows_are_the_model_on_each_crop(tiny_vit: torch.nn.Module) -> None:
    enc = UNIEncoder(tiny_vit, batch_size=5)
    assert enc.dim == 32
    tiles = noise_tiles(2, 512)
    out = enc.encode(tiles)
    assert out.shape == (2, 4, 32)
    crops = uni_grid_crops(tiles)
    with torch.no_grad():
        direct = tiny_vit(crops.reshape(8, 3, 224, 224)).reshape(2, 4, 32)
    assert torch.allclose(out, direct, atol=1e-5)
    assert torch.allclose(out, torch.cat([enc.encode(t) for t in tiles]), atol=1e-5)
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "folder"])
def test_checkpoint_round_trip(tmp_path: Path, tiny_vit: torch.nn.Module, fmt: str) -> None:
    state = {k: v.contiguous() for k, v in tiny_vit.state_dict().items()}
    if fmt == "bin":
        path = tmp_path / "pytorch_model.bin"
        torch.save(state, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
        if fmt == "folder":
            path = tmp_path
    loaded = build_uni2h(path, **TINY)
    tile = noise_tiles(1, 1024)
    assert torch.equal(loaded.encode(tile), UNIEncoder(tiny_vit).encode(tile))
    assert all(not t.is_meta for t in loaded.state_dict().values())


def test_build_from_the_hf_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_vit: torch.nn.Module
) -> None:
    for var in ("HISTOSYNTH_WEIGHTS", "HISTOSYNTH_CONFIG", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineError, match="MahmoodLab/UNI2-h"):
        build_uni2h(None, **TINY)
    repo = tmp_path / "hub" / "models--MahmoodLab--UNI2-h"
    data_file = tmp_path / "tmp.bin"
    torch.save(tiny_vit.state_dict(), data_file)
    data = data_file.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    enc = build_uni2h(None, **TINY)
    tile = noise_tiles(1, 256)
    assert torch.equal(enc.encode(tile), UNIEncoder(tiny_vit).encode(tile))


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupted_file_names_it(tmp_path: Path, tiny_vit: torch.nn.Module, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(tiny_vit.state_dict(), str(path))
    else:
        torch.save(tiny_vit.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    with pytest.raises(EngineError, match=f"^{re.escape(str(path))}: cannot read weights"):
        build_uni2h(path, **TINY)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EngineError, match=f"^{re.escape(str(path))}: cannot read weights"):
        load_checkpoint(path)


def test_missing_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="weights file not found"):
        build_uni2h(tmp_path / "nothing.bin", **TINY)
    with pytest.raises(EngineError, match=r"expected model\.safetensors or pytorch_model\.bin"):
        build_uni2h(tmp_path, **TINY)


@pytest.mark.parametrize(
    ("other", "problem"),
    [({"reg_tokens": 0}, "1 missing"), ({"embed_dim": 48}, "wrong shape"),
     ({"depth": 3}, "unexpected")],
)
def test_wrong_architecture_checkpoint(tmp_path: Path, other: dict, problem: str) -> None:
    wrong = create_uni2h(**{**TINY, **other})
    path = tmp_path / "model.safetensors"
    save_file(wrong.state_dict(), str(path))
    with pytest.raises(EngineError) as info:
        build_uni2h(path, **TINY)
    text = str(info.value)
    assert text.startswith(f"{path}: does not fit the UNI2-h architecture")
    assert problem in text and "\n" not in text


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(EngineError, match="expected a state dict"):
        build_uni2h(path, **TINY)


def test_encoders_are_diffusers_models_that_save_and_load_as_one_folder(tmp_path):
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    enc = TinyEncoder(dim=8, seed=3, crop=64)
    assert isinstance(enc, ModelMixin) and isinstance(enc, ConfigMixin)
    assert (enc.config["dim"], enc.config["seed"], enc.config["crop"]) == (8, 3, 64)
    enc.save_pretrained(tmp_path / "enc")
    back = TinyEncoder.from_pretrained(tmp_path / "enc")
    tile = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert torch.equal(back.encode(tile), enc.encode(tile))
    other = TinyEncoder(dim=8, seed=4, crop=64)
    assert not torch.equal(other.encode(tile), enc.encode(tile))


def test_the_engine_reads_a_tiny_encoder_saved_before_it_was_a_model_mixin(tmp_path):
    import json

    from safetensors.torch import save_file

    from histosynth.synthesis.engine import load_encoder

    enc = TinyEncoder(dim=8, seed=5, crop=64)
    folder = tmp_path / "encoder"
    folder.mkdir()
    config = {"_class_name": "TinyEncoder", "dim": 8, "seed": 5, "crop": 64}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(dict(enc.state_dict()), str(folder / "model.safetensors"))
    tile = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert torch.equal(load_encoder(folder).encode(tile), enc.encode(tile))
    (folder / "config.json").write_text(json.dumps({**config, "dim": "eight"}))
    with pytest.raises(EngineError, match="integer dim"):
        load_encoder(folder)
