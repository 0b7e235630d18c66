"""VariationPipeline on the tiny engine: CFG with the learned null condition, seeds, adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from peft import LoraConfig
from PIL import Image

from histosynth.synthesis.engine import Engine, load_engine, make_scheduler
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.pipelines import VariationPipeline
from histosynth.synthesis.pipelines.variation import generators_for

STEPS = 2
TILE = 256


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


def quiet(pipe: VariationPipeline) -> VariationPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(untrained_engine: Engine) -> VariationPipeline:
    return quiet(untrained_engine.variation_pipeline())


def manual_loop(
    untrained_engine: Engine, rows: torch.Tensor, seed: int, guidance: float
) -> torch.Tensor:
    """The method written out by hand: DPM-Solver++, ε = first 16 of 32 output channels,
    ε̂ = ε(∅) + s(ε(e) − ε(∅)) with the learned null condition, no CFG pass at s = 1."""
    model = untrained_engine.transformer
    scheduler = make_scheduler("dpm-solver++", untrained_engine.scheduler_config)
    scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((1, 16, TILE // 8, TILE // 8), generator=g) * scheduler.init_noise_sigma
    null = model.caption_projection.uncond_embedding[None].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
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


def test_outputs_shapes_and_types(pipe: VariationPipeline) -> None:
    refs = np.stack([tile(0), tile(1)])
    out = pipe(
        refs,
        num_images_per_reference=2,
        seeds=[1, 2, 3, 4],
        num_inference_steps=STEPS,
        output_type="latent",
    )
    assert out.images.shape == (4, 16, TILE // 8, TILE // 8)
    assert out.images.dtype == torch.float32 and out.seeds == [1, 2, 3, 4]
    # grouped by reference: ref0 #0, ref0 #1, ref1 #0, ref1 #1
    third = pipe(refs[1], seeds=[3], num_inference_steps=STEPS, output_type="latent").images
    assert torch.allclose(out.images[2], third[0], rtol=0, atol=1e-5 * third.abs().max())
    images = pipe(tile(), seeds=[1], num_inference_steps=STEPS).images
    assert images.shape == (1, TILE, TILE, 3) and images.dtype == np.uint8
    pil = pipe(tile(), seeds=[1], num_inference_steps=STEPS, output_type="pil").images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (TILE, TILE)
    assert np.array_equal(np.asarray(pil[0]), images[0])
    assert pipe.tile_size == TILE


def test_same_seed_same_images_and_fresh_seeds_are_reported(pipe: VariationPipeline) -> None:
    def run(**kwargs):
        return pipe(tile(), num_inference_steps=STEPS, output_type="latent", **kwargs)

    first = run(seeds=[7]).images
    assert torch.equal(first, run(seeds=[7]).images)
    assert not torch.equal(first, run(seeds=[8]).images)
    drawn = run()
    assert len(drawn.seeds) == 1
    assert torch.equal(drawn.images, run(seeds=drawn.seeds).images)


def test_each_image_depends_on_its_own_seed_not_on_the_batch(pipe: VariationPipeline) -> None:
    ref = tile()
    batch = pipe(
        ref,
        num_images_per_reference=2,
        seeds=[1, 2],
        num_inference_steps=STEPS,
        output_type="latent",
    ).images
    one = pipe(ref, seeds=[1], num_inference_steps=STEPS, output_type="latent").images
    two = pipe(ref, seeds=[2], num_inference_steps=STEPS, output_type="latent").images
    # oneDNN convolutions are not batch-invariant to the last bit: equal up to rounding
    scale = batch.abs().max()
    assert torch.allclose(batch[0], one[0], rtol=0, atol=1e-5 * scale)
    assert torch.allclose(batch[1], two[0], rtol=0, atol=1e-5 * scale)
    assert (one[0] - two[0]).abs().max() > 0.1 * scale  # the seeds really matter
    # an int seed s means s, s + 1, ...
    shorthand = pipe(
        ref, num_images_per_reference=2, seeds=1, num_inference_steps=STEPS, output_type="latent"
    ).images
    assert torch.equal(shorthand, batch)
    # k seeds for one reference = k variations of it (the README's call)
    per_seed = pipe(ref, seeds=[1, 2], num_inference_steps=STEPS, output_type="latent")
    assert torch.equal(per_seed.images, batch) and per_seed.seeds == [1, 2]
    with pytest.raises(EngineError, match="expected 2 seeds"):
        pipe(np.stack([ref, ref]), seeds=[1, 2, 3], num_inference_steps=STEPS)
    # the initial noise itself is exactly per image
    gens = generators_for([1, 2])
    assert torch.equal(
        torch.randn(3, generator=gens[1]), torch.randn(3, generator=generators_for([2])[0])
    )


def latents(pipe: VariationPipeline, rows: torch.Tensor, seed: int, guidance: float):
    """The pipeline's latents for ``rows`` at ``seed`` and CFG scale ``guidance``."""
    return pipe(uni_rows=rows, seeds=[seed], guidance_scale=guidance,
                num_inference_steps=STEPS, output_type="latent").images


def test_guidance_one_is_the_conditional_prediction_alone(untrained_engine: Engine) -> None:
    pipe = quiet(untrained_engine.variation_pipeline())
    rows = untrained_engine.encoder.encode(tile())
    ours = latents(pipe, rows, seed=3, guidance=1.0)
    assert torch.equal(ours, manual_loop(untrained_engine, rows, seed=3, guidance=1.0))
    # the unconditional branch is not even run: garbage in the null condition changes nothing
    buffer = untrained_engine.transformer.caption_projection.uncond_embedding
    saved = buffer.clone()
    try:
        buffer.fill_(float("nan"))
        again = latents(pipe, rows, seed=3, guidance=1.0)
        guided = latents(pipe, rows, seed=3, guidance=2.0)
    finally:
        buffer.copy_(saved)
    assert torch.equal(again, ours)
    assert torch.isnan(guided).any()  # s != 1 does use the null condition


