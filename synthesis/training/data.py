"""Which sample each process trains on at each step, and the random numbers it draws.

Everything random in a training run is a function of ``(seed, step, position)``, never of
a global RNG: the split of the samples into training and validation, the data order (one
fresh permutation per epoch, epochs concatenated into one stream), and for each sample its
posterior draw, crop window, noise, timestep and condition dropout (one
``torch.Generator`` per sample). So

* a run resumed from a checkpoint at step k continues exactly as if uninterrupted, with
  nothing to restore but the weights and the optimiser;
* one process with batch 2B and two processes with batch B see the same samples with the
  same noise at every step (the process index only decides who computes which half).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "EncodedSamples",
    "collate",
    "sample_generator",
    "split_indices",
    "step_indices",
    "verified_checksum",
]


class EncodedSamples(Protocol):
    """What the trainer reads: a cache (``CacheDataset``) or on-the-fly encoding.

    ``sample(i, generator)`` returns ``{"latents": float32 [C, h, w] (scaled),
    "rows": float32 [tokens, dim], "tile_id": str, ...}``, drawing every random number
    (posterior sample, crop window) from ``generator``.
    """

    def __len__(self) -> int: ...

    def sample(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]: ...


def _seed_of(*parts: object) -> int:
    """A 63-bit seed from any tuple of values (stable across runs and machines)."""
    text = "\0".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def sample_generator(seed: int, *where: object) -> torch.Generator:
    """A CPU generator for one sample draw at ``where`` (e.g. ``"train", epoch, position``)."""
    return torch.Generator(device="cpu").manual_seed(_seed_of("histosynth-train", seed, *where))


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, validation)`` indices of ``count`` samples, a seeded split.

    The validation part is ``round(count × val_fraction)`` samples, at least one when
    ``val_fraction > 0`` and ``count >= 2``; both lists are sorted.
    """
    n_val = round(count * val_fraction)
    if val_fraction > 0 and count >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, count - 1) if count else 0
    order = torch.randperm(count, generator=sample_generator(seed, "split", count)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def _epoch_order(train: Sequence[int], seed: int, epoch: int) -> list[int]:
    perm = torch.randperm(len(train), generator=sample_generator(seed, "order", epoch))
    return [train[i] for i in perm.tolist()]


def step_indices(
    train: Sequence[int],
    *,
    seed: int,
    step: int,
    micro: int,
    batch_size: int,
    grad_accum: int,
    processes: int,
    rank: int,
) -> list[tuple[int, int, int]]:
    """The samples of one forward: ``[(index, epoch, position), ...]`` of length ``batch_size``.

    Optimiser step ``step`` (0-based) consumes ``batch_size × processes × grad_accum``
    consecutive samples of the stream; micro-batch ``micro`` of process ``rank`` takes
    its ``batch_size`` of them. ``position`` is the sample's place in its epoch's order.
    """
    per_step = batch_size * processes * grad_accum
    first = step * per_step + micro * batch_size * processes + rank * batch_size
    out = []
    cache: dict[int, list[int]] = {}
    n = len(train)
    for offset in range(first, first + batch_size):
        epoch, position = divmod(offset, n)
        if epoch not in cache:
            cache[epoch] = _epoch_order(train, seed, epoch)
        out.append((cache[epoch][position], epoch, position))
    return out


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``latents`` and ``rows`` of samples into ``[B, …]`` tensors; lists for the rest."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def verified_checksum(data: Any, given: str) -> str:
    """The training-data checksum a trained model records: from a cache the one computed
    from its data (``verified_content_hash()``, which verifies every sample training did
    not read), for other data ``given``."""
    verified = getattr(data, "verified_content_hash", None)
    return verified() if callable(verified) else given
