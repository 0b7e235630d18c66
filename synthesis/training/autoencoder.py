"""Training a small ``AutoencoderKL`` on uint8 RGB tiles (the trained default engine's VAE).

:func:`train_autoencoder` fits a diffusers ``AutoencoderKL`` to random crops of a few
images, each crop in one of the 8 flips / rotations: loss = L1 on pixels in [-1, 1]
+ ``grad_weight`` × L1 on the horizontal and vertical pixel differences (keeps edges and
nuclear texture sharp) + ``kl_weight`` × the mean KL of the posterior to N(0, I). AdamW,
gradient clipping, a linear decay of the learning rate to ``lr × final_lr_ratio``.

Every random number of step ``k`` (which image, the crop window, the flip / rotation, the
posterior draw) comes from a generator seeded with ``(seed, k)``, so a run that is cut off
and resumed from its checkpoint (``work_dir/autoencoder-checkpoint.pt``: weights,
optimiser, step, loss history, written atomically every ``checkpoint_every`` steps)
ends with the same weights as an uninterrupted run (bit for bit on the CPU).

:func:`normalise_latents` folds per-channel latent statistics into the VAE's
``quant_conv`` / ``post_quant_conv`` so that the *scaled* latents the denoiser sees,
``(z − shift_factor) · scaling_factor``, have mean 0 and standard deviation 1 per channel
for the VAE's own (fixed) scale and shift — the reconstruction is unchanged.

:func:`reconstruction_metrics` measures PSNR and the high-frequency energy ratio
(grey − Gaussian(σ = 1.5 px), reconstruction over original: 1 = as sharp, blur → 0).

Example:
    >>> vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=(
    ...     "DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ...     latent_channels=4, norm_num_groups=8)                        # doctest: +SKIP
    >>> stats = train_autoencoder(vae, [image], steps=100, crop=64)     # doctest: +SKIP
    >>> reconstruction_metrics(vae, [held_out])                         # doctest: +SKIP
    {'psnr': 27.1, 'hf_ratio': 0.81, 'mean_abs_error': 0.025}
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from histosynth.common.files import atomic_write_with
from histosynth.synthesis.errors import EngineError

__all__ = [
    "CHECKPOINT_FILE",
    "dihedral",
    "normalise_latents",
    "reconstruction_metrics",
    "train_autoencoder",
]

CHECKPOINT_FILE = "autoencoder-checkpoint.pt"
_HF_SIGMA = 1.5


def dihedral(x: Tensor, k: int) -> Tensor:
    """One of the 8 flips / rotations of ``x`` [..., H, W]: ``k`` in 0–7 (0 = as is)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def _as_tensors(images: Sequence[np.ndarray] | np.ndarray) -> list[Tensor]:
    """uint8 RGB ``(H, W, 3)`` images → float32 ``[3, H, W]`` in [-1, 1]."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    out = []
    for image in images:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise EngineError(
                f"expected uint8 RGB images (H, W, 3), found {array.dtype} {array.shape}",
                item="images",
            )
        out.append(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
                   / 127.5 - 1)
    if not out:
        raise EngineError("no images to train on", item="images")
    return out


def _batch(
    images: list[Tensor], step: int, *, batch_size: int, crop: int, seed: int
) -> tuple[Tensor, torch.Generator]:
    """The crops of step ``step`` and the generator of its posterior draw."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))
    crops = []
    weights = torch.tensor([im.shape[1] * im.shape[2] for im in images], dtype=torch.float64)
    for _ in range(batch_size):
        i = int(torch.multinomial(weights, 1, generator=g))
        image = images[i]
        h, w = image.shape[1:]
        top = int(torch.randint(0, h - crop + 1, (1,), generator=g))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=g))
        k = int(torch.randint(0, 8, (1,), generator=g))
        crops.append(dihedral(image[:, top : top + crop, left : left + crop], k))
    return torch.stack(crops), g


def _gradient_l1(a: Tensor, b: Tensor) -> Tensor:
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_with(path, lambda tmp: torch.save(state, tmp))


def _check_run(vae: torch.nn.Module, tensors: list[Tensor], *, steps: int, crop: int) -> None:
    """:class:`EngineError` for a step count or crop the VAE cannot take, or images
    smaller than the crop."""
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if int(steps) != steps or steps < 1:
        raise EngineError(f"expected a positive number of steps, got {steps}", item="steps")
    if crop < down or crop % down:
        raise EngineError(f"expected a crop that is a multiple of {down} px, got {crop}",
                          item="crop")
    small = [tuple(t.shape[1:]) for t in tensors if min(t.shape[1:]) < crop]
    if small:
        raise EngineError(f"images of {small[0]} px are smaller than the {crop} px crop",
                          item="images")


