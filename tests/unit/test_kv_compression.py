"""KV-compressed self-attention: off is stock diffusers, on is pooled K/V attention."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models import (
    PixCellTransformer2DModel,
    disable_kv_compression,
    enable_kv_compression,
    kv_compression_parameter_count,
)
from histosynth.synthesis.models.kv_compression import KVCompressionAttnProcessor

TINY = {
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "cross_attention_dim": 64,
    "caption_channels": 32,
    "caption_num_tokens": 16,
    "in_channels": 16,
    "out_channels": 32,
    "sample_size": 16,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
}


def make_tiny(seed: int = 0, **overrides: object) -> PixCellTransformer2DModel:
    torch.manual_seed(seed)
    return PixCellTransformer2DModel(**{**TINY, **overrides}).eval()


def inputs(batch: int = 2, height: int = 16, width: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 16, height, width, generator=g, dtype=dtype)
    rows = torch.randn(batch, 16, 32, generator=g, dtype=dtype)
    timesteps = torch.tensor([10, 900, 500, 250])[:batch]
    return latents, rows, timesteps


def run(model, *args) -> torch.Tensor:
    with torch.no_grad():
        return model(*args).sample


def reference_pooled_attention(attn, x: torch.Tensor, grid: tuple[int, int], ratio: int):
    """softmax(Q · avgpool(K)ᵀ / √d) · avgpool(V) per head, then the output projection."""
    batch, n, c = x.shape
    heads, (h, w) = attn.heads, grid
    d = c // heads

    def pool(t: torch.Tensor) -> torch.Tensor:
        t = t.transpose(1, 2).reshape(batch, c, h, w)
        return F.avg_pool2d(t, ratio).flatten(2).transpose(1, 2)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, -1, heads, d).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(pool(attn.to_k(x))), split(pool(attn.to_v(x)))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, n, c)
    return attn.to_out[0](out)


def capture_attn1(model, block: int):
    """Record (input, output) of transformer_blocks[block].attn1 during a forward."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["y"] = output

    return seen, model.transformer_blocks[block].attn1.register_forward_hook(hook, with_kwargs=True)


def test_off_is_exactly_the_stock_processor() -> None:
    never = make_tiny()
    toggled = make_tiny()
    enable_kv_compression(toggled, ratio=2, blocks=[0, 1])
    assert any(isinstance(m, KVCompressionAttnProcessor) for m in toggled.modules())
    disable_kv_compression(toggled)
    for block in toggled.transformer_blocks:
        assert type(block.attn1.processor) is AttnProcessor2_0
        assert type(block.attn2.processor) is AttnProcessor2_0
    assert toggled.state_dict().keys() == never.state_dict().keys()
    assert toggled.config.kv_compress_ratio is None
    args = inputs(batch=3, height=16, width=24)
    assert (run(never, *args) - run(toggled, *args)).abs().max() <= 1e-6
    assert not toggled._forward_pre_hooks  # the grid hook is gone too


def test_fresh_model_is_off_by_default() -> None:
    model = make_tiny()
    assert model.config.kv_compress_ratio is None
    assert not any(isinstance(m, KVCompressionAttnProcessor) for m in model.modules())


