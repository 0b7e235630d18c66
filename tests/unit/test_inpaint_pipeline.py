"""InpaintPipeline on the tiny engine: SDEdit from the composite, CFG, seeds, seam blend."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.ndimage import distance_transform_edt

from histosynth.synthesis.engine import Engine, load_engine, make_scheduler
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.inpaint.seam import seam_blend, seam_weights
from histosynth.synthesis.pipelines import InpaintPipeline
from histosynth.synthesis.pipelines.inpaint import img2img_timesteps

TILE = 256
STEPS = 4  # of which int(4 · strength) run
STRENGTH = 0.5
SIGMA = 4.0  # 4σ = 16 px: leaves pixels far from the seam inside and outside the donor


def tile(seed: int = 0) -> np.ndarray:
    """A 256² RGB tile with structure (blobs on a gradient), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    image = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.float64) / 2
    for _ in range(12):
        cy, cx = rng.integers(0, TILE, 2).tolist()
        r = int(rng.integers(8, 30))
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(40, 220, 3)
    return image.clip(0, 255).astype(np.uint8)


def disk(cy: int = 128, cx: int = 128, r: int = 50) -> np.ndarray:
    """A 0/255 uint8 disk mask."""
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 255, 0).astype(np.uint8)


def corner_box() -> np.ndarray:
    """A bool mask touching the tile border (the border is not a seam)."""
    mask = np.zeros((TILE, TILE), bool)
    mask[:90, 150:] = True
    return mask


