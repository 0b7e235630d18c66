"""Conditioning encoders: a tile → one embedding row per 256² crop.

Every encoder has one interface, ``encode(images) -> Tensor[B, rows, dim]``:

* ``images`` are RGB, either numpy arrays channels-last, ``(H, W, 3)`` or ``(B, H, W, 3)``,
  or torch tensors channels-first, ``(3, H, W)`` or ``(B, 3, H, W)``; ``uint8`` in 0–255
  or floats in [0, 1] (see :func:`image_batch`).
* The tile is cut row-major into a grid of ``crop``² crops (256² by default): a 1024²
  tile gives 16 rows, row ``r * 4 + c`` being the crop in grid row ``r``, column ``c``;
  512² → 4 rows, 256² → 1 row (this is how PixCell conditions on UNI2-h).
* Each crop is resized to 224² (bilinear with antialiasing, UNI's ``pretrained_cfg``
  interpolation; ``torch.nn.functional.interpolate(..., antialias=True)``, the same
  kernel torchvision's ``Resize`` uses on tensors) and normalised with the ImageNet
  mean and std.

Encoders are diffusers ``ModelMixin, ConfigMixin`` models (like the transformer and the
VAE): move them with ``.to(device, dtype)``; ``encode`` runs under ``torch.no_grad`` on
the module's device and returns rows in its dtype. :class:`TinyEncoder` saves and loads
as one folder (``save_pretrained`` / ``from_pretrained``: ``config.json`` +
``diffusion_pytorch_model.safetensors``); UNI2-h keeps MahmoodLab's checkpoint format.

* :class:`UNIEncoder` wraps a timm model; :func:`build_uni2h` builds UNI2-h (ViT-H/14,
  1536-d rows) and loads its weights offline.
* :class:`TinyEncoder` is an UNTRAINED stand-in with the same interface for tests and
  the demo: a seeded random projection of per-crop colour and texture statistics.

Example:
    >>> import numpy as np
    >>> enc = TinyEncoder(dim=8)
    >>> enc.encode(np.zeros((512, 512, 3), np.uint8)).shape
    torch.Size([1, 4, 8])
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from histosynth.synthesis.config_limits import check_weights_finite
from histosynth.synthesis.errors import EngineError

__all__ = [
    "UNI2H_ARCHITECTURE",
    "GridEncoder",
    "TinyEncoder",
    "UNIEncoder",
    "build_uni2h",
    "create_uni2h",
    "image_batch",
    "load_checkpoint",
    "load_state_strict",
    "uni2h_kwargs",
    "uni_grid_crops",
]

CROP = 256
"""Side of one conditioning crop, px at the tile's resolution."""
UNI_INPUT = 224
"""Side of the encoder's input, px."""
UNI2H_ARCHITECTURE = "vit_giant_patch14_224"
"""timm base name UNI2-h is created from (its kwargs override the size)."""

ImageInput = np.ndarray | Tensor | Sequence[np.ndarray]


# --------------------------------------------------------------------------- images


