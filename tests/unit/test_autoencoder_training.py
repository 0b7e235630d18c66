"""The autoencoder trainer: the loss goes down, a cut-off run resumes exactly, metrics are sane."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.vae import LatentCodec
from histosynth.synthesis.training.autoencoder import (
    CHECKPOINT_FILE,
    dihedral,
    normalise_latents,
    reconstruct,
    reconstruction_metrics,
    train_autoencoder,
)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609,
    )


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A stain-like texture: pink background with purple blobs, seeded."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :128]
    img = np.zeros((96, 128, 3), np.float64) + np.array((230.0, 170.0, 200.0))
    for _ in range(40):
        cy, cx, r = rng.uniform(0, 96), rng.uniform(0, 128), rng.uniform(2, 6)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + blob * np.array((90, 50, 140))
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def test_dihedral_gives_the_eight_distinct_transforms():
    x = torch.arange(9.0).reshape(1, 3, 3)
    outs = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8 and tuple(x.flatten().tolist()) in outs


def test_loss_goes_down(image):
    vae = tiny_vae()
    run = train_autoencoder(vae, [image], steps=40, batch_size=4, crop=32, lr=3e-3, log_every=1)
    first = np.mean([h["l1"] for h in run["history"][:5]])
    last = np.mean([h["l1"] for h in run["history"][-5:]])
    assert run["completed"] and run["steps"] == 40
    assert last < 0.7 * first
    assert not vae.training  # left in eval mode, frozen
    assert not any(p.requires_grad for p in vae.parameters())


def test_cut_off_run_resumes_to_the_same_weights(image, tmp_path):
    settings = dict(steps=6, batch_size=2, crop=32, lr=1e-3, seed=3, checkpoint_every=2)
    whole = tiny_vae()
    train_autoencoder(whole, [image], work_dir=tmp_path / "a", **settings)

    cut = tiny_vae()
    first = train_autoencoder(cut, [image], work_dir=tmp_path / "b", max_seconds=0, **settings)
    assert first["steps"] == 1 and not first["completed"]
    assert (tmp_path / "b" / CHECKPOINT_FILE).is_file()
    resumed = tiny_vae(seed=99)  # other initial weights: the checkpoint must replace them
    second = train_autoencoder(resumed, [image], work_dir=tmp_path / "b", **settings)
    assert second["steps"] == 6 and second["completed"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)

    with pytest.raises(EngineError, match="other settings"):
        train_autoencoder(tiny_vae(), [image], work_dir=tmp_path / "b",
                          **{**settings, "lr": 2e-3})


def test_bad_input_is_refused(image):
    with pytest.raises(EngineError, match="smaller than"):
        train_autoencoder(tiny_vae(), [image[:16]], steps=1, crop=32)
    with pytest.raises(EngineError, match="multiple of 2"):
        train_autoencoder(tiny_vae(), [image], steps=1, crop=33)
    with pytest.raises(EngineError, match="uint8"):
        train_autoencoder(tiny_vae(), [image.astype(np.float32)], steps=1, crop=32)


def test_metrics_and_latent_normalisation(image):
    vae = tiny_vae()
    train_autoencoder(vae, [image], steps=20, batch_size=4, crop=32, lr=3e-3)
    metrics = reconstruction_metrics(vae, [image])
    assert set(metrics) == {"psnr", "hf_ratio", "mean_abs_error"}
    assert 5 < metrics["psnr"] < 60 and 0 < metrics["hf_ratio"] < 3
    assert 0 < metrics["mean_abs_error"] < 0.5
    odd = image[:90, :126]  # sides that are not multiples of the down-sampling
    assert reconstruct(vae, odd).shape == odd.shape

    before = reconstruct(vae, image).astype(int)
    normalise_latents(vae, [image])
    after = reconstruct(vae, image).astype(int)
    assert np.abs(before - after).max() <= 1  # the decoder sees what it saw before
    latents = LatentCodec(vae).encode(image)
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    torch.testing.assert_close(latents.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-2, rtol=0)


def test_decoder_only_keeps_every_latent_and_improves_the_decoder(image):
    vae = tiny_vae()
    train_autoencoder(vae, [image], steps=20, batch_size=4, crop=32, lr=3e-3)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean.clone()
    decoder = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith("decoder.")}
    before = reconstruction_metrics(vae, [image])["psnr"]
    run = train_autoencoder(vae, [image], steps=30, batch_size=4, crop=32, lr=3e-3,
                            decoder_only=True)
    assert run["completed"]
    with torch.no_grad():
        assert torch.equal(vae.encode(x).latent_dist.mean, latents)  # the latent space stays
    assert any(not torch.equal(v, vae.state_dict()[k]) for k, v in decoder.items())
    assert reconstruction_metrics(vae, [image])["psnr"] > before