def make_pipe(untrained_engine: Engine, scheduler: str = "dpm-solver++") -> InpaintPipeline:
    pipe = InpaintPipeline(
        transformer=untrained_engine.transformer,
        vae=untrained_engine.vae,
        scheduler=untrained_engine.make_scheduler(scheduler),
        encoder=untrained_engine.encoder,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(untrained_engine: Engine) -> InpaintPipeline:
    return make_pipe(untrained_engine)


def run(pipe: InpaintPipeline, composite, mask, **kwargs):
    options = {
        "strength": STRENGTH,
        "num_inference_steps": STEPS,
        "seam_sigma": SIGMA,
        "guidance_scale": 2.5,
        **kwargs,
    }
    return pipe(composite, mask, **options)


def far_from_seam(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Pixels more than 4σ (+1 px of slack) from the seam, inside or outside the mask;
    computed with scipy, independently of the pipeline."""
    inside = np.asarray(mask) > 0
    d_in = distance_transform_edt(inside)  # to the nearest outside pixel
    d_out = distance_transform_edt(~inside)  # to the nearest mask pixel
    return np.where(inside, d_in, d_out) > 4 * sigma + 1


def manual_sdedit(
    untrained_engine: Engine, composite: np.ndarray, seed: int, guidance: float
) -> torch.Tensor:
    """SDEdit written out by hand: posterior-mean latents, diffusers' img2img schedule cut,
    noise from the image's own generator, ε = first 16 of 32 channels, CFG with the
    learned null condition (no unconditional pass at s = 1)."""
    model = untrained_engine.transformer
    scheduler = make_scheduler("dpm-solver++", untrained_engine.scheduler_config)
    scheduler.set_timesteps(STEPS)
    k = int(STEPS * STRENGTH)
    timesteps = scheduler.timesteps[STEPS - k :]
    scheduler.set_begin_index(STEPS - k)
    z0 = untrained_engine.codec.encode(composite, sample=False)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    z = scheduler.add_noise(z0, noise, timesteps[:1])
    rows = untrained_engine.encoder.encode(composite)
    null = model.caption_projection.uncond_embedding[None].clone()
    with torch.no_grad():
        for t in timesteps:
            if guidance == 1:
                eps = model(z, encoder_hidden_states=rows, timestep=t[None]).sample[:, :16]
            else:
                out = model(
                    torch.cat([z, z]),
                    encoder_hidden_states=torch.cat([null, rows]),
                    timestep=t[None].expand(2),
                ).sample[:, :16]
                uncond, cond = out.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            z = scheduler.step(eps, t, z).prev_sample
    return z


# --------------------------------------------------------------------------- schedule


SCHEDULERS = {
    name: (make_scheduler(name), make_scheduler(name))
    for name in ("dpm-solver++", "ddim", "ddpm", "euler")
}


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(SCHEDULERS)), st.integers(1, 60), st.floats(0, 1))
def test_schedule_cut_is_diffusers_img2img(name: str, steps: int, strength: float) -> None:
    ours, reference = SCHEDULERS[name]  # set_timesteps resets a scheduler's state
    timesteps, k = img2img_timesteps(ours, steps, strength)
    # diffusers' own method, on an object holding only a scheduler, as its __call__ uses it
    reference.set_timesteps(steps, device="cpu")
    expected, k_expected = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=reference), steps, strength, "cpu"
    )
    assert k == k_expected == len(timesteps)
    assert torch.equal(timesteps, expected)
    assert getattr(ours, "begin_index", None) == getattr(reference, "begin_index", None)


def test_strength_055_with_50_steps_starts_near_tau_times_t_max() -> None:
    scheduler = make_scheduler("dpm-solver++")
    timesteps, k = img2img_timesteps(scheduler, 50, 0.55)
    assert k == 27 == len(timesteps)  # int(50 · 0.55) = int(27.500000000000004), as diffusers
    assert int(timesteps[0]) == round(999 * 27 / 50) == 539  # linspace spacing
    assert abs(int(timesteps[0]) - int(0.55 * 1000)) <= 1000 / 50  # ≈ ⌊τ · T_max⌋ = 550
    ddim_steps, _ = img2img_timesteps(make_scheduler("ddim"), 50, 0.55)
    assert int(ddim_steps[0]) == 20 * 26 == 520  # leading spacing


def test_pipeline_reports_and_uses_the_cut(untrained_engine: Engine, pipe: InpaintPipeline) -> None:
    out = run(pipe, tile(), disk(), seeds=3, strength=0.75, output_type="latent")
    scheduler = untrained_engine.make_scheduler()
    scheduler.set_timesteps(STEPS)
    assert out.num_steps == 3 and out.start_step == int(scheduler.timesteps[1])


# --------------------------------------------------------------------------- the method


def test_outputs_shapes_types_and_forms(pipe: InpaintPipeline) -> None:
    composites = np.stack([tile(0), tile(1)])
    masks = np.stack([disk(), disk(60, 70, 30)])
    out = run(pipe, composites, masks, seeds=[1, 2])
    assert out.images.shape == out.generated.shape == (2, TILE, TILE, 3)
    assert out.images.dtype == out.generated.dtype == np.uint8
    assert out.seeds == [1, 2] and out.num_steps == 2 and out.start_step > 0
    assert not np.array_equal(out.images, out.generated)  # the blend keeps the far context
    single = run(pipe, tile(0), disk(), seeds=[1])
    pil = run(pipe, tile(0), disk(), seeds=[1], output_type="pil")
    assert isinstance(pil.images[0], Image.Image) and pil.images[0].size == (TILE, TILE)
    assert np.array_equal(np.asarray(pil.images[0]), single.images[0])
    assert np.array_equal(np.asarray(pil.generated[0]), single.generated[0])
    latent = run(pipe, tile(0), disk(), seeds=[1], output_type="latent")
    assert latent.images.shape == (1, 16, TILE // 8, TILE // 8) and latent.generated is None
    images, generated, seeds, start_step, num_steps = run(
        pipe, tile(0), disk(), seeds=[1], return_dict=False
    )
    assert np.array_equal(images, single.images) and np.array_equal(generated, single.generated)
    assert (seeds, start_step, num_steps) == ([1], out.start_step, 2)
    drawn = run(pipe, tile(0), disk(), output_type="latent")  # fresh seeds are reported
    assert len(drawn.seeds) == 1
    assert torch.equal(
        drawn.images, run(pipe, tile(0), disk(), seeds=drawn.seeds, output_type="latent").images
    )


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_the_method_written_out_by_hand(
    untrained_engine: Engine, pipe: InpaintPipeline, guidance: float
) -> None:
    composite, mask = tile(4), disk(100, 140, 40)
    out = run(pipe, composite, mask, seeds=[11], guidance_scale=guidance, output_type="latent")
    manual = manual_sdedit(untrained_engine, composite, seed=11, guidance=guidance)
    assert torch.allclose(out.images, manual, rtol=0, atol=1e-5 * manual.abs().max())
    # decoded and blended: the final image is seam_blend(X, X_gen, A)
    full = run(pipe, composite, mask, seeds=[11], guidance_scale=guidance, decode="tile")
    assert np.array_equal(full.generated, untrained_engine.codec.decode(out.images))
    expected = seam_blend(composite, full.generated[0], seam_weights(mask, sigma=SIGMA))
    assert np.array_equal(full.images[0], expected)


def test_guidance_one_skips_the_null_condition(
    untrained_engine: Engine, pipe: InpaintPipeline
) -> None:
    kwargs = {"seeds": [5], "output_type": "latent"}
    plain = run(pipe, tile(), disk(), guidance_scale=1.0, **kwargs).images
    buffer = untrained_engine.transformer.caption_projection.uncond_embedding
    saved = buffer.clone()
    try:
        buffer.fill_(float("nan"))
        again = run(pipe, tile(), disk(), guidance_scale=1.0, **kwargs).images
        guided = run(pipe, tile(), disk(), guidance_scale=2.5, **kwargs).images
    finally:
        buffer.copy_(saved)
    assert torch.equal(again, plain)
    assert torch.isnan(guided).any()  # s != 1 does use the learned null condition


@pytest.mark.parametrize("mask", [disk(), corner_box()], ids=["disk", "border-box"])
def test_far_from_the_seam_the_final_image_is_the_composite(
    pipe: InpaintPipeline, mask: np.ndarray
) -> None:
    composite = tile(2)
    out = run(pipe, composite, mask, seeds=[3], strength=1.0)
    final, generated = out.images[0], out.generated[0]
    far = far_from_seam(mask, SIGMA)
    inside = np.asarray(mask) > 0
    assert (far & inside).sum() > 500 and (far & ~inside).sum() > 500
    assert np.array_equal(final[far], composite[far])  # bit for bit, whatever the model
    assert not np.array_equal(generated[far], composite[far])  # the model did change them
    near = ~far_from_seam(mask, 0.25)  # within 2 px of the seam
    assert not np.array_equal(final[near], composite[near])  # the seam was re-rendered


def test_strength_zero_returns_the_composites_exactly(pipe: InpaintPipeline) -> None:
    composites = np.stack([tile(0), tile(1)])
    out = run(pipe, composites, np.stack([disk(), disk(40, 40, 20)]), seeds=[1, 2], strength=0.0)
    assert np.array_equal(out.images, composites) and np.array_equal(out.generated, composites)
    assert out.images is not composites
    assert out.start_step is None and out.num_steps == 0 and out.seeds == [1, 2]
    # a strength too small for one step of the schedule is strength 0 as well
    assert run(pipe, tile(), disk(), seeds=[1], strength=0.2).num_steps == 0


def test_same_seed_same_output_other_seed_other_output(pipe: InpaintPipeline) -> None:
    first = run(pipe, tile(), disk(), seeds=[7])
    second = run(pipe, tile(), disk(), seeds=[7])
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.generated, second.generated)
    other = run(pipe, tile(), disk(), seeds=[8])
    assert not np.array_equal(first.generated, other.generated)


def test_each_image_depends_on_its_own_seed_not_on_the_batch(pipe: InpaintPipeline) -> None:
    composites, masks = np.stack([tile(0), tile(1)]), np.stack([disk(), corner_box()])
    batch = run(pipe, composites, masks, seeds=[1, 2])
    batch_latents = run(pipe, composites, masks, seeds=[1, 2], output_type="latent").images
    for i, seed in enumerate([1, 2]):
        one = run(pipe, composites[i], masks[i], seeds=[seed])
        latents = run(pipe, composites[i], masks[i], seeds=[seed], output_type="latent").images
        # oneDNN convolutions are not batch-invariant to the last bit (the VAE encoder's
        # z₀ already differs by ~2e-5 relative with the batch size): equal up to rounding
        scale = latents.abs().max()
        assert torch.allclose(batch_latents[i], latents[0], rtol=0, atol=1e-4 * scale)
        diff = np.abs(batch.images[i].astype(int) - one.images[0].astype(int))
        assert diff.max() <= 1
    # an int seed s means s, s + 1, ...
    shorthand = run(pipe, composites, masks, seeds=1, output_type="latent").images
    assert torch.equal(shorthand, batch_latents)
    # one generator per image gives the same images as the seeds
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    from_gens = run(pipe, composites, masks, generator=gens, output_type="latent")
    assert torch.equal(from_gens.images, batch_latents) and from_gens.seeds is None


def test_uni_rows_replace_the_encoder(untrained_engine: Engine, pipe: InpaintPipeline) -> None:
    composite, mask = tile(3), disk()
    kwargs = {"seeds": [4], "output_type": "latent"}
    default = run(pipe, composite, mask, **kwargs).images
    rows = untrained_engine.encoder.encode(composite)
    assert torch.equal(run(pipe, composite, mask, uni_rows=rows, **kwargs).images, default)
    other = run(pipe, composite, mask, uni_rows=untrained_engine.encoder.encode(tile(9)), **kwargs)
    assert not torch.equal(other.images, default)


def test_stochastic_scheduler_is_reproducible(untrained_engine: Engine) -> None:
    ddpm = make_pipe(untrained_engine, "ddpm")
    first = run(ddpm, tile(), disk(), seeds=[6], output_type="latent").images
    assert torch.equal(first, run(ddpm, tile(), disk(), seeds=[6], output_type="latent").images)
    assert torch.isfinite(first).all()


def test_bad_inputs_are_clear_errors(untrained_engine: Engine, pipe: InpaintPipeline) -> None:
    with pytest.raises(EngineError, match=r"256×256 px.*found 128×128"):
        run(pipe, np.zeros((128, 128, 3), np.uint8), np.zeros((128, 128), bool), seeds=[1])
    other_size = load_engine("tiny", device="cpu", tile_size=128)
    with pytest.raises(EngineError, match=r"128×128 px.*found 256×256"):
        run(make_pipe(other_size), tile(), disk(), seeds=[1])
    with pytest.raises(EngineError, match=r"mask of shape \(256, 256\)"):
        run(pipe, tile(), np.zeros((128, 128), bool), seeds=[1])
    with pytest.raises(EngineError, match=r"mask of shape \(2, 256, 256\)"):
        run(pipe, np.stack([tile(), tile()]), disk(), seeds=[1, 2])
    with pytest.raises(EngineError, match="mask values"):
        run(pipe, tile(), disk() // 2, seeds=[1])
    with pytest.raises(EngineError, match="uint8"):
        run(pipe, tile().astype(np.float32) / 255, disk(), seeds=[1])
    with pytest.raises(EngineError, match="strength"):
        run(pipe, tile(), disk(), seeds=[1], strength=1.5)
    with pytest.raises(EngineError, match="expected 2 seeds"):
        run(pipe, np.stack([tile(), tile()]), np.stack([disk(), disk()]), seeds=[1])
    with pytest.raises(EngineError, match=r"UNI rows \[1, 16, 32\]"):
        run(pipe, tile(), disk(), seeds=[1], uni_rows=torch.zeros(1, 4, 32))
    with pytest.raises(EngineError, match="output_type"):
        run(pipe, tile(), disk(), seeds=[1], output_type="png")
    with pytest.raises(EngineError, match="no adapter 'style'"):
        run(pipe, tile(), disk(), seeds=[1], adapter="style")


def test_callback_on_step_end_sees_and_replaces_the_latents(pipe: InpaintPipeline) -> None:
    """diffusers' callback convention: called after each of the int(N·τ) steps with the
    current latents; the latents it returns are the ones the loop goes on with."""
    seen: list[tuple[int, int, tuple[int, ...]]] = []

    def record(p, step, t, tensors):
        seen.append((step, int(t), tuple(tensors["latents"].shape)))
        return tensors

    plain = run(pipe, tile(), disk(), seeds=[3], output_type="latent")
    recorded = run(
        pipe, tile(), disk(), seeds=[3], output_type="latent", callback_on_step_end=record
    )
    assert [s for s, _, _ in seen] == list(range(plain.num_steps)) and plain.num_steps >= 1
    assert all(shape == tuple(plain.images.shape) for _, _, shape in seen)
    assert torch.equal(recorded.images, plain.images)  # returning them unchanged changes nothing

    def zero_last(p, step, t, tensors):
        last = step == plain.num_steps - 1
        return {"latents": torch.zeros_like(tensors["latents"])} if last else {}

    zeroed = run(
        pipe, tile(), disk(), seeds=[3], output_type="latent", callback_on_step_end=zero_last
    )
    assert torch.count_nonzero(zeroed.images) == 0
    with pytest.raises(EngineError, match="callbacks may see latents"):
        run(
            pipe,
            tile(),
            disk(),
            seeds=[3],
            callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=["noise"],
        )
    with pytest.raises(EngineError, match="guidance scale"):
        run(pipe, tile(), disk(), seeds=[3], guidance_scale=float("nan"))


def test_band_decoding_decodes_only_the_window_around_the_seam(
    untrained_engine: Engine, pipe: InpaintPipeline
) -> None:
    """``decode="band"`` (the default) decodes the latent window around the seam band:
    beyond it ``generated`` is the composite, inside it the pixels are those of the
    window's own decode, and the final tile is the composite beyond 4σ as always; a window
    covering most of the tile decodes the tile."""
    from histosynth.synthesis.pipelines.inpaint import BAND_MARGIN_CELLS, band_window

    composite, mask = tile(6), disk(60, 60, 12)
    weights = seam_weights(mask, sigma=SIGMA)
    down = untrained_engine.codec.downsample
    rows, columns = band_window(weights, down, BAND_MARGIN_CELLS)
    assert (rows.start, columns.start) == (0, 0) and rows.stop * down < TILE
    band = run(pipe, composite, mask, seeds=[2])
    whole = run(pipe, composite, mask, seeds=[2], decode="tile")
    latents = run(pipe, composite, mask, seeds=[2], output_type="latent").images
    window = (slice(rows.start * down, rows.stop * down),
              slice(columns.start * down, columns.stop * down))
    outside = np.ones((TILE, TILE), bool)
    outside[window] = False
    assert np.array_equal(band.generated[0][outside], composite[outside])
    decoded = untrained_engine.codec.decode(latents[:, :, rows, columns])[0]
    assert np.array_equal(band.generated[0][window], decoded)
    assert np.array_equal(band.images[0][weights == 0], composite[weights == 0])
    assert not np.array_equal(band.images, whole.images)  # the window is its own decode
    big = disk(128, 128, 90)
    assert band_window(seam_weights(big, sigma=SIGMA), down, BAND_MARGIN_CELLS) is None
    assert np.array_equal(run(pipe, composite, big, seeds=[2]).images,
                          run(pipe, composite, big, seeds=[2], decode="tile").images)
    with pytest.raises(EngineError, match="decode is 'band' or 'tile'"):
        run(pipe, composite, mask, seeds=[2], decode="half")


def test_masked_partial_diffusion_holds_cells_outside_the_region(pipe: InpaintPipeline) -> None:
    """Shape mode: the inside of the outline at its own τ, the seam band at τ; every latent
    cell outside both is the composite's at the end, and so is every pixel beyond 4σ of
    the pasted region outside the outline."""
    composite, mask = tile(3), disk(r=60)
    inside = disk(r=30)
    common = {"strength": 0.25, "num_inference_steps": 8, "seeds": 5}
    latents = run(pipe, composite, mask, inside=inside, inside_strength=0.75,
                  output_type="latent", **common).images
    clean = pipe.codec.encode(composite[None]).float()
    moved = (latents - clean).abs()[0].amax(0).numpy() > 1e-6  # [h, w] latent cells
    down = pipe.codec.downsample
    band = ~far_from_seam(mask, SIGMA)
    region = (band | (inside > 0))[::down, ::down]  # a cell's corner pixel, conservative
    reach = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert moved.any() and not (moved & ~reach).any()
    out = run(pipe, composite, mask, inside=inside, inside_strength=0.75, **common).images[0]
    keep = far_from_seam(mask, SIGMA) & (inside == 0)
    assert np.array_equal(out[keep], composite[keep])
    # the centre of the outline, beyond 4σ of the seam, is regenerated (a plain inpaint
    # call keeps it)
    centre = far_from_seam(mask, SIGMA) & (inside > 0)
    assert centre.any() and (out[centre] != composite[centre]).mean() > 0.5
    plain = run(pipe, composite, mask, **common).images[0]
    assert np.array_equal(plain[centre], composite[centre])


def test_inside_strength_above_what_the_denoiser_serves_is_refused(pipe: InpaintPipeline) -> None:
    old = pipe.max_strength
    pipe.max_strength = 0.5
    try:
        with pytest.raises(EngineError, match=r"serves strengths up to 0\.5"):
            run(pipe, tile(), disk(), inside=disk(r=20), inside_strength=0.7)
    finally:
        pipe.max_strength = old
