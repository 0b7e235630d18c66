"""The ControlNet library and the trainer's ControlNet path (issue 29), at tiny sizes.

Checked: save → list → load round trip on the real classes; a folder refused for another
base, another resolution or shape, tampered weights, a link out of the folder, bad
metadata; the trainer's step 0 is the base exactly (a fresh ControlNet changes nothing)
and a ControlNet's sample draws leave every other random number of a run as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from histosynth.integration.demo.data import he_source_image
from histosynth.synthesis.adapters import base_weight_hash
from histosynth.synthesis.cache import CacheDataset, CacheTile, build_cache
from histosynth.synthesis.controlnet_library import (
    METADATA_FILE,
    WEIGHTS_FILE,
    ControlNetInfo,
    list_controlnets,
    load_controlnet,
    read_controlnet_info,
    resolve_controlnet,
    save_controlnet,
)
from histosynth.synthesis.engine import tiny_engine
from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.controlnet import PixCellControlNet
from histosynth.synthesis.pipelines.control import ControlledTransformer
from histosynth.synthesis.training import TrainConfig, split_indices, train_controlnet
from histosynth.synthesis.training.data import sample_generator
from histosynth.synthesis.training.losses import (
    diffusion_loss,
    draw_sample,
    validation_losses,
    vessel_cell_weights,
)

TILE = 64


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(TILE, device="cpu")


def fresh(engine, layers: int = 1) -> PixCellControlNet:
    return PixCellControlNet.from_transformer(
        engine.transformer, num_layers=layers, mask_encoder_channels=(4, 8, 8, 8)
    )


def saved(engine, folder: Path, name: str = "cn") -> ControlNetInfo:
    torch.manual_seed(2)
    controlnet = fresh(engine)
    torch.manual_seed(3)
    for p in controlnet.controlnet_blocks.parameters():
        p.data.normal_(std=0.01)
    info = ControlNetInfo(
        name=name,
        base_hash=base_weight_hash(engine.transformer),
        resolution=TILE,
        layers=1,
        base_id=engine.model_id,
    )
    return save_controlnet(controlnet, folder, info)


def test_save_list_load_round_trip(engine, tmp_path):
    info = saved(engine, tmp_path / "lib" / "cn")
    assert [i.name for i in list_controlnets(tmp_path / "lib")] == ["cn"]
    assert resolve_controlnet("cn", tmp_path / "lib") == tmp_path / "lib" / "cn"
    controlnet, loaded = load_controlnet(info.folder, engine.transformer)
    assert loaded == info and loaded.weights_sha256 and loaded.created
    torch.manual_seed(2)
    reference = fresh(engine)
    torch.manual_seed(3)
    for p in reference.controlnet_blocks.parameters():
        p.data.normal_(std=0.01)
    state = controlnet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in reference.state_dict().items())
    with pytest.raises(EngineError, match="already exists"):
        saved(engine, tmp_path / "lib" / "cn")


def test_refused_for_another_base_resolution_or_tampered_files(engine, tmp_path):
    info = saved(engine, tmp_path / "cn")
    with pytest.raises(EngineError, match="another base"):
        load_controlnet(info.folder, tiny_engine(TILE, seed=1, device="cpu").transformer)
    with pytest.raises(EngineError, match="px tiles"):
        load_controlnet(info.folder, tiny_engine(2 * TILE, device="cpu").transformer)
    weights = info.folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="sha256"):
        load_controlnet(info.folder, engine.transformer)
    with pytest.raises(EngineError, match="no ControlNet named 'other'"):
        resolve_controlnet("other", tmp_path)


def test_a_link_out_of_the_folder_is_refused(engine, tmp_path):
    info = saved(engine, tmp_path / "cn")
    outside = tmp_path / "outside.json"
    outside.write_text((info.folder / METADATA_FILE).read_text())
    (info.folder / METADATA_FILE).unlink()
    (info.folder / METADATA_FILE).symlink_to(outside)
    with pytest.raises(EngineError, match="outside the ControlNet folder"):
        read_controlnet_info(info.folder)


@settings(max_examples=40, deadline=None)
@given(
    key=st.sampled_from(
        ["name", "base_hash", "resolution", "layers", "metrics", "format", "generation"]
    ),
    value=st.one_of(st.none(), st.integers(-5, 0), st.text(max_size=5), st.lists(st.integers())),
)
def test_bad_metadata_is_one_line_naming_the_file(tmp_path_factory, key, value):
    from histosynth.synthesis.adapters.folder import ADAPTER_NAME

    # a drawn text may be a good name ("0"): only bad values are this test's
    assume(not (key == "name" and isinstance(value, str) and ADAPTER_NAME.fullmatch(value)))
    folder = tmp_path_factory.mktemp("meta")
    good = {
        "format": 1, "name": "cn", "base_hash": "a" * 64, "resolution": 64, "layers": 1,
        "weights_sha256": "b" * 64, "metrics": {},
    }
    (folder / METADATA_FILE).write_text(json.dumps({**good, key: value}))
    with pytest.raises(EngineError) as caught:
        read_controlnet_info(folder)
    assert str(folder / METADATA_FILE) in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, engine):
    image, rng, tiles = he_source_image(), np.random.default_rng(0), []
    for k in range(6):
        y, x = (int(v) for v in rng.integers(0, image.shape[0] - TILE, 2))
        mask = np.zeros((TILE, TILE), np.uint8)
        mask[8 + k : 30 + k, 10:40] = 255 if k % 3 else 0
        tiles.append(CacheTile(f"t{k}", np.ascontiguousarray(image[y:y + TILE, x:x + TILE]),
                               mask, source="he"))
    path = tmp_path_factory.mktemp("cache") / "c.h5"
    build_cache(path, tiles, codec=engine.codec, encoder=engine.encoder, tile_size=TILE,
                mpp=0.5, model_id=engine.model_id)
    return path


def test_step_zero_of_a_controlnet_run_is_the_base(cache, tmp_path):
    engine = tiny_engine(TILE, device="cpu")
    data = CacheDataset(cache)
    train, val = split_indices(len(data), 0.34, seed=0)
    base_loss = validation_losses(
        engine.transformer, data, val, engine.make_scheduler("ddpm"), seed=0, batch_size=4
    )["val_loss"]
    info, result = train_controlnet(
        engine, data, train, val, name="cn", folder=tmp_path / "cn",
        config=TrainConfig(steps=3, batch_size=2, lr=1e-3, checkpoint_every=3,
                           val_fraction=0.34, sample_every=0),
        work_dir=tmp_path / "w", layers=1,
    )
    assert result.metrics["val_loss_initial"] == pytest.approx(base_loss, rel=1e-6)
    assert info.metrics["val_loss"] != pytest.approx(base_loss, rel=1e-6)
    # the base did not train
    assert base_weight_hash(engine.transformer) == info.base_hash
    assert base_weight_hash(tiny_engine(TILE, device="cpu").transformer) == info.base_hash


def test_mask_draws_leave_the_other_random_numbers_as_they_were(cache):
    data = CacheDataset(cache)
    for index in range(len(data)):
        plain = draw_sample(data, index, sample_generator(0, "x", index),
                            timestep_range=(0, 1000), uncond_prob=0.5)
        masked = draw_sample(data, index, sample_generator(0, "x", index),
                             timestep_range=(0, 1000), uncond_prob=0.5, mask_dropout=0.5)
        for key, value in plain.items():
            assert torch.equal(value, masked[key]), key
        assert masked["mask"].shape == (1, TILE, TILE)
        assert set(masked["mask"].unique().tolist()) <= {0.0, 1.0}


def test_controlled_transformer_without_a_mask_is_the_base(engine):
    controlnet = fresh(engine)
    for p in controlnet.controlnet_blocks.parameters():
        p.data.normal_(std=0.1)
    pair = ControlledTransformer(engine.transformer, controlnet)
    g = torch.Generator().manual_seed(0)
    x, rows = torch.randn(2, 16, 8, 8, generator=g), engine.transformer.null_condition(2)
    t = torch.tensor([10, 900])
    base = engine.transformer(x, rows, t).sample
    assert torch.equal(pair(x, rows, t, return_dict=False)[0], base)
    mask = torch.zeros(2, 1, TILE, TILE)
    assert not torch.allclose(pair(x, rows, t, controlnet_cond=mask)[0], base)


@settings(max_examples=25, deadline=None)
@given(
    weight=st.floats(1.0, 20.0),
    box=st.tuples(st.integers(0, TILE - 1), st.integers(0, TILE - 1),
                  st.integers(1, TILE), st.integers(1, TILE)),
)
def test_vessel_cell_weights_mark_every_cell_a_vessel_pixel_falls_in(weight, box):
    y, x, h, w = box
    mask = torch.zeros(1, 1, TILE, TILE)
    mask[..., y:y + h, x:x + w] = 1.0
    cells = vessel_cell_weights(mask, (8, 8), weight)[0, 0]
    down = TILE // 8
    for i in range(8):
        for j in range(8):
            touched = bool(mask[0, 0, i * down:(i + 1) * down, j * down:(j + 1) * down].any())
            assert float(cells[i, j]) == pytest.approx(weight if touched else 1.0)


def test_mask_loss_weight_weighs_the_vessel_cells_and_leaves_empty_tiles_alone(engine):
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    mask = torch.zeros(2, 1, TILE, TILE)
    mask[0, :, 8:24, 16:40] = 1.0  # sample 1 has no vessel
    batch = {"latents": latents, "noise": noise, "timestep": torch.tensor([100, 400]),
             "rows": engine.transformer.null_condition(2), "drop": torch.tensor([False, False]),
             "mask": mask, "mask_drop": torch.tensor([False, True])}
    controlnet = fresh(engine)
    for p in controlnet.controlnet_blocks.parameters():
        p.data.normal_(std=0.05)
    model = ControlledTransformer(engine.transformer, controlnet).eval()
    scheduler, null = engine.make_scheduler("ddpm"), engine.transformer.null_condition(1)[0]
    with torch.no_grad():
        plain = diffusion_loss(model, batch, scheduler, snr_gamma=None, null_rows=null)
        weighted = diffusion_loss(model, batch, scheduler, snr_gamma=None, null_rows=null,
                                  mask_loss_weight=5.0)
        out = model(scheduler.add_noise(latents, noise, batch["timestep"]),
                    encoder_hidden_states=batch["rows"], timestep=batch["timestep"],
                    controlnet_cond=torch.where(batch["mask_drop"][:, None, None, None],
                                                -1.0, mask),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0][:, :16]
    squared = (out - noise) ** 2
    cells = torch.ones(8, 8)
    cells[1:3, 2:5] = 5.0  # the vessel's rows 8–23 and columns 16–39 at 8 px per cell
    expected = (squared[0] * cells).mean() / cells.mean()
    assert float(weighted[0]) == pytest.approx(float(expected), rel=1e-5)
    assert float(weighted[0]) != pytest.approx(float(plain[0]), rel=1e-3)
    assert float(weighted[1]) == pytest.approx(float(plain[1]), rel=1e-6)
