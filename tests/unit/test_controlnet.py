"""The vessel-mask ControlNet for the PixCell transformer (issue 29, the model).

Tiny sizes: the tiny engine's transformer config at 64 px tiles (8×8 latents, 16 tokens).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.controlnet import PixCellControlNet
from histosynth.synthesis.models.kv_compression import (
    KVCompressionAttnProcessor,
    enable_kv_compression,
)
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel
from histosynth.synthesis.tiny_models import tiny_transformer_config

SMALL_MASK_ENCODER = (4, 8, 8, 16)


def make_base(num_layers: int = 3, seed: int = 0) -> PixCellTransformer2DModel:
    torch.manual_seed(seed)
    config = {**tiny_transformer_config(64), "num_layers": num_layers}
    return PixCellTransformer2DModel(**config).eval()


def make_inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 16, 8, 8, generator=generator),
        "rows": torch.randn(batch, 16, 32, generator=generator),
        "timestep": torch.tensor([500, 20][:batch]),
        "mask": (torch.rand(batch, 1, 64, 64, generator=generator) > 0.5).float(),
    }


def controlled(
    base: PixCellTransformer2DModel,
    controlnet: PixCellControlNet,
    inputs: dict[str, torch.Tensor],
    scale: float = 1.0,
) -> torch.Tensor:
    residuals = controlnet(
        inputs["latents"], inputs["timestep"], inputs["rows"], inputs["mask"], scale
    )
    return base(
        inputs["latents"], inputs["rows"], inputs["timestep"], block_residuals=residuals
    ).sample


def plain(base: PixCellTransformer2DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return base(inputs["latents"], inputs["rows"], inputs["timestep"]).sample


def perturb_zero_projections(controlnet: PixCellControlNet, seed: int = 2) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in [controlnet.mask_projection, *controlnet.controlnet_blocks]:
            for parameter in module.parameters():
                parameter.normal_(0.0, 0.05)


def test_fresh_controlnet_leaves_the_base_output_unchanged() -> None:
    base = make_base()
    controlnet = PixCellControlNet.from_transformer(
        base, num_layers=2, mask_encoder_channels=SMALL_MASK_ENCODER
    )
    inputs = make_inputs()
    with torch.no_grad():
        residuals = controlnet(
            inputs["latents"], inputs["timestep"], inputs["rows"], inputs["mask"]
        )
        assert len(residuals) == 2
        assert all(r.shape == (2, 16, 64) for r in residuals)
        assert torch.equal(controlled(base, controlnet, inputs), plain(base, inputs))


def test_trained_controlnet_changes_the_output_and_scale_zero_undoes_it() -> None:
    base = make_base()
    controlnet = PixCellControlNet.from_transformer(
        base, num_layers=2, mask_encoder_channels=SMALL_MASK_ENCODER
    )
    perturb_zero_projections(controlnet)
    inputs = make_inputs()
    with torch.no_grad():
        reference = plain(base, inputs)
        changed = controlled(base, controlnet, inputs)
        assert (changed - reference).abs().max() > 1e-3
        other_mask = {**inputs, "mask": 1.0 - inputs["mask"]}
        assert not torch.allclose(controlled(base, controlnet, other_mask), changed)
        assert torch.equal(controlled(base, controlnet, inputs, scale=0.0), reference)


def test_from_transformer_copies_the_first_blocks_and_embeddings() -> None:
    base = make_base(num_layers=3)
    controlnet = PixCellControlNet.from_transformer(base, num_layers=2)
    base_state = base.state_dict()
    copied = 0
    for name, tensor in controlnet.state_dict().items():
        if name.startswith(("mask_embedding.", "mask_projection.", "controlnet_blocks.")):
            continue
        assert torch.equal(tensor, base_state[name]), name
        copied += 1
    blocks = {n.split(".")[1] for n in controlnet.state_dict() if n.startswith("transformer_")}
    assert blocks == {"0", "1"}
    assert copied > 20
    zero = [controlnet.mask_projection, *controlnet.controlnet_blocks]
    assert all(not p.any() for module in zero for p in module.parameters())
    assert controlnet.mask_embedding[0].weight.abs().sum() > 0  # the mask encoder is learned
    with pytest.raises(EngineError, match=r"1\.\.3 layers"):
        PixCellControlNet.from_transformer(base, num_layers=4)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    base = make_base()
    enable_kv_compression(base, ratio=2, blocks=[1, 2])
    controlnet = PixCellControlNet.from_transformer(
        base, num_layers=2, mask_encoder_channels=SMALL_MASK_ENCODER
    )
    perturb_zero_projections(controlnet)
    controlnet.save_pretrained(tmp_path / "controlnet")
    loaded = PixCellControlNet.from_pretrained(tmp_path / "controlnet").eval()
    assert loaded.config.num_layers == 2
    assert loaded.config.kv_compress_blocks == [1]
    assert isinstance(loaded.transformer_blocks[1].attn1.processor, KVCompressionAttnProcessor)
    inputs = make_inputs()
    with torch.no_grad():
        expected = controlled(base, controlnet, inputs)
        assert torch.equal(controlled(base, loaded, inputs), expected)


def test_kv_compression_of_the_transformer_carries_to_the_copied_blocks() -> None:
    base = make_base()
    enable_kv_compression(base, ratio=2, blocks=[0, 2])
    with torch.no_grad():  # a trained conv, not the average-pooling start
        base.transformer_blocks[0].attn1.processor.conv.weight.mul_(1.5)
    controlnet = PixCellControlNet.from_transformer(
        base, num_layers=2, mask_encoder_channels=SMALL_MASK_ENCODER
    )
    processor = controlnet.transformer_blocks[0].attn1.processor
    assert isinstance(processor, KVCompressionAttnProcessor)
    assert torch.equal(
        processor.conv.weight, base.transformer_blocks[0].attn1.processor.conv.weight
    )
    assert not isinstance(
        controlnet.transformer_blocks[1].attn1.processor, KVCompressionAttnProcessor
    )
    inputs = make_inputs()
    with torch.no_grad():
        assert torch.equal(controlled(base, controlnet, inputs), plain(base, inputs))


def test_mask_of_the_wrong_size_is_one_line() -> None:
    base = make_base()
    controlnet = PixCellControlNet.from_transformer(
        base, num_layers=1, mask_encoder_channels=SMALL_MASK_ENCODER
    )
    inputs = make_inputs()
    with pytest.raises(EngineError) as caught:
        controlnet(inputs["latents"], inputs["timestep"], inputs["rows"], torch.zeros(2, 1, 32, 64))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("mask: expected a vessel mask [2, 1, 64, 64]")
    assert "[2, 1, 32, 64]" in message
    # a [B, H, W] mask of the right size is accepted
    residuals = controlnet(
        inputs["latents"], inputs["timestep"], inputs["rows"], inputs["mask"][:, 0]
    )
    assert len(residuals) == 1


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    inputs = make_inputs()

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        base = make_base()
        if checkpointing:
            base.enable_gradient_checkpointing()
        controlnet = PixCellControlNet.from_transformer(
            base, num_layers=2, mask_encoder_channels=SMALL_MASK_ENCODER
        )
        assert controlnet.gradient_checkpointing is checkpointing
        perturb_zero_projections(controlnet)
        base.requires_grad_(False)
        controlled(base, controlnet, inputs).square().mean().backward()
        return {n: p.grad for n, p in controlnet.named_parameters()}

    off, on = gradients(False), gradients(True)
    assert off.keys() == on.keys()
    assert all(off[n] is not None for n in off)
    assert off["mask_embedding.0.weight"].abs().sum() > 0
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-7, msg=name)


def test_no_residuals_is_the_plain_forward() -> None:
    base = make_base()
    inputs = make_inputs()
    with torch.no_grad():
        reference = plain(base, inputs)
        zeros = [torch.zeros(2, 16, 64) for _ in range(3)]
        args = (inputs["latents"], inputs["rows"], inputs["timestep"])
        assert torch.equal(base(*args, block_residuals=zeros).sample, reference)
        assert torch.equal(base(*args, block_residuals=zeros[:1]).sample, reference)
        assert torch.equal(base(*args, block_residuals=None).sample, reference)
        ones = [torch.ones(2, 16, 64)]
        assert not torch.equal(base(*args, block_residuals=ones).sample, reference)
        assert torch.equal(plain(base, inputs), reference)  # the hooks are gone after a call
        with pytest.raises(EngineError, match="at most 3 block residuals"):
            base(*args, block_residuals=zeros * 2)


@pytest.mark.parametrize("index", [0, 2])
def test_residual_i_is_added_after_block_i(index: int) -> None:
    base = make_base(num_layers=3)
    inputs = make_inputs()
    residual = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    args = (inputs["latents"], inputs["rows"], inputs["timestep"])
    handle = base.transformer_blocks[index].register_forward_hook(
        lambda _module, _args, output: output + residual
    )
    with torch.no_grad():
        expected = base(*args).sample
        handle.remove()
        residuals = [torch.zeros_like(residual)] * index + [residual]
        assert torch.equal(base(*args, block_residuals=residuals).sample, expected)
