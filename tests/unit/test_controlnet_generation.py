"""Generation with a vessel-mask ControlNet (issue 29) on the UNTRAINED tiny engine at
64 px: a fresh ControlNet (zero projections) leaves the inpainting pipeline's images as
they are, a trained one changes them, and two-scale guidance is the formula
ε̂ = ε(∅,∅) + s_uni·(ε(e,∅) − ε(∅,∅)) + s_mask·(ε(e,m) − ε(e,∅)), checked against three
explicit forwards of the base and the ControlNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosynth.synthesis.engine import Engine, tiny_engine
from histosynth.synthesis.models.controlnet import PixCellControlNet
from histosynth.synthesis.pipelines.control import (
    NULL_MASK_VALUE,
    MaskControl,
    controlled_noise,
    mask_tensor,
)

TILE = 64
STEPS = 4


@pytest.fixture(scope="module")
def engine() -> Engine:
    with pytest.warns(UserWarning, match="UNTRAINED"):
        return tiny_engine(TILE, device="cpu")


def fresh_controlnet(engine: Engine) -> PixCellControlNet:
    down = int(engine.codec.downsample)
    return PixCellControlNet.from_transformer(
        engine.transformer,
        num_layers=2,
        mask_encoder_channels=(4, 8, 8, 16)[: down.bit_length()],
        vae_scale_factor=down,
    ).eval()


def trained_controlnet(engine: Engine, seed: int = 3) -> PixCellControlNet:
    """A ControlNet whose zero projections hold small random values (as after training)."""
    controlnet = fresh_controlnet(engine)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [controlnet.mask_projection, *controlnet.controlnet_blocks]:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return controlnet


def composites() -> tuple[np.ndarray, np.ndarray]:
    """Two RGB tiles and a disc mask each (the target outline, also the pasted region)."""
    rng = np.random.default_rng(0)
    images = rng.integers(60, 230, (2, TILE, TILE, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:TILE, :TILE]
    masks = np.stack(
        [((yy - c) ** 2 + (xx - c) ** 2 < 14**2).astype(np.uint8) * 255 for c in (30, 34)]
    )
    return images, masks


def inpaint(engine: Engine, control: MaskControl | None, guidance: float = 2.5) -> np.ndarray:
    pipe = engine.inpaint_pipeline()
    pipe.set_progress_bar_config(disable=True)
    images, masks = composites()
    return pipe(
        images,
        masks,
        strength=0.6,
        inside=masks,
        inside_strength=1.0,
        guidance_scale=guidance,
        num_inference_steps=STEPS,
        seeds=[5, 6],
        seam_sigma=3.0,
        control=control,
    ).images


def test_a_fresh_controlnet_leaves_the_images_exactly_as_without_control(engine) -> None:
    _, masks = composites()
    plain = inpaint(engine, None)
    fresh = fresh_controlnet(engine)
    same_scale = MaskControl(fresh, mask_tensor(masks, TILE), mask_guidance=2.5)
    assert np.array_equal(inpaint(engine, same_scale), plain)
    # its residuals are 0: ε(e,m) = ε(e,∅), so s_mask does not matter either
    other_scale = MaskControl(fresh, mask_tensor(masks, TILE), mask_guidance=4.0)
    assert np.array_equal(inpaint(engine, other_scale), plain)


def test_a_trained_controlnet_changes_the_images_and_its_mask_matters(engine) -> None:
    _, masks = composites()
    plain = inpaint(engine, None)
    trained = trained_controlnet(engine)
    controlled = inpaint(engine, MaskControl(trained, mask_tensor(masks, TILE), 2.0))
    changed = np.abs(controlled.astype(int) - plain.astype(int)).max(axis=-1) > 0
    assert changed.mean() > 0.05
    inside = masks > 0
    assert changed[inside].mean() > 0.5  # the regenerated outline follows the ControlNet
    flipped = MaskControl(trained, mask_tensor(255 - masks, TILE), 2.0)
    assert not np.array_equal(inpaint(engine, flipped), controlled)


def explicit_forward(engine, controlnet, latents, t, rows, masks) -> torch.Tensor:
    """ε of one condition: the ControlNet's residuals added to the base's blocks."""
    kwargs = {"resolution": None, "aspect_ratio": None}
    residuals = controlnet(latents, t, rows, masks, added_cond_kwargs=kwargs)
    out = engine.transformer(
        latents, encoder_hidden_states=rows, timestep=t, added_cond_kwargs=kwargs,
        block_residuals=residuals, return_dict=False,
    )[0]
    return out[:, : latents.shape[1]]


@pytest.mark.parametrize(
    ("s_uni", "s_mask"), [(1.5, 3.0), (2.0, 2.0), (1.0, 1.0), (1.0, 3.0), (2.5, 1.0)]
)
def test_two_scale_guidance_is_the_formula(engine, s_uni: float, s_mask: float) -> None:
    controlnet = trained_controlnet(engine, seed=4)
    _, masks = composites()
    generator = torch.Generator().manual_seed(1)
    channels, side = engine.transformer.config.in_channels, engine.transformer.config.sample_size
    latents = torch.randn(2, channels, side, side, generator=generator)
    rows = engine.encoder.encode(composites()[0])
    null = engine.transformer.caption_projection.uncond_embedding[None].expand_as(rows)
    control = MaskControl(controlnet, mask_tensor(masks, TILE), mask_guidance=s_mask)
    t = torch.tensor([700, 700])
    with torch.no_grad():
        got = controlled_noise(engine.transformer, control, latents, 700, rows, null, s_uni)
        m = control.masks
        empty = torch.full_like(m, NULL_MASK_VALUE)
        uncond = explicit_forward(engine, controlnet, latents, t, null, empty)
        rows_only = explicit_forward(engine, controlnet, latents, t, rows, empty)
        both = explicit_forward(engine, controlnet, latents, t, rows, m)
    wanted = uncond + s_uni * (rows_only - uncond) + s_mask * (both - rows_only)
    assert torch.allclose(got, wanted, atol=1e-5, rtol=1e-4)
    assert (both - rows_only).abs().max() > 1e-3  # the mask term is not trivially zero
    if s_uni != s_mask:  # a single-scale CFG would give another ε̂
        single = uncond + s_uni * (both - uncond)
        assert (got - single).abs().max() > 1e-3


def test_a_mask_of_another_size_is_one_line() -> None:
    with pytest.raises(Exception, match="expected vessel masks of 64×64 px"):
        mask_tensor(np.zeros((2, 32, 32), np.uint8), TILE)