@pytest.mark.parametrize(
    ("height", "width"),
    [(32, 48), (30, 46)],  # 16 x 24 token grid; 15 x 23 drops the last row and column
)
def test_on_at_init_equals_pooled_reference_on_non_square_grid(height, width) -> None:
    model = make_tiny()
    enable_kv_compression(model, ratio=2, blocks=[1], norm=False)
    args = inputs(batch=3, height=height, width=width)
    seen, handle = capture_attn1(model, block=1)
    out = run(model, *args)
    handle.remove()
    grid = (height // 2, width // 2)
    assert model.transformer_blocks[1].attn1.processor.grid == grid
    with torch.no_grad():
        attn = model.transformer_blocks[1].attn1
        reference = reference_pooled_attention(attn, seen["x"], grid, ratio=2)
        full = AttnProcessor2_0()(attn, seen["x"])
    assert seen["y"].shape == (3, grid[0] * grid[1], 64)
    assert (seen["y"] - reference).abs().max() <= 1e-5
    assert (seen["y"] - full).abs().max() > 1e-4  # compression does change attention
    assert out.shape == (3, 32, height, width)


def test_only_self_attention_of_chosen_blocks_is_compressed() -> None:
    model = make_tiny(num_layers=28)
    enable_kv_compression(model)  # default: second half, as PixArt-Σ's 1024 config
    chosen = list(range(14, 28))
    assert model.config.kv_compress_blocks == chosen
    assert model.config.kv_compress_ratio == 2 and model.config.kv_compress_norm is True
    for i, block in enumerate(model.transformer_blocks):
        kind = KVCompressionAttnProcessor if i in chosen else AttnProcessor2_0
        assert type(block.attn1.processor) is kind
        assert type(block.attn2.processor) is AttnProcessor2_0
    keys = [k for k in model.state_dict() if ".processor." in k]
    assert keys == [
        f"transformer_blocks.{i}.attn1.processor.{part}"
        for i in chosen
        for part in ("conv.weight", "conv.bias", "norm.weight", "norm.bias")
    ]
    conv = model.transformer_blocks[14].attn1.processor.conv
    assert conv.groups == 64 and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
    assert torch.all(conv.weight == 0.25) and torch.all(conv.bias == 0)


def test_gradients_reach_the_conv_and_norm() -> None:
    model = make_tiny().train()
    enable_kv_compression(model, blocks=[0, 1])
    latents, rows, t = inputs(height=16, width=24)
    model(latents, rows, t).sample.square().mean().backward()
    for block in model.transformer_blocks:
        processor = block.attn1.processor
        for param in (processor.conv.weight, processor.conv.bias, processor.norm.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0


def test_save_load_restores_compression_and_weights(tmp_path) -> None:
    model = make_tiny()
    enable_kv_compression(model, ratio=2, blocks=[1], norm=True)
    with torch.no_grad():  # move away from the init so loading is really checked
        for param in model.transformer_blocks[1].attn1.processor.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["kv_compress_ratio"], saved["kv_compress_blocks"]) == (2, [1])
    assert saved["kv_compress_norm"] is True

    loaded, info = PixCellTransformer2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert type(loaded.transformer_blocks[1].attn1.processor) is KVCompressionAttnProcessor
    assert type(loaded.transformer_blocks[0].attn1.processor) is AttnProcessor2_0
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    args = inputs(batch=2, height=16, width=24)
    assert torch.equal(run(model, *args), run(loaded.eval(), *args))
    # an in-memory copy from the config is compressed as well
    copy = PixCellTransformer2DModel.from_config(loaded.config)
    assert type(copy.transformer_blocks[1].attn1.processor) is KVCompressionAttnProcessor


def test_to_float64_moves_the_conv() -> None:
    model = make_tiny()
    enable_kv_compression(model, blocks=[1])
    model.to(torch.float64)
    processor = model.transformer_blocks[1].attn1.processor
    assert processor.conv.weight.dtype == torch.float64
    assert processor.norm.weight.dtype == torch.float64
    assert run(model, *inputs(dtype=torch.float64)).dtype == torch.float64


def test_parameter_count_tiny_and_pixcell_1024() -> None:
    model = make_tiny()
    enable_kv_compression(model, ratio=2, blocks=[1])
    c = 64
    count = kv_compression_parameter_count(model)
    assert count.extra == c * 2 * 2 + c + 2 * c  # depthwise conv + bias + LayerNorm
    assert count.total == sum(p.numel() for p in model.parameters())
    assert count.fraction == count.extra / count.total

    with torch.device("meta"):
        big = PixCellTransformer2DModel(
            **{
                **TINY,
                "num_layers": 28,
                "num_attention_heads": 16,
                "attention_head_dim": 72,
                "cross_attention_dim": 1152,
                "caption_channels": 1536,
                "sample_size": 128,
            }
        )
    enable_kv_compression(big)
    count = kv_compression_parameter_count(big)
    assert count.extra == 14 * (1152 * 4 + 1152 + 2 * 1152)
    assert 0.00017 < count.fraction < 0.00020  # ≈ 0.018 % of the model


def test_works_on_stock_pixart_and_square_fallback() -> None:
    torch.manual_seed(0)
    pixart = PixArtTransformer2DModel(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=32,
        cross_attention_dim=64,
        in_channels=4,
        out_channels=8,
        sample_size=8,
        caption_channels=32,
    ).eval()
    enable_kv_compression(pixart, ratio=2, norm=False)
    latents = torch.randn(1, 4, 8, 12)
    caption = torch.randn(1, 5, 32)
    with torch.no_grad():
        out = pixart(latents, caption, torch.tensor([3]), added_cond_kwargs=None).sample
    assert out.shape == (1, 8, 8, 12)
    # the attention layer alone: a square token count is read as a square grid
    attn = pixart.transformer_blocks[1].attn1
    attn.processor.grid = None
    x = torch.randn(2, 36, 64)
    with torch.no_grad():
        assert torch.allclose(attn(x), reference_pooled_attention(attn, x, (6, 6), 2), atol=1e-5)
    with pytest.raises(EngineError, match="token grid of 35 tokens"):
        attn(torch.randn(1, 35, 64))


def test_bad_settings_are_refused() -> None:
    model = make_tiny()
    with pytest.raises(EngineError, match="ratio >= 2"):
        enable_kv_compression(model, ratio=1)
    with pytest.raises(EngineError, match=r"blocks \[2\] outside 0..1"):
        enable_kv_compression(model, blocks=[1, 2])
    enable_kv_compression(model, ratio=4, blocks=[0])
    with pytest.raises(EngineError, match="smaller than ratio 4"):
        model(*inputs(height=4, width=16))
