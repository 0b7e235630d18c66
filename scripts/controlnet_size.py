"""Parameter count and training memory of the vessel-mask ControlNet at the PixCell-1024
shape (issue 29).

Builds :class:`~histosynth.synthesis.models.controlnet.PixCellControlNet` for the first N
blocks of PixCell-1024's transformer (``scripts/bench_engine.py``'s
``PIXCELL_1024_CONFIG``: 28 blocks, hidden 1152, 16 UNI rows × 1536, latents 128²) on the
meta device — no weights, no memory — and prints, for each N, the copied parameters (patch
/ timestep / UNI embeddings and N blocks), the new ones (mask encoder, zero projections)
and the total against the base transformer.

Training memory, estimated on the meta device (shapes and dtypes only, no allocation):
the frozen base's weights (float32), the ControlNet's weights, gradients and AdamW state
(float32: 16 bytes per parameter), and the activations autograd saves for the backward
pass of one training forward (base + ControlNet, batch ``--batch-size`` at 1024², the
trainer's ``ControlledTransformer``), summed by ``torch.autograd.graph.saved_tensors_hooks``
over every saved tensor (float32, no autocast; KV-compression R = 2 on PixCell's second
half). Each saved tensor counts once per save (views of one buffer saved twice count twice:
an upper bound). The meta device runs SDPA's math kernel, which keeps each N × M attention
matrix (as [B, heads, N, M] and [B·heads, N, M]); a fused kernel (flash /
memory-efficient SDPA, xFormers — what CUDA uses) keeps none, so they are reported apart.
It is the peak of a step to within the transient buffers of the backward pass; the CUDA
peak is measured by ``scripts/bench_train.py --size pixcell-1024`` (its ControlNet row)
when a GPU is present.

    python scripts/controlnet_size.py [--layers 7 14] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch

from histosynth.synthesis.models.controlnet import (
    PixCellControlNet,
    controlnet_config_from_transformer,
)
from histosynth.synthesis.models.transformer import PixCellTransformer2DModel

NEW_PARTS = ("mask_embedding.", "mask_projection.", "controlnet_blocks.")


def pixcell_1024_config() -> dict[str, Any]:
    """PixCell-1024's transformer config, from ``scripts/bench_engine.py``."""
    path = Path(__file__).resolve().with_name("bench_engine.py")
    spec = importlib.util.spec_from_file_location("histosynth_bench_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.PIXCELL_1024_CONFIG)


def count_parameters(num_layers: int, config: dict[str, Any]) -> dict[str, int]:
    """Parameters of the ControlNet of ``num_layers`` blocks: copied, new and total."""
    with torch.device("meta"):
        controlnet = PixCellControlNet(**controlnet_config_from_transformer(config, num_layers))
    counts = {"copied": 0, "new": 0}
    for name, parameter in controlnet.named_parameters():
        counts["new" if name.startswith(NEW_PARTS) else "copied"] += parameter.numel()
    counts["total"] = counts["copied"] + counts["new"]
    return counts


def training_memory(num_layers: int, config: dict[str, Any], batch: int) -> dict[str, float]:
    """GB of one training step's parts (see the module docstring), on the meta device."""
    from histosynth.synthesis.models.kv_compression import enable_kv_compression
    from histosynth.synthesis.pipelines.control import ControlledTransformer

    with torch.device("meta"):
        base = PixCellTransformer2DModel(**config)
        blocks = int(config["num_layers"])
        enable_kv_compression(base, ratio=2, blocks=list(range(blocks // 2, blocks)))
        controlnet = PixCellControlNet.from_transformer(base, num_layers=num_layers)
    base.requires_grad_(False)
    pair = ControlledTransformer(base, controlnet).train()
    side, tokens = int(config["sample_size"]), int(config["caption_num_tokens"])
    sequence = (side // int(config["patch_size"])) ** 2
    saved: dict[int, int] = {}
    matrices: dict[int, int] = {}  # attention probabilities [B, heads, N, M]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        shape = tuple(tensor.shape)
        if len(shape) >= 3 and shape[-2] == sequence and shape[-1] in (sequence, sequence // 4):
            matrices[id(tensor)] = size
        else:
            saved[id(tensor)] = size
        return tensor

    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = pair(
            torch.randn(batch, int(config["in_channels"]), side, side),
            torch.randn(batch, tokens, int(config["caption_channels"])),
            torch.full((batch,), 500),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            controlnet_cond=torch.zeros(batch, 1, side * 8, side * 8),
        )[0]
    del out
    gb = 1e9
    base_bytes = sum(p.numel() * 4 for p in base.parameters())
    trained = sum(p.numel() for p in controlnet.parameters())
    return {
        "base_weights": base_bytes / gb,
        "controlnet_weights_grads_adam": trained * 16 / gb,
        "activations": sum(saved.values()) / gb,
        "attention_matrices": sum(matrices.values()) / gb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[7, 14])
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    config = pixcell_1024_config()
    with torch.device("meta"):
        base = sum(p.numel() for p in PixCellTransformer2DModel(**config).parameters())
    print(f"PixCell-1024 transformer: {base:,} parameters ({base / 1e6:.1f} M)")
    for layers in args.layers:
        counts = count_parameters(layers, config)
        print(
            f"ControlNet {layers:2d} layers: {counts['total']:,} parameters "
            f"({counts['total'] / 1e6:.1f} M, {counts['total'] / base:.1%} of the base): "
            f"copied {counts['copied'] / 1e6:.1f} M, new {counts['new'] / 1e6:.2f} M "
            f"(mask encoder + zero projections)"
        )
        memory = training_memory(layers, config, args.batch_size)
        matrices = memory.pop("attention_matrices")
        total = sum(memory.values())
        print(
            f"  training, batch {args.batch_size} at 1024², float32 (meta-device estimate): "
            f"base weights {memory['base_weights']:.1f} GB + ControlNet weights/grads/AdamW "
            f"{memory['controlnet_weights_grads_adam']:.1f} GB + saved activations "
            f"{memory['activations']:.1f} GB = {total:.1f} GB with a fused attention kernel "
            f"(flash / memory-efficient SDPA, xFormers); the math kernel keeps the "
            f"attention matrices too: +{matrices:.1f} GB"
        )


if __name__ == "__main__":
    main()