def _resume(
    checkpoint: Path | None,
    vae: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: dict[str, Any],
    device: torch.device,
) -> tuple[int, list[dict[str, Any]], float]:
    """(step, history, seconds run before) of ``checkpoint``, its weights and optimiser
    state loaded (it must have ``settings``); ``(0, [], 0.0)`` when there is none yet."""
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["settings"] != settings:
            differ = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            raise EngineError(f"the checkpoint was made with other settings ({', '.join(differ)})",
                              path=checkpoint)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), list(state["history"]), float(state.get("seconds", 0.0))
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    return 0, [], 0.0


def _loss_terms(
    vae: torch.nn.Module, x: Tensor, g: torch.Generator, *, decoder_only: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(pixel L1, gradient L1, KL) of reconstructing ``x`` from a posterior draw taken
    with ``g``; no gradient through the encoder when ``decoder_only``."""
    with torch.set_grad_enabled(not decoder_only):
        dist = vae.encode(x).latent_dist
    eps = torch.randn(dist.mean.shape, generator=g).to(x.device)
    z = dist.mean + dist.std * eps
    y = vae.decode(z).sample
    l1 = (y - x).abs().mean()
    grad = _gradient_l1(y, x)
    kl = 0.5 * (dist.mean.square() + dist.var - 1 - dist.logvar).mean()
    return l1, grad, kl


def train_autoencoder(
    vae: torch.nn.Module,
    images: Sequence[np.ndarray] | np.ndarray,
    *,
    steps: int,
    batch_size: int = 8,
    crop: int = 64,
    lr: float = 1e-3,
    final_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    grad_weight: float = 0.5,
    kl_weight: float = 1e-6,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    work_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    max_seconds: float | None = None,
    log_every: int = 10,
    progress: Callable[[dict[str, Any]], None] | None = None,
    decoder_only: bool = False,
) -> dict[str, Any]:
    """Train ``vae`` (a diffusers ``AutoencoderKL``, float32, CPU or CUDA) in place.

    Args:
        images: uint8 RGB ``(H, W, 3)`` arrays, each at least ``crop`` px on both sides;
            an image is chosen with probability proportional to its area.
        steps: optimiser steps of the whole run (the learning-rate decay spans them).
        crop: side of the random square crops, px (a multiple of the VAE's down-sampling).
        grad_weight / kl_weight: weights of the gradient-L1 and KL terms.
        work_dir: where the checkpoint goes; an existing checkpoint there is resumed
            (it must come from a run with the same settings). ``None``: no checkpoint.
        max_seconds: stop early (after a checkpoint) when this much wall time has passed;
            the returned ``steps`` says how far it got, and a later call resumes.
        progress: called with each logged record (``step``, ``loss``, ``l1``, ``grad``,
            ``kl``, ``lr``, ``seconds``).
        decoder_only: train ``post_quant_conv`` and the decoder only; the encoder (and so
            every latent a denoiser was trained on) stays bit for bit as it is.

    Returns:
        ``{"steps", "completed", "seconds", "history": [records], "final_loss"}``;
        ``final_loss`` is the mean loss over the last (up to) 50 steps run.

    Raises:
        EngineError: bad settings, images smaller than the crop, or a checkpoint of a run
            with other settings.
    """
    tensors = _as_tensors(images)
    _check_run(vae, tensors, steps=steps, crop=crop)
    device = next(vae.parameters()).device
    settings = {"steps": int(steps), "batch_size": int(batch_size), "crop": int(crop),
                "lr": float(lr), "final_lr_ratio": float(final_lr_ratio),
                "weight_decay": float(weight_decay), "grad_weight": float(grad_weight),
                "kl_weight": float(kl_weight), "max_grad_norm": float(max_grad_norm),
                "seed": int(seed), "images": [list(t.shape) for t in tensors],
                "decoder_only": bool(decoder_only)}
    vae.train().requires_grad_(True)
    if decoder_only:
        vae.encoder.requires_grad_(False).eval()
        vae.quant_conv.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        return lr * (1 - (1 - final_lr_ratio) * step / max(1, steps))

    checkpoint = Path(work_dir) / CHECKPOINT_FILE if work_dir is not None else None
    start, history, seconds_before = _resume(checkpoint, vae, optimizer, settings, device)

    began = time.perf_counter()
    recent: list[float] = []
    step = start

    def save() -> None:
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "settings": settings, "model": vae.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "history": history,
                "seconds": seconds_before + time.perf_counter() - began,
            })

    while step < steps:
        x, g = _batch(tensors, step, batch_size=batch_size, crop=crop, seed=seed)
        x = x.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        l1, grad, kl = _loss_terms(vae, x, g, decoder_only=decoder_only)
        loss = l1 + grad_weight * grad + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        step += 1
        recent = [*recent, loss.item()][-50:]
        if step % log_every == 0 or step == steps:
            record = {"step": step, "loss": loss.item(), "l1": l1.item(),
                      "grad": grad.item(),
                      "kl": kl.item(), "lr": lr_at(step - 1),
                      "seconds": round(seconds_before + time.perf_counter() - began, 2)}
            history.append(record)
            if progress is not None:
                progress(record)
        out_of_time = (max_seconds is not None
                       and time.perf_counter() - began >= max_seconds)
        if step % checkpoint_every == 0 or step == steps or out_of_time:
            save()
        if out_of_time:
            break
    vae.eval().requires_grad_(False)
    return {
        "steps": step,
        "completed": step >= steps,
        "seconds": round(seconds_before + time.perf_counter() - began, 2),
        "history": history,
        "final_loss": float(np.mean(recent)) if recent else None,
    }


# --------------------------------------------------------------------------- latents


@torch.no_grad()
def normalise_latents(
    vae: torch.nn.Module, images: Sequence[np.ndarray] | np.ndarray
) -> dict[str, list[float]]:
    """Make the scaled latents of ``images`` mean 0, std 1 per channel, in place.

    The posterior means ``μ`` of the images give per-channel mean ``m`` and std ``s``;
    ``quant_conv`` is changed so that it outputs ``μ' = (μ − m) / (s · scale) + shift`` and
    ``log σ'² = log σ² − 2 log(s · scale)``, and ``post_quant_conv`` so that it first maps
    ``μ'`` back to ``μ`` — the decoder sees what it saw before. Needs ``quant_conv`` and
    ``post_quant_conv`` (diffusers' default). Returns ``{"mean": m, "std": s}`` (before).
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise EngineError("the VAE has no quant_conv / post_quant_conv to fold the scale into")
    scale = float(vae.config.scaling_factor)
    shift = float(vae.config.shift_factor or 0.0)
    device = next(vae.parameters()).device
    means = []
    for x in _as_tensors(images):
        means.append(vae.encode(x[None].to(device)).latent_dist.mean[0].flatten(1))
    mu = torch.cat(means, dim=1)
    m, s = mu.mean(dim=1), mu.std(dim=1).clamp_min(1e-6)
    a = 1.0 / (s * scale)  # μ' = a (μ − m) + shift
    c = a.numel()
    qc = vae.quant_conv  # 1×1 conv 2C → 2C: [mean | logvar]
    w, b = qc.weight.data, qc.bias.data
    w[:c] *= a.view(-1, 1, 1, 1)
    b[:c] = a * (b[:c] - m) + shift
    b[c:] -= 2 * torch.log(s * scale)
    pq = vae.post_quant_conv  # z = (z' − shift) / a + m, then the old 1×1 conv
    inv = 1.0 / a
    w2, b2 = pq.weight.data, pq.bias.data
    b2 += (w2[:, :, 0, 0] @ (m - shift * inv))
    w2 *= inv.view(1, -1, 1, 1)
    return {"mean": m.tolist(), "std": s.tolist()}


# --------------------------------------------------------------------------- metrics


def _hf(grey: np.ndarray) -> np.ndarray:
    import cv2

    return grey - cv2.GaussianBlur(grey, (0, 0), _HF_SIGMA)


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The VAE's reconstruction (posterior mean) of a uint8 RGB image, uint8, same size.

    Sides that are not multiples of the down-sampling are reflect-padded, then cropped.
    """
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    x = _as_tensors([image])[0][None]
    h, w = x.shape[-2:]
    ph, pw = (-h) % down, (-w) % down
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    device = next(vae.parameters()).device
    y = vae.decode(vae.encode(x.to(device)).latent_dist.mean).sample[0, :, :h, :w]
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def reconstruction_metrics(
    vae: torch.nn.Module, images: Sequence[np.ndarray] | np.ndarray
) -> dict[str, float]:
    """PSNR (dB, over all pixels of all images), HF ratio and mean absolute error (0–1).

    HF ratio: the energy of grey − Gaussian(σ = 1.5 px) of the reconstructions over that
    of the originals (1 = as sharp as the input; blur → 0; noise → > 1).
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    was_training = vae.training
    vae.eval()
    se, ae, n, hf_rec, hf_orig = 0.0, 0.0, 0, 0.0, 0.0
    for image in images:
        rec = reconstruct(vae, image)
        a, b = image.astype(np.float64) / 255, rec.astype(np.float64) / 255
        se += float(((a - b) ** 2).sum())
        ae += float(np.abs(a - b).sum())
        n += a.size
        ga = a.mean(axis=2).astype(np.float32)
        gb = b.mean(axis=2).astype(np.float32)
        hf_orig += float((_hf(ga) ** 2).sum())
        hf_rec += float((_hf(gb) ** 2).sum())
    vae.train(was_training)
    mse = se / max(n, 1)
    return {
        "psnr": 10 * math.log10(1 / mse) if mse > 0 else float("inf"),
        "hf_ratio": hf_rec / hf_orig if hf_orig > 0 else float("nan"),
        "mean_abs_error": ae / max(n, 1),
    }
