"""Training and prediction of one downstream model on arrays (one fold, one arm).

Segmentation: images ``(N, H, W, 3)`` uint8, targets ``(N, H, W)`` bool (vessel), loss
BCE-with-logits + soft Dice. Classification: targets ``(N,)`` int (0 clean, 1 invasive),
loss cross-entropy. AdamW, ``lr`` constant; inputs scaled to [0, 1] and normalised with
ImageNet's mean / std. After every epoch the validation loss is measured and the weights
of the best epoch are kept (early-stopping by selection, the seed's protocol). The
augmentation arm draws a fresh :func:`~histosynth.synthesis.downstream.augment.augment`
copy of every training tile in every epoch. Seeded: same inputs and seed, same model
(on the CPU).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from histosynth.synthesis.downstream.augment import augment
from histosynth.synthesis.errors import EngineError

__all__ = ["TASKS", "TrainedModel", "predict", "train_model"]

TASKS = ("segmentation", "classification")
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class TrainedModel:
    """The model with its best epoch's weights, and the loss curves."""

    model: nn.Module
    task: str
    best_epoch: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


def _inputs(images: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(np.ascontiguousarray(images), device=device).permute(0, 3, 1, 2)
    x = x.float() / 255.0
    return (x - _MEAN.to(device)) / _STD.to(device)


def _loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return nn.functional.cross_entropy(output, target.long())
    logits = output[:, 0]
    target = target.float()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def _check(task: str, images: np.ndarray, targets: np.ndarray, what: str) -> None:
    if task not in TASKS:
        raise EngineError(f"unknown task {task!r}; one of {', '.join(TASKS)}", item="--task")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise EngineError(f"{what}: expected uint8 images (N, H, W, 3), got {images.shape}")
    if len(images) != len(targets):
        raise EngineError(f"{what}: {len(images)} images but {len(targets)} targets")
    if task == "segmentation" and targets.shape != images.shape[:3]:
        raise EngineError(f"{what}: masks {targets.shape} do not match the images")


def _epoch_losses(model, task, images, targets, batch_size, device) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = _inputs(images[i : i + batch_size], device)
            y = torch.as_tensor(targets[i : i + batch_size], device=device)
            total += float(_loss(task, model(x), y)) * len(x)
            count += len(x)
    return total / max(1, count)


def train_model(
    model: nn.Module,
    task: str,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    device: torch.device | str = "cpu",
    seed: int = 0,
    augmented: bool = False,
    progress: Callable[[Iterable, int], Iterable] | None = None,
) -> TrainedModel:
    """Train ``model`` for ``epochs`` on ``train`` = (images, targets), keeping the weights
    of the epoch with the lowest loss on ``val``; returns them loaded.

    Raises:
        EngineError: an unknown task, images / targets of the wrong shape, no training
            or no validation tiles, tiles whose sides are not multiples of 32 px
            (segmentation: the encoder halves them five times).
    """
    images, targets = train
    val_images, val_targets = val
    _check(task, images, targets, "training set")
    _check(task, val_images, val_targets, "validation set")
    if not len(images) or not len(val_images):
        raise EngineError("a fold needs training and validation tiles")
    if task == "segmentation" and (images.shape[1] % 32 or images.shape[2] % 32):
        raise EngineError(
            f"segmentation tiles must be multiples of 32 px, not {images.shape[2]}×"
            f"{images.shape[1]}"
        )
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    result = TrainedModel(model, task, best_epoch=0)
    best, best_state = math.inf, None
    batch_size = max(1, int(batch_size))
    epoch_iter: Iterable[int] = range(epochs)
    if progress is not None:
        epoch_iter = progress(epoch_iter, epochs)
    for epoch in epoch_iter:
        model.train()
        order = rng.permutation(len(images))
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2 and len(order) >= 2:  # BatchNorm needs two samples
                idx = np.concatenate([idx, order[:1]])
            batch_x, batch_y = images[idx], targets[idx]
            if augmented:
                pairs = [
                    augment(x, y if task == "segmentation" else None, rng)
                    for x, y in zip(batch_x, batch_y, strict=True)
                ]
                batch_x = np.stack([p[0] for p in pairs])
                if task == "segmentation":
                    batch_y = np.stack([p[1] for p in pairs])
            x = _inputs(batch_x, device)
            y = torch.as_tensor(np.ascontiguousarray(batch_y), device=device)
            optimiser.zero_grad(set_to_none=True)
            loss = _loss(task, model(x), y)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        result.train_loss.append(total / len(order))
        val_loss = _epoch_losses(model, task, val_images, val_targets, batch_size, device)
        result.val_loss.append(val_loss)
        if val_loss < best:
            best, result.best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def predict(
    model: nn.Module,
    task: str,
    images: np.ndarray,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Segmentation: bool masks ``(N, H, W)`` (logit > 0); classification: labels ``(N,)``."""
    device = torch.device(device)
    model = model.to(device).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), max(1, batch_size)):
            y = model(_inputs(images[i : i + batch_size], device))
            out.append((y[:, 0] > 0) if task == "segmentation" else y.argmax(1))
    if not out:
        return np.zeros((0, *images.shape[1:3]) if task == "segmentation" else (0,), bool)
    return torch.cat(out).cpu().numpy()