def image_batch(images: ImageInput, *, name: str = "images") -> Tensor:
    """RGB images as a float32 tensor ``[B, 3, H, W]`` in [0, 1].

    Args:
        images: numpy ``(H, W, 3)`` / ``(B, H, W, 3)`` (or a list of ``(H, W, 3)``),
            or torch ``(3, H, W)`` / ``(B, 3, H, W)``; ``uint8`` 0–255 or floats in [0, 1].
        name: what to call the input in an error.

    Raises:
        EngineError: another shape, dtype or value range.
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise EngineError(
                f"expected RGB numpy images (H, W, 3) or (B, H, W, 3), found {images.shape}",
                item=name,
            )
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif isinstance(images, Tensor):
        tensor = images[None] if images.ndim == 3 else images
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise EngineError(
                "expected RGB tensors (3, H, W) or (B, 3, H, W), "
                f"found {tuple(images.shape)}",
                item=name,
            )
    else:
        raise EngineError(f"expected a numpy array or a tensor, found {type(images).__name__}",
                          item=name)
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if not tensor.is_floating_point():
        raise EngineError(f"expected uint8 or float images, found {tensor.dtype}", item=name)
    tensor = tensor.float()
    if tensor.numel() and (tensor.min() < -1e-3 or tensor.max() > 1 + 1e-3):
        lo, hi = float(tensor.min()), float(tensor.max())
        raise EngineError(f"expected float values in [0, 1], found [{lo:.3g}, {hi:.3g}]",
                          item=name)
    return tensor.clamp(0, 1)


def uni_grid_crops(
    images: ImageInput, crop: int = CROP, size: int = UNI_INPUT, *, normalize: bool = True
) -> Tensor:
    """Cut tiles row-major into ``crop``² crops, resize each to ``size``², normalise.

    Returns:
        float32 ``[B, rows, 3, size, size]`` with ``rows = (H / crop) · (W / crop)``; row
        ``r · (W / crop) + c`` is the crop at grid row ``r``, column ``c``. Values are
        ImageNet-normalised (``(x − mean) / std``) unless ``normalize`` is false.

    Raises:
        EngineError: a side that is not a positive multiple of ``crop``.
    """
    x = image_batch(images)
    b, _, h, w = x.shape
    if h < crop or w < crop or h % crop or w % crop:
        raise EngineError(
            f"tile of {w}×{h} px: expected sides that are multiples of {crop} px "
            f"(e.g. {crop}, {2 * crop}, {4 * crop})",
            item="images",
        )
    gh, gw = h // crop, w // crop
    crops = (
        x.reshape(b, 3, gh, crop, gw, crop)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(b * gh * gw, 3, crop, crop)
    )
    if size != crop:
        crops = F.interpolate(
            crops, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    if normalize:
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
        crops = (crops - mean) / std
    return crops.reshape(b, gh * gw, 3, size, size)


# --------------------------------------------------------------------------- encoders


class GridEncoder(ModelMixin, ConfigMixin):
    """Base of the conditioning encoders: tiles → crops → ``embed`` → rows.

    Subclasses implement ``embed(crops[N, 3, size, size]) -> [N, dim]``, set ``dim`` and
    register their constructor arguments (``@register_to_config``).
    """

    config_name = "config.json"
    dim: int

    def __init__(self, crop: int = CROP, size: int = UNI_INPUT, batch_size: int = 64) -> None:
        super().__init__()
        self.crop = int(crop)
        self.size = int(size)
        self.batch_size = int(batch_size)

    def embed(self, crops: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to(self, *args: Any, **kwargs: Any) -> GridEncoder:
        """``torch.nn.Module.to`` (an encoder has no float32-only modules, no quantisation
        and no offloading, which ``ModelMixin.to`` checks and warns about)."""
        return nn.Module.to(self, *args, **kwargs)

    def _first_tensor(self) -> Tensor:
        return next(itertools.chain(self.parameters(), self.buffers()))

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights live."""
        return self._first_tensor().device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the encoder's weights (rows come out in it)."""
        return self._first_tensor().dtype

    def rows(self, height: int, width: int) -> int:
        """Number of rows for a tile of ``height`` × ``width`` px."""
        return (height // self.crop) * (width // self.crop)

    def encode(self, images: ImageInput) -> Tensor:
        """Embed tiles: ``[B, rows, dim]`` on the encoder's device, in its dtype."""
        x = image_batch(images)
        if x.device != self.device:
            x = x.to(self.device)
        with torch.no_grad():
            crops = uni_grid_crops(x, self.crop, self.size)
            b, rows = crops.shape[:2]
            flat = crops.reshape(b * rows, 3, self.size, self.size).to(self.dtype)
            out = [self.embed(chunk) for chunk in flat.split(self.batch_size)]
            return torch.cat(out).reshape(b, rows, -1)

    def forward(self, images: ImageInput) -> Tensor:
        return self.encode(images)


class UNIEncoder(GridEncoder):
    """A timm image model (UNI2-h) as a conditioning encoder: one row per 256² crop.

    ``model(crops)`` must return pooled features ``[N, dim]`` (timm with ``num_classes=0``).
    The model is put in eval mode and frozen. Its weights are saved in UNI2-h's own
    checkpoint format (``model.safetensors``), not by ``save_pretrained``.
    """

    ignore_for_config = ["model"]  # noqa: RUF012 - diffusers' class attribute

    @register_to_config
    def __init__(
        self, model: nn.Module, crop: int = CROP, size: int = UNI_INPUT, batch_size: int = 64
    ) -> None:
        super().__init__(crop, size, batch_size)
        self.model = model.eval().requires_grad_(False)
        self.dim = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))

    def embed(self, crops: Tensor) -> Tensor:
        return self.model(crops)

    def train(self, mode: bool = True) -> UNIEncoder:
        """Stays in eval mode: the encoder is frozen."""
        return super().train(False)


