"""PixCellTransformer2DModel: PixCell's released layout, UNI conditioning, save/load, peft."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid
from peft import LoraConfig
from safetensors.torch import save_file

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models import PixCellTransformer2DModel
from histosynth.synthesis.models.transformer import uni_position_embedding

# transformer/config.json of StonyBrook-CVLab/PixCell-1024, all keys and values as published
# in PixCell's own code (github.com/cvlab-stonybrook/PixCell,
# virtual_staining/train_lora.py, which reproduces the Hub config to build the model).
PIXCELL_1024_CONFIG = {
    "_class_name": "PixCellTransformer2DModel",
    "_diffusers_version": "0.32.2",
    "_name_or_path": "pixart_1024/transformer",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 1536,
    "caption_num_tokens": 16,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 16,
    "interpolation_scale": 2,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 32,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": False,
}

# The same structure, sizes shrunk: 2 blocks, hidden 2 x 32 = 64, UNI width 32, 4 x 4 rows.
TINY_SIZES = {
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "cross_attention_dim": 64,
    "caption_channels": 32,
    "sample_size": 16,
}


def tiny_config(**overrides: object) -> dict:
    return {**PIXCELL_1024_CONFIG, **TINY_SIZES, **overrides}


def expected_state_dict_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Key → shape of a PixCell transformer, from the published naming alone (no model).

    diffusers' PixArtTransformer2DModel layout (PatchEmbed, AdaLayerNormSingle with a
    256-channel timestep embedding, BasicTransformerBlock with ada_norm_single: attn1,
    attn2, ff.net.0.proj / ff.net.2 with 4x width, per-block scale_shift_table [6, D]) plus
    PixCell's caption_projection.{linear_1, linear_2, uncond_embedding} and, with more than
    one UNI row, the persistent y_pos_embed.y_pos_embed. PatchEmbed's pos_embed is a
    non-persistent buffer, so it is absent.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p, c_in, c_out = config["patch_size"], config["in_channels"], config["out_channels"]
    cross, cap, tokens = (
        config["cross_attention_dim"],
        config["caption_channels"],
        config["caption_num_tokens"],
    )

    def linear(name: str, n_out: int, n_in: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed.proj.weight": (d, c_in, p, p),
        "pos_embed.proj.bias": (d,),
        **linear("adaln_single.emb.timestep_embedder.linear_1", d, 256),
        **linear("adaln_single.emb.timestep_embedder.linear_2", d, d),
        **linear("adaln_single.linear", 6 * d, d),
        **linear("caption_projection.linear_1", d, cap),
        **linear("caption_projection.linear_2", d, d),
        "caption_projection.uncond_embedding": (tokens, cap),
        "scale_shift_table": (2, d),
        **linear("proj_out", p * p * c_out, d),
    }
    if tokens > 1:
        shapes["y_pos_embed.y_pos_embed"] = (1, tokens, cap)
    for i in range(config["num_layers"]):
        block = f"transformer_blocks.{i}"
        shapes[f"{block}.scale_shift_table"] = (6, d)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes.update(linear(f"{block}.attn1.{proj}", d, d))
        shapes.update(linear(f"{block}.attn2.to_q", d, d))
        shapes.update(linear(f"{block}.attn2.to_k", d, cross))
        shapes.update(linear(f"{block}.attn2.to_v", d, cross))
        shapes.update(linear(f"{block}.attn2.to_out.0", d, d))
        shapes.update(linear(f"{block}.ff.net.0.proj", 4 * d, d))
        shapes.update(linear(f"{block}.ff.net.2", d, 4 * d))
    return shapes


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def make_tiny(seed: int = 0, **overrides: object) -> PixCellTransformer2DModel:
    torch.manual_seed(seed)
    return PixCellTransformer2DModel.from_config(tiny_config(**overrides)).eval()


def inputs(model: PixCellTransformer2DModel, batch: int = 2, height: int = 16, width: int = 16):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    latents = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    rows = torch.randn(batch, cfg.caption_num_tokens, cfg.caption_channels, generator=g)
    timesteps = torch.tensor([10, 900, 500, 250])[:batch]
    return latents, rows, timesteps


def test_real_pixcell_1024_config_builds_published_layout_at_full_size() -> None:
    with torch.device("meta"):  # no memory, no init cost: only structure
        model = PixCellTransformer2DModel.from_config(PIXCELL_1024_CONFIG)
    assert shapes_of(model) == expected_state_dict_shapes(PIXCELL_1024_CONFIG)
    params = sum(p.numel() for p in model.parameters())
    assert 0.55e9 < params < 0.65e9  # PixArt-XL/2 ≈ 0.6 B
    for key, value in PIXCELL_1024_CONFIG.items():
        if not key.startswith("_"):
            assert model.config[key] == value, key


def test_tiny_model_has_the_same_keys_and_shapes() -> None:
    config = tiny_config()
    assert shapes_of(make_tiny()) == expected_state_dict_shapes(config)


def test_single_row_model_has_no_position_embedding() -> None:
    config = tiny_config(caption_num_tokens=1)
    model = make_tiny(caption_num_tokens=1)
    assert shapes_of(model) == expected_state_dict_shapes(config)
    assert "y_pos_embed.y_pos_embed" not in model.state_dict()
    latents, rows, t = inputs(model)
    assert model(latents, rows, t).sample.shape == (2, 32, 16, 16)


def test_from_pretrained_loads_a_pixcell_folder_with_no_missing_keys(tmp_path) -> None:
    # A folder laid out like PixCell's transformer/: config.json + safetensors whose keys
    # and shapes come from the published naming, not from our model.
    config = tiny_config()
    g = torch.Generator().manual_seed(7)
    tensors = {
        k: torch.randn(shape, generator=g)
        for k, shape in expected_state_dict_shapes(config).items()
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))

    model, info = PixCellTransformer2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["mismatched_keys"] == [] and info["error_msgs"] == []
    loaded = model.state_dict()
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key
    assert model.config.kv_compress_ratio is None


def test_forward_is_pixart_with_grid_embedded_uni_rows() -> None:
    # PixCell = PixArt whose caption input is UNI rows + y_pos_embed, projected by the same
    # Linear-GELU(tanh)-Linear; checked against diffusers' own PixArt with the same weights.
    model = make_tiny()
    pixart_config = {k: v for k, v in tiny_config().items() if k != "caption_num_tokens"}
    pixart = PixArtTransformer2DModel.from_config(pixart_config).eval()
    result = pixart.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == [
        "caption_projection.uncond_embedding",
        "y_pos_embed.y_pos_embed",
    ]
    latents, rows, t = inputs(model)
    with torch.no_grad():
        ours = model(latents, rows, t).sample
        theirs = pixart(latents, rows + model.y_pos_embed.y_pos_embed, t).sample
        without_grid = pixart(latents, rows, t).sample
    assert ours.shape == (2, 32, 16, 16)
    assert (ours - theirs).abs().max() <= 1e-6
    assert (ours - without_grid).abs().max() > 1e-4  # the grid embedding matters


def test_uni_grid_embedding_is_diffusers_sincos_with_pixcell_phase() -> None:
    # 4 x 4 rows, PixCell-1024 sizes: base 64, interpolation 2, phase 64 // 16 = 4.
    emb = uni_position_embedding(16, 1536, base_size=64)
    axis = torch.arange(4, dtype=torch.float32) * 64 / 4 / 2 + 4
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy")).reshape(2, 1, 4, 4)
    reference = get_2d_sincos_pos_embed_from_grid(1536, grid, output_type="pt").float()
    assert emb.shape == (1, 16, 1536)
    assert torch.allclose(emb[0], reference, atol=1e-6)
    # first half encodes the column: rows 0 and 4 (same column) agree there
    assert torch.equal(emb[0, 0, :768], emb[0, 4, :768])
    assert not torch.equal(emb[0, 0, 768:], emb[0, 4, 768:])
    with pytest.raises(EngineError, match="square"):
        uni_position_embedding(12, 32, base_size=8)


def test_null_condition_is_the_learned_buffer_expanded() -> None:
    model = make_tiny()
    null = model.null_condition(3)
    assert null.shape == (3, 16, 32)
    for row in null:
        assert torch.equal(row, model.caption_projection.uncond_embedding)
    null[0].zero_()  # a copy: the buffer is not touched
    assert model.caption_projection.uncond_embedding.abs().sum() > 0
    assert model.null_condition(1, dtype=torch.float64).dtype == torch.float64
    latents, rows, t = inputs(model)
    with torch.no_grad():
        uncond = model(latents, model.null_condition(2), t).sample
        cond = model(latents, rows, t).sample
    assert (uncond - cond).abs().max() > 1e-4


def test_non_square_latents_and_bad_condition_shapes() -> None:
    model = make_tiny()
    latents, rows, t = inputs(model, height=16, width=24)
    assert model(latents, rows, t).sample.shape == (2, 32, 16, 24)
    with pytest.raises(EngineError, match=r"expected UNI rows \[2, 16, 32\], got \[2, 4, 32\]"):
        model(latents, rows[:, :4], t)
    with pytest.raises(EngineError, match="got None"):
        model(latents, None, t)


def test_save_load_round_trip_gives_identical_outputs(tmp_path) -> None:
    model = make_tiny(seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "PixCellTransformer2DModel"
    assert saved["caption_num_tokens"] == 16
    loaded = PixCellTransformer2DModel.from_pretrained(tmp_path).eval()
    latents, rows, t = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(latents, rows, t).sample, loaded(latents, rows, t).sample)
    assert torch.equal(model.null_condition(2), loaded.null_condition(2))


def test_peft_lora_on_cross_attention_only() -> None:
    model = make_tiny()
    latents, rows, t = inputs(model)
    with torch.no_grad():
        before = model(latents, rows, t).sample
    targets = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets),
        adapter_name="style",
    )
    lora = [k for k in model.state_dict() if "lora_" in k]
    assert lora and all(".attn2." in k for k in lora)
    assert len(lora) == 2 * 2 * len(targets)  # A and B, per block, per target
    with torch.no_grad():  # gaussian init keeps B = 0: the adapter starts as identity
        assert torch.allclose(model(latents, rows, t).sample, before, atol=1e-6)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
        changed = model(latents, rows, t).sample
        model.disable_adapters()
        restored = model(latents, rows, t).sample
    assert (changed - before).abs().max() > 1e-4
    assert torch.allclose(restored, before, atol=1e-6)
