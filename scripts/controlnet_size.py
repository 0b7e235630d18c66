"""Parameter count of the vessel-mask ControlNet at the PixCell-1024 shape (issue 29).

Builds :class:`~histosynth.synthesis.models.controlnet.PixCellControlNet` for the first N
blocks of PixCell-1024's transformer (``scripts/bench_engine.py``'s
``PIXCELL_1024_CONFIG``: 28 blocks, hidden 1152, 16 UNI rows × 1536, latents 128²) on the
meta device — no weights, no memory — and prints, for each N, the copied parameters (patch
/ timestep / UNI embeddings and N blocks), the new ones (mask encoder, zero projections)
and the total against the base transformer.

    python scripts/controlnet_size.py [--layers 7 14]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[7, 14])
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


if __name__ == "__main__":
    main()