class TinyEncoder(GridEncoder):
    """UNTRAINED stand-in for UNI2-h with the same interface (tests and the demo only).

    Each crop is reduced to colour/texture statistics (per channel: the mean over a 4×4
    grid, the standard deviation, the mean absolute gradient → 54 numbers, computed on a
    32² antialiased thumbnail of the normalised crop) and projected to ``dim`` by a
    fixed random matrix drawn from ``seed``. Deterministic, cheap, not a learned feature.
    """

    FEATURES = 3 * 16 + 3 + 3

    @register_to_config
    def __init__(self, dim: int = 32, seed: int = 0, crop: int = CROP) -> None:
        super().__init__(crop, size=32, batch_size=4096)
        self.dim = int(dim)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        proj = torch.randn(self.FEATURES, self.dim, generator=gen) / self.FEATURES**0.5
        self.register_buffer("projection", proj)

    def embed(self, crops: Tensor) -> Tensor:
        n = crops.shape[0]
        grid = F.adaptive_avg_pool2d(crops, 4).reshape(n, 48)
        std = crops.std(dim=(2, 3))
        grad = (crops[..., 1:, :] - crops[..., :-1, :]).abs().mean(dim=(2, 3)) + (
            crops[..., :, 1:] - crops[..., :, :-1]
        ).abs().mean(dim=(2, 3))
        feats = torch.cat([grid, std, grad], dim=1)
        return feats.to(self.projection.dtype) @ self.projection


# --------------------------------------------------------------------------- UNI2-h


def uni2h_kwargs(**overrides: Any) -> dict[str, Any]:
    """The timm kwargs UNI2-h is created with (MahmoodLab's model card), plus overrides.

    Overrides are for tests (a tiny model with the same structure), e.g.
    ``uni2h_kwargs(embed_dim=32, depth=2, num_heads=2)``.
    """
    kwargs: dict[str, Any] = {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "num_classes": 0,
        "no_embed_class": True,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    }
    kwargs.update(overrides)
    return kwargs


def create_uni2h(*, device: str | torch.device | None = None, **overrides: Any) -> nn.Module:
    """The UNI2-h architecture with timm's random initialisation (no weights).

    ``device="meta"`` builds it without allocating memory (shapes only).
    """
    with torch.device(device) if device is not None else nullcontext():
        return timm.create_model(UNI2H_ARCHITECTURE, pretrained=False, **uni2h_kwargs(**overrides))


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise EngineError("expected model.safetensors or pytorch_model.bin in this folder",
                          path=path)
    if not path.is_file():
        raise EngineError("weights file not found", path=path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from ``*.safetensors`` or a torch file (``weights_only=True``), on CPU.

    ``path`` may be a folder holding ``model.safetensors`` or ``pytorch_model.bin``.

    Raises:
        EngineError: missing, unreadable or corrupted file, or not a mapping of tensors.
    """
    file = _checkpoint_file(Path(path).expanduser())
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure means the same thing to the user
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise EngineError(f"cannot read weights ({type(err).__name__}: {reason})",
                          path=file) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise EngineError("expected a state dict (a mapping of names to tensors)", path=file)
    return state


def load_state_strict(
    model: nn.Module, state: dict[str, Tensor], *, path: str | os.PathLike, what: str
) -> nn.Module:
    """Load ``state`` into ``model``: every key, every shape, nothing extra.

    Works on a model built on the ``meta`` device (tensors are assigned, not copied).

    Raises:
        EngineError: naming ``path`` and listing missing / unexpected / mis-shaped keys.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape (file vs model)", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise EngineError(f"does not fit the {what} architecture: {'; '.join(parts)}",
                          path=path)
    meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(state, strict=True, assign=meta)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise EngineError(f"weights leave {what} tensors unset (e.g. {left[0]})", path=path)
    return model


def build_uni2h(
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    crop: int = CROP,
    batch_size: int = 64,
    **overrides: Any,
) -> UNIEncoder:
    """UNI2-h with its weights, as a :class:`UNIEncoder` (1536-d rows), offline.

    Args:
        weights: a checkpoint file (``pytorch_model.bin`` / ``model.safetensors``) or a
            folder holding one; ``None`` looks for the ``encoder`` component via
            :func:`histosynth.synthesis.weights.find_component` (``$HISTOSYNTH_WEIGHTS``,
            the settings file, the local HF cache of ``MahmoodLab/UNI2-h``).
        device, dtype: where and in which precision the encoder runs.
        crop: side of one conditioning crop, px.
        overrides: architecture overrides (tests build tiny models this way).

    Raises:
        EngineError: weights not found, unreadable, not finite (naming the tensor), or of
            another architecture.
    """
    if weights is None:
        from histosynth.synthesis.weights import find_component

        weights = find_component("pixcell-1024", "encoder").path
    file = _checkpoint_file(Path(weights).expanduser())
    state = load_checkpoint(file)
    check_weights_finite(state.items(), file)
    model = create_uni2h(device="meta", **overrides)
    load_state_strict(model, state, path=file, what="UNI2-h")
    model = model.to(device=device, dtype=dtype)
    return UNIEncoder(model, crop=crop, batch_size=batch_size)