def test_guidance_uses_the_learned_null_condition(untrained_engine: Engine) -> None:
    pipe = quiet(untrained_engine.variation_pipeline())
    rows = untrained_engine.encoder.encode(tile())
    guided = latents(pipe, rows, seed=3, guidance=2.5)
    assert torch.equal(guided, manual_loop(untrained_engine, rows, seed=3, guidance=2.5))
    plain = latents(pipe, rows, seed=3, guidance=1.0)
    assert (guided - plain).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("dpm-solver++", DPMSolverMultistepScheduler),
        ("ddpm", DDPMScheduler),
        ("ddim", DDIMScheduler),
        ("euler", EulerDiscreteScheduler),
    ],
)
def test_every_scheduler_runs_and_is_reproducible(
    untrained_engine: Engine, name: str, cls: type
) -> None:
    pipe = quiet(untrained_engine.variation_pipeline(scheduler=name))
    assert type(pipe.scheduler) is cls
    assert pipe.scheduler.config.beta_schedule == "linear"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    kwargs = {"seeds": [4], "num_inference_steps": STEPS, "output_type": "latent"}
    first = pipe(tile(), **kwargs).images
    second = pipe(tile(), **kwargs).images
    assert torch.isfinite(first).all() and torch.equal(first, second)


def test_schedulers_give_different_samples(untrained_engine: Engine) -> None:
    outs = [
        quiet(untrained_engine.variation_pipeline(scheduler=name))(
            tile(), seeds=[4], num_inference_steps=STEPS, output_type="latent"
        ).images
        for name in ("ddim", "ddpm")
    ]
    assert not torch.equal(outs[0], outs[1])  # DDPM adds seeded noise each step


def test_uni_rows_give_the_same_images_as_the_reference(
    untrained_engine: Engine, pipe: VariationPipeline
) -> None:
    refs = np.stack([tile(0), tile(1)])
    kwargs = {
        "seeds": [5, 6],
        "num_inference_steps": STEPS,
        "output_type": "latent",
        "guidance_scale": 1.0,
    }
    from_images = pipe(refs, **kwargs).images
    from_rows = pipe(uni_rows=untrained_engine.encoder.encode(refs), **kwargs).images
    assert torch.equal(from_images, from_rows)
    other = pipe(np.stack([tile(2), tile(1)]), **kwargs).images
    assert not torch.equal(other[0], from_images[0])  # the reference matters


def test_bad_inputs_are_clear_errors(untrained_engine: Engine, pipe: VariationPipeline) -> None:
    small = np.zeros((128, 128, 3), np.uint8)
    with pytest.raises(EngineError, match=r"256×256 px.*found 128×128"):
        pipe(small, seeds=[1], num_inference_steps=STEPS)
    with pytest.raises(EngineError, match="reference"):
        pipe(np.zeros((TILE, TILE), np.uint8), seeds=[1])
    with pytest.raises(EngineError, match="either reference images or uni_rows"):
        pipe(seeds=[1])
    with pytest.raises(EngineError, match="either reference images or uni_rows"):
        pipe(tile(), uni_rows=untrained_engine.encoder.encode(tile()))
    with pytest.raises(EngineError, match=r"UNI rows \[B, 16, 32\]"):
        pipe(uni_rows=torch.zeros(1, 4, 32))
    with pytest.raises(EngineError, match="expected 2 seeds"):
        pipe(tile(), num_images_per_reference=2, seeds=[1])
    with pytest.raises(EngineError, match="output_type"):
        pipe(tile(), seeds=[1], output_type="png")
    with pytest.raises(EngineError, match="no adapter 'style'"):
        pipe(tile(), seeds=[1], adapter="style", num_inference_steps=1)


def test_adapter_is_used_for_the_call_and_the_previous_state_comes_back() -> None:
    own = load_engine("tiny", device="cpu")  # its own copy: adapters change the model
    pipe = quiet(own.variation_pipeline())
    model = own.transformer

    def run(**kwargs) -> torch.Tensor:
        return pipe(
            tile(),
            seeds=[9],
            num_inference_steps=STEPS,
            output_type="latent",
            guidance_scale=1.0,
            **kwargs,
        ).images

    before = run()
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        init_lora_weights="gaussian",
        target_modules=["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    )
    model.add_adapter(config, adapter_name="style")
    with torch.no_grad():  # B starts at zero: make the adapter do something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    model.disable_adapters()
    model.requires_grad_(False)
    plain = run()
    assert torch.equal(plain, before)

    styled = run(adapter="style")
    assert (styled - plain).abs().max() > 1e-3
    assert torch.equal(run(), plain)  # back to the plain base, bit for bit
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(m.disable_adapters for m in lora_layers)
    assert not any(p.requires_grad for p in model.parameters())

    # the same as switching the adapter on by hand
    model.enable_adapters()
    model.set_adapter("style")
    assert torch.equal(run(), styled)


def test_callback_on_step_end_is_called_every_step(pipe: VariationPipeline) -> None:
    steps: list[int] = []
    out = pipe(
        tile(),
        seeds=[5],
        num_inference_steps=STEPS,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, tensors: steps.append(i) or tensors,
    )
    assert steps == list(range(STEPS))
    plain = pipe(tile(), seeds=[5], num_inference_steps=STEPS, output_type="latent")
    assert torch.equal(out.images, plain.images)
    with pytest.raises(EngineError, match="callback_on_step_end"):
        pipe(tile(), seeds=[5], num_inference_steps=STEPS, callback_on_step_end="not callable")
