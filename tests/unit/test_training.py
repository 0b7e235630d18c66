"""The trainer on real H&E at tiny sizes: the real PixCell / diffusers / peft / accelerate
classes, a real feature cache (HDF5) built from TIAToolbox's H&E sample.

Checked: the seeded split and data order (and that two processes with batch B see what
one process with batch 2B sees), a LoRA run that lowers the held-out loss and lands in
the library with its metadata, bit-identical resume, growing 256 → 512 px, and each
reversible optimisation (cache, attention, compile, mixed precision, gradient
checkpointing, KV-compression) against its off state.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from histosynth.integration.demo.data import he_source_image
from histosynth.synthesis.adapters import base_weight_hash, load_adapter, read_adapter_info
from histosynth.synthesis.cache import CacheDataset, CacheTile, OnTheFlyDataset, build_cache
from histosynth.synthesis.engine import load_engine, set_attention, tiny_engine
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.kv_compression import enable_kv_compression
from histosynth.synthesis.training import (
    TrainConfig,
    check_samples_fit,
    grow_transformer,
    split_indices,
    train_full,
    train_lora,
)
from histosynth.synthesis.training.data import collate, sample_generator, step_indices
from histosynth.synthesis.training.loop import _draw, diffusion_loss, validation_losses

TILE = 256


def _tiles(count: int, size: int = TILE, seed: int = 0) -> list[CacheTile]:
    image = he_source_image()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        y, x = (int(v) for v in rng.integers(0, image.shape[0] - size, 2))
        tile = np.ascontiguousarray(image[y : y + size, x : x + size])
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4 : size // 2, size // 4 : size // 2] = 255
        out.append(CacheTile(f"he-{i:02d}", tile, mask, source=f"target_image@{x},{y}"))
    return out


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(TILE, device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, engine):
    path = tmp_path_factory.mktemp("cache") / "he.h5"
    build_cache(
        path,
        _tiles(12),
        codec=engine.codec,
        encoder=engine.encoder,
        tile_size=TILE,
        mpp=0.5,
        model_id=engine.model_id,
    )
    return path


def _config(**kw) -> TrainConfig:
    base = dict(
        steps=20, batch_size=4, lr=1e-3, checkpoint_every=10, val_fraction=0.25, sample_every=0
    )
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- data order


def test_split_is_seeded_disjoint_and_holds_out_at_least_one():
    train, val = split_indices(12, 0.05, seed=3)
    assert len(val) == 1 and sorted(train + val) == list(range(12))
    assert split_indices(12, 0.05, seed=3) == (train, val)
    assert split_indices(12, 0.25, seed=4)[1] != split_indices(12, 0.25, seed=5)[1]
    assert split_indices(1, 0.5, seed=0) == ([0], [])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 23),
    batch=st.integers(1, 5),
    processes=st.integers(1, 4),
    accum=st.integers(1, 3),
    step=st.integers(0, 30),
)
def test_processes_share_a_step_as_one_process_with_their_batches_joined(
    n, batch, processes, accum, step
):
    train = list(range(100, 100 + n))
    one = [
        step_indices(
            train,
            seed=1,
            step=step,
            micro=m,
            batch_size=batch * processes,
            grad_accum=accum,
            processes=1,
            rank=0,
        )
        for m in range(accum)
    ]
    many = [
        [
            pick
            for r in range(processes)
            for pick in step_indices(
                train,
                seed=1,
                step=step,
                micro=m,
                batch_size=batch,
                grad_accum=accum,
                processes=processes,
                rank=r,
            )
        ]
        for m in range(accum)
    ]
    assert one == many
    # every epoch visits every training sample once
    per_step = batch * processes * accum
    stream = (
        [
            idx
            for s in range(0, (2 * n) // per_step + 1)
            for m in range(accum)
            for idx, _, _ in step_indices(
                train,
                seed=1,
                step=s,
                micro=m,
                batch_size=batch,
                grad_accum=accum,
                processes=processes,
                rank=0,
            )
        ]
        if processes == 1
        else None
    )
    if stream is not None and len(stream) >= n:
        assert sorted(stream[:n]) == train


# --------------------------------------------------------------------------- LoRA


def test_lora_lowers_the_held_out_loss_and_lands_in_the_library(tmp_path, cache):
    engine = tiny_engine(TILE, device="cpu")
    base_hash = base_weight_hash(engine.transformer)
    data = CacheDataset(cache)
    train, val = split_indices(len(data), 0.25, seed=0)
    folder = tmp_path / "library" / "he-test"
    _, result = train_lora(
        engine,
        data,
        train,
        val,
        name="he-test",
        folder=folder,
        config=_config(steps=200, checkpoint_every=50, keep_best=1),
        work_dir=tmp_path / "work",
        domain="H&E, TIAToolbox sample",
        training_data_checksum=data.info.content_hash,
    )
    first, last = result.metrics["val_loss_initial"], result.metrics["val_loss"]
    assert last < 0.95 * first, (first, last)
    bins = [k for k in result.metrics if k.startswith("val_loss_t")]
    assert len(bins) == 4
    saved = read_adapter_info(folder)
    assert saved.base_hash == base_hash and saved.resolution == TILE
    assert saved.training_data_checksum == data.info.content_hash
    assert saved.domain == "H&E, TIAToolbox sample" and saved.base_id == engine.model_id
    assert saved.rank == 4 and saved.alpha == 4 and saved.created
    assert saved.metrics["val_loss"] == pytest.approx(last, rel=1e-5)
    assert saved.training["steps_run"] == 200 and saved.training["lr"] == 1e-3
    # checkpoints: the last one and the best one by validation loss
    kept = sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir())
    assert "step-00000200" in kept and 1 <= len(kept) <= 2
    log = [
        json.loads(x) for x in (tmp_path / "work" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert [r["step"] for r in log] == list(range(201))
    # the adapter loads onto a fresh base and changes what it predicts
    fresh = tiny_engine(TILE, device="cpu")
    x = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = data.sample(val[0], sample_generator(0, "t"))["rows"][None]
    t = torch.tensor([500])
    before = fresh.transformer(x, rows, t).sample
    load_adapter(fresh.transformer, folder)
    after = fresh.transformer(x, rows, t).sample
    assert not torch.allclose(before, after, atol=1e-4)


def test_resume_continues_exactly(tmp_path, cache):
    data = CacheDataset(cache)
    train, val = split_indices(len(data), 0.25, seed=0)

    def run(work, steps, resume=False, name="r"):
        engine = tiny_engine(TILE, device="cpu")
        return train_lora(
            engine,
            data,
            train,
            val,
            name=name,
            folder=work / "lib" / name,
            config=_config(steps=steps, checkpoint_every=7, ema=True),
            work_dir=work / "w",
            resume=resume,
            overwrite=True,
        )

    run(tmp_path / "a", 20)
    run(tmp_path / "b", 14)  # stops at a checkpoint in the middle of an epoch (9 samples)
    info, result = run(tmp_path / "b", 20, resume=True)
    assert result.resumed_from == 14
    a = load_file(tmp_path / "a" / "lib" / "r" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "lib" / "r" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        info.metrics["val_loss_initial"]
        == read_adapter_info(tmp_path / "a" / "lib" / "r").metrics["val_loss_initial"]
    )


def test_resume_refuses_another_configuration_and_a_run_without_resume(tmp_path, cache):
    data = CacheDataset(cache)
    train, val = split_indices(len(data), 0.25, seed=0)
    kwargs = dict(name="x", folder=tmp_path / "lib" / "x", work_dir=tmp_path / "w", overwrite=True)
    train_lora(
        tiny_engine(TILE, device="cpu"), data, train, val, config=_config(steps=10), **kwargs
    )
    with pytest.raises(EngineError, match=r"another configuration.*lr"):
        train_lora(
            tiny_engine(TILE, device="cpu"),
            data,
            train,
            val,
            config=_config(steps=20, lr=5e-4),
            resume=True,
            **kwargs,
        )
    with pytest.raises(EngineError, match="--resume"):
        train_lora(
            tiny_engine(TILE, device="cpu"), data, train, val, config=_config(steps=20), **kwargs
        )
    with pytest.raises(EngineError, match="already exists"):
        train_lora(
            tiny_engine(TILE, device="cpu"),
            data,
            train,
            val,
            config=_config(steps=1),
            name="x",
            folder=tmp_path / "lib" / "x",
            work_dir=tmp_path / "w2",
        )


def test_a_cache_of_other_models_or_tiles_does_not_fit(tmp_path, cache, engine):
    info = CacheDataset(cache).info
    cfg = engine.transformer.config
    fit = dict(
        resolution=TILE, tokens=cfg.caption_num_tokens, dim=cfg.caption_channels, latent_channels=16
    )
    check_samples_fit(
        info,
        vae_hash=base_weight_hash(engine.vae),
        encoder_hash=base_weight_hash(engine.encoder),
        **fit,
    )
    other = tiny_engine(TILE, seed=1, device="cpu")
    with pytest.raises(EngineError, match="another VAE") as err:
        check_samples_fit(info, vae_hash=base_weight_hash(other.vae), **fit)
    assert str(cache) in str(err.value)
    with pytest.raises(EngineError, match="another conditioning encoder"):
        check_samples_fit(info, encoder_hash=base_weight_hash(other.encoder), **fit)
    with pytest.raises(EngineError, match="cannot give 512 px samples"):
        check_samples_fit(info, **{**fit, "resolution": 512})
    with pytest.raises(EngineError, match="condition rows"):
        check_samples_fit(info, **{**fit, "tokens": 4})
    # a lower resolution reads crops of the cached grid
    check_samples_fit(info, **{**fit, "resolution": 128, "tokens": 4})


# --------------------------------------------------------------------------- full


def test_growing_keeps_the_weights_and_grows_the_grid(engine):
    model = engine.transformer
    same = grow_transformer(model, TILE)
    x = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    rows = model.null_condition(1)
    t = torch.tensor([300])
    assert torch.equal(same(x, rows, t).sample, model(x, rows, t).sample)
    grown = grow_transformer(model, 2 * TILE)
    assert grown.config.sample_size == 64 and grown.config.caption_num_tokens == 64
    assert grown.config.interpolation_scale == 2 * model.config.interpolation_scale
    old = model.state_dict()
    for key, value in grown.state_dict().items():
        if key in old and key not in (
            "y_pos_embed.y_pos_embed",
            "caption_projection.uncond_embedding",
        ):
            assert torch.equal(value, old[key]), key
    null_old = model.caption_projection.uncond_embedding.reshape(4, 4, -1)
    null_new = grown.caption_projection.uncond_embedding.reshape(8, 8, -1)
    assert torch.equal(null_new[:4, :4], null_old) and torch.equal(null_new[4:, 4:], null_old)
    reinit = grow_transformer(model, 2 * TILE, null_condition="reinit", seed=2)
    assert not torch.equal(
        reinit.caption_projection.uncond_embedding, grown.caption_projection.uncond_embedding
    )
    assert torch.equal(
        reinit.caption_projection.uncond_embedding,
        grow_transformer(
            model, 2 * TILE, null_condition="reinit", seed=2
        ).caption_projection.uncond_embedding,
    )
    out = grown(torch.randn(1, 16, 64, 64), grown.null_condition(1), t).sample
    assert out.shape == (1, 32, 64, 64)
    with pytest.raises(EngineError, match="whole factor"):
        grow_transformer(model, 384)


def test_train_full_256_to_512_writes_an_engine_that_loads(tmp_path, engine):
    path = tmp_path / "he512.h5"
    build_cache(
        path,
        _tiles(5, size=512),
        codec=engine.codec,
        encoder=engine.encoder,
        tile_size=512,
        mpp=0.5,
    )
    data = CacheDataset(path)
    assert data.info.rows == 64
    train, val = split_indices(len(data), 0.2, seed=0)
    out, _ = train_full(
        engine,
        data,
        train,
        val,
        resolution=512,
        out=tmp_path / "e512",
        config=_config(steps=3, batch_size=2, lr=1e-5, checkpoint_every=3, val_fraction=0.2),
        work_dir=tmp_path / "e512-training",
    )
    loaded = load_engine(out, device="cpu")
    assert loaded.tile_size == 512 and loaded.trained
    assert loaded.transformer.config.caption_num_tokens == 64
    meta = json.loads((out / "histosynth_engine.json").read_text())
    assert meta["training"]["steps"] == 3 and meta["training"]["resolution"] == 512
    image = loaded.variation_pipeline()(
        he_source_image()[:512, :512], seeds=[0], num_inference_steps=2
    ).images
    assert image.shape == (1, 512, 512, 3)


# --------------------------------------------------------------------------- optimisations


def _loss_and_grads(model, data, indices, *, autocast=None, seed=0):
    draws = [
        _draw(data, i, sample_generator(seed, "opt", i), timestep_range=(0, 1000), uncond_prob=0.1)
        for i in indices
    ]
    batch = collate(draws)
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = tiny_engine(TILE).make_scheduler("ddpm")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        losses = diffusion_loss(
            model,
            batch,
            scheduler,
            snr_gamma=5.0,
            null_rows=model.caption_projection.uncond_embedding,
        )
    losses.mean().backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    return float(losses.mean().detach()), grads


def _trainable(seed: int = 0):
    model = tiny_engine(TILE).transformer.train().requires_grad_(True)
    return model


def test_cache_and_on_the_fly_encoding_give_the_same_loss(cache, engine):
    data = CacheDataset(cache)
    tiles = _tiles(12)
    fly = OnTheFlyDataset(
        [t.image for t in tiles],
        [t.mask for t in tiles],
        codec=engine.codec,
        encoder=engine.encoder,
    )
    a, ga = _loss_and_grads(_trainable(), data, [0, 1, 2, 3])
    b, gb = _loss_and_grads(_trainable(), fly, [0, 1, 2, 3])
    assert b == pytest.approx(a, rel=2e-3)
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999


def test_speed_options_leave_loss_and_gradients_as_they_are(cache):
    from diffusers.models.attention_processor import AttnProcessor

    data = CacheDataset(cache)
    idx = [0, 1, 2, 3]
    plain = _trainable()
    plain.set_attn_processor(AttnProcessor())  # the explicit softmax(QKᵀ)V implementation
    ref, gref = _loss_and_grads(plain, data, idx)

    sdpa = _trainable()
    set_attention(sdpa, "sdpa")
    loss, grads = _loss_and_grads(sdpa, data, idx)
    assert loss == pytest.approx(ref, rel=1e-5) and torch.allclose(grads, gref, atol=1e-5)

    ckpt = _trainable()
    ckpt.enable_gradient_checkpointing()
    loss, grads = _loss_and_grads(ckpt, data, idx)
    assert loss == pytest.approx(ref, rel=1e-6) and torch.allclose(grads, gref, atol=1e-6)

    loss, grads = _loss_and_grads(_trainable(), data, idx, autocast="bf16")
    assert loss == pytest.approx(ref, rel=3e-2)
    assert torch.nn.functional.cosine_similarity(grads, gref, dim=0) > 0.98


def test_compiled_model_gives_the_same_loss_and_gradients(cache):
    data = CacheDataset(cache)
    idx = [0, 1]
    ref, gref = _loss_and_grads(_trainable(), data, idx)
    compiled = _trainable()
    compiled.compile()
    loss, grads = _loss_and_grads(compiled, data, idx)
    assert loss == pytest.approx(ref, rel=1e-4)
    assert torch.allclose(grads, gref, atol=1e-4)


def test_kv_compression_ratio_one_is_off_and_its_convs_train(cache, tmp_path):
    data = CacheDataset(cache)
    idx = [0, 1, 2, 3]
    ref, gref = _loss_and_grads(_trainable(), data, idx)
    off = _trainable()
    enable_kv_compression(off, ratio=2)
    from histosynth.synthesis.models.kv_compression import disable_kv_compression

    disable_kv_compression(off)
    loss, grads = _loss_and_grads(off, data, idx)
    assert loss == ref and torch.equal(grads, gref)
    on = _trainable()
    enable_kv_compression(on, ratio=2, norm=False)  # starts as exact average pooling
    loss, _ = _loss_and_grads(on, data, idx)
    assert loss == pytest.approx(ref, rel=0.1)  # pooled keys/values: a close approximation
    convs = [p for n, p in on.named_parameters() if "processor.conv" in n]
    assert convs and all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs)
    # a full fine-tune with --kv-compress keeps the setting in the saved engine
    engine = tiny_engine(TILE, device="cpu")
    train, val = split_indices(len(data), 0.25, seed=0)
    out, _ = train_full(
        engine,
        data,
        train,
        val,
        resolution=TILE,
        out=tmp_path / "kv",
        config=_config(steps=2, kv_compress=2, checkpoint_every=2),
        work_dir=tmp_path / "kv-training",
    )
    loaded = load_engine(out, device="cpu")
    assert loaded.kv_compress == 2
    pooled = loaded.transformer.transformer_blocks[1].attn1.processor.conv.weight
    assert not torch.allclose(pooled, torch.full_like(pooled, 0.25))


def test_validation_loss_is_deterministic(cache, engine):
    data = CacheDataset(cache)
    scheduler = engine.make_scheduler("ddpm")
    a = validation_losses(engine.transformer, data, [0, 1], scheduler, seed=0, batch_size=3)
    b = validation_losses(engine.transformer, data, [0, 1], scheduler, seed=0, batch_size=8)
    assert a == pytest.approx(b, rel=1e-6) and len(a) == 5
