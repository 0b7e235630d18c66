"""The SD3 VAE loader and the latent codec, on a tiny real AutoencoderKL."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.vae import (
    LatentCodec,
    load_vae,
)
from histosynth.synthesis.tiny_models import TINY_VAE_CONFIG

# SD3's VAE structure at a tiny size: 4 blocks (×8 down), 16 latent channels, no quant convs
TINY_SD3 = {**TINY_VAE_CONFIG, "sample_size": 32}


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**TINY_SD3).eval()


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory: pytest.TempPathFactory, vae: AutoencoderKL) -> Path:
    root = tmp_path_factory.mktemp("sd35")
    vae.save_pretrained(root / "vae")
    return root / "vae"


def images(count: int = 2, side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def test_shapes(vae: AutoencoderKL) -> None:
    codec = LatentCodec(vae)
    assert (codec.downsample, codec.latent_channels) == (8, 16)
    latents = codec.encode(images(2, 32))
    assert latents.shape == (2, 16, 4, 4) and latents.dtype == torch.float32
    assert codec.encode(images(1, 64)[0]).shape == (1, 16, 8, 8)
    out = codec.decode(latents)
    assert isinstance(out, np.ndarray) and out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    assert codec.decode(latents[0], output="tensor").shape == (1, 3, 32, 32)
    tensor = codec.decode(latents, output="tensor")
    assert tensor.shape == (2, 3, 32, 32) and tensor.min() >= 0 and tensor.max() <= 1
    assert np.array_equal(out, (tensor * 255).round().byte().permute(0, 2, 3, 1).numpy())


def test_scale_and_shift_applied_exactly_once(vae: AutoencoderKL) -> None:
    codec = LatentCodec(vae)
    img = images(2, 32)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mean
    expected = (raw - 0.0609) * 1.5305
    assert torch.allclose(codec.encode(img), expected, atol=1e-6)

    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        manual = ((vae.decode(latents / 1.5305 + 0.0609).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(codec.decode(latents, output="tensor"), manual, atol=1e-6)
    z = torch.randn(3, 16, 2, 2)
    assert torch.allclose(codec.from_latents(codec.to_latents(z)), z, atol=1e-6)


def test_float_tensor_input_equals_uint8(vae: AutoencoderKL) -> None:
    codec = LatentCodec(vae)
    img = images(1, 32)
    as_tensor = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(codec.encode(img), codec.encode(as_tensor), atol=1e-6)


def test_posterior_and_sampling(vae: AutoencoderKL) -> None:
    codec = LatentCodec(vae)
    img = images(2, 32)
    mean, std = codec.encode_posterior(img)
    assert mean.shape == std.shape == (2, 16, 4, 4)
    assert (std > 0).all()
    assert torch.allclose(codec.encode(img, sample=False), codec.to_latents(mean))
    a = codec.encode(img, sample=True, generator=torch.Generator().manual_seed(5))
    b = codec.encode(img, sample=True, generator=torch.Generator().manual_seed(5))
    c = codec.latents_from_posterior(mean, std, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.allclose(a, c)
    assert not torch.allclose(a, codec.to_latents(mean))
    # the spread of the samples is the posterior std, scaled once
    eps = (a - codec.to_latents(mean)) / (std * codec.scaling_factor)
    assert 0.5 < float(eps.std()) < 1.5


def test_batch_consistency_and_chunking(vae: AutoencoderKL) -> None:
    img = images(3, 32, seed=2)
    batch = LatentCodec(vae, batch_size=2).encode(img)
    singles = torch.cat([LatentCodec(vae).encode(i) for i in img])
    assert torch.allclose(batch, singles, atol=1e-5)
    dec = LatentCodec(vae, batch_size=1).decode(batch, output="tensor")
    assert torch.allclose(dec, LatentCodec(vae, batch_size=8).decode(batch, output="tensor"),
                          atol=1e-5)


def test_bad_inputs(vae: AutoencoderKL) -> None:
    codec = LatentCodec(vae)
    with pytest.raises(EngineError, match="image of 36×36 px: expected sides that are "
                       "multiples of 8 px"):
        codec.encode(images(1, 36))
    with pytest.raises(EngineError, match=r"expected latents \[B, 16, h, w\]"):
        codec.decode(torch.zeros(1, 4, 4, 4))


def test_save_and_load_round_trip(vae: AutoencoderKL, vae_folder: Path) -> None:
    loaded = load_vae(vae_folder)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    img = images(1, 32)
    assert torch.equal(LatentCodec(loaded).encode(img), LatentCodec(vae).encode(img))
    # the repository folder that holds vae/ works too
    assert isinstance(load_vae(vae_folder.parent), AutoencoderKL)
    half = load_vae(vae_folder, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    out = LatentCodec(half).encode(img)
    assert out.dtype == torch.float32 and out.shape == (1, 16, 4, 4)


def test_wrong_folders(tmp_path: Path, vae_folder: Path) -> None:
    with pytest.raises(EngineError, match="VAE folder not found"):
        load_vae(tmp_path / "missing")
    with pytest.raises(EngineError, match=r"no config\.json"):
        load_vae(tmp_path)

    unet = tmp_path / "unet"
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2).save_pretrained(unet)
    with pytest.raises(EngineError) as info:
        load_vae(unet)
    assert str(info.value) == (f"{unet / 'config.json'}: expected an AutoencoderKL config, "
                               "found _class_name 'UNet2DModel'")

    sd1 = tmp_path / "sd1"
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                  scaling_factor=0.18215).save_pretrained(sd1)
    with pytest.raises(EngineError, match=re.escape(f"{sd1 / 'config.json'}: expected the "
                                                    "SD3 VAE (latent_channels 16), found 4")):
        load_vae(sd1)
    assert load_vae(sd1, check_sd3=False).config.latent_channels == 4

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match="cannot read the config"):
        load_vae(broken)


def test_corrupted_weights(tmp_path: Path, vae: AutoencoderKL) -> None:
    folder = tmp_path / "vae"
    vae.save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(EngineError, match=f"^{re.escape(str(folder))}: cannot load the VAE"):
        load_vae(folder)
    weights.unlink()
    with pytest.raises(EngineError, match=f"^{re.escape(str(folder))}: cannot load the VAE"):
        load_vae(folder)
