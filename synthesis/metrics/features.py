"""Feature spaces the metrics are computed in: images → (N, D) float32 vectors, offline.

A feature space has a ``name``, a dimension ``dim``, a ``weights_id`` (SHA-256 of its
weights, so that cached vectors and reported numbers say which weights made them) and a
``comparable`` flag: only the published extractors' numbers can be set beside published
ones.

* ``default`` — the conditioning encoder of the embedded default engine
  (``histosynth-mini-512``: colour / texture statistics of each 128² crop, projected), the
  mean of a tile's crop rows. Offline and small; **not comparable** with published values.
* ``tiny`` — the same encoder class with seeded random weights at a tiny size (tests).
* ``inception`` — FID's Inception-v3 (the 2048-d pool features of the 2015 TensorFlow
  graph, as torch-fidelity runs it: uint8 in, TensorFlow-1-compatible bilinear resize to
  299², (x − 128) / 128); FID / KID as published. Needs ``torch-fidelity``
  (``pip install "histosynth[metrics]"``) and its weights file.
* ``clip`` — CLIP ViT-B/32 image embeddings (512-d, transformers'
  ``CLIPVisionModelWithProjection``; bicubic resize to 224², CLIP's mean / std): CLIP-FID.
* ``clip-l14-336`` — CLIP ViT-L/14 at 336 px, embeddings L2-normalised (768-d): the space
  of CMMD (google-research/cmmd embeds with this model and normalises).
* ``uni2-h``, ``virchow2``, ``h-optimus-1`` — the pathology foundation models, built in
  timm as their model cards say.

Every weighted space finds its weights offline
(:func:`~histosynth.synthesis.weights.find_extractor_weights`); a missing file is one
clear message naming where it was looked for. These are comparable with published
numbers; ``weights=PATH`` loads others (tests pass tiny random ones of the same shape).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histosynth.common.files import file_sha256
from histosynth.synthesis.weights import FEATURE_EXTRACTORS

__all__ = ["FEATURE_SPACES", "FeatureSpace", "load_feature_space"]


@dataclass
class FeatureSpace:
    """``embed(images uint8 (N, H, W, 3)) -> float32 (N, dim)`` with its provenance."""

    name: str
    dim: int
    weights_id: str
    comparable: bool
    description: str
    embed: Callable[[np.ndarray], np.ndarray]
    batch_size: int = 16

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of a batch of tiles, in chunks of ``batch_size``."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        out = [
            self.embed(images[i : i + self.batch_size])
            for i in range(0, len(images), self.batch_size)
        ]
        return (
            np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)
        )


def _state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _model_input(
    images: np.ndarray, size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 tiles (N, H, W, 3) as a model's input on ``mean``'s device: resized to
    ``size``² (bicubic, antialiased), in [0, 1], normalised by ``mean`` / ``std``."""
    x = torch.as_tensor(images, device=mean.device).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(
        x, size=(size, size), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0, 1)
    return (x - mean) / std


def _grid_space(encoder, name: str, comparable: bool, description: str, device) -> FeatureSpace:
    encoder = encoder.to(device).eval()

    def embed(images: np.ndarray) -> np.ndarray:
        side = min(images.shape[1], images.shape[2])
        if side < encoder.crop:
            raise ValueError(
                f"tiles of {images.shape[2]}×{images.shape[1]} px are smaller than the "
                f"{encoder.crop} px crop of the {name} feature space"
            )
        with torch.no_grad():
            rows = encoder.encode(images)  # [B, rows, dim]
        return rows.float().mean(1).cpu().numpy()

    return FeatureSpace(
        name, int(encoder.dim), _state_hash(encoder), comparable, description, embed
    )


def _default(device) -> FeatureSpace:
    from histosynth.synthesis.engine import load_engine

    engine = load_engine("default", device=device)
    return _grid_space(
        engine.encoder,
        "default",
        False,
        f"the {engine.model_id} engine's conditioning encoder (colour / texture statistics "
        "of each crop, projected; offline, not comparable with published numbers)",
        device,
    )


def _tiny(device) -> FeatureSpace:
    from histosynth.synthesis.models.encoders import TinyEncoder

    return _grid_space(
        TinyEncoder(dim=16, seed=0, crop=32),
        "tiny",
        False,
        "seeded random colour / texture statistics (tests only)",
        device,
    )


# ----------------------------------------------------------------------------- pathology encoders

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class PathologyEncoder:
    """A timm foundation model as its model card builds it, and how it embeds a tile."""

    name: str
    repo: str
    architecture: str
    kwargs: dict
    mean_std: tuple[tuple[float, float, float], tuple[float, float, float]]
    pooling: str  # "pooled" (the model's own head-less output) or "cls+mean" (Virchow-2)
    prefix_tokens: int = 0  # class + register tokens before the patch tokens ("cls+mean")


def _uni2h_kwargs() -> dict:
    from histosynth.synthesis.models.encoders import uni2h_kwargs

    return uni2h_kwargs()


def _virchow2_kwargs() -> dict:
    import timm

    return {
        "img_size": 224,
        "init_values": 1e-5,
        "num_classes": 0,
        "mlp_ratio": 5.3375,
        "global_pool": "",
        "dynamic_img_size": True,
        "reg_tokens": 4,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
    }


def _hoptimus1_kwargs() -> dict:
    return {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0}


ENCODERS: dict[str, Callable[[], PathologyEncoder]] = {
    "uni2-h": lambda: PathologyEncoder(
        "uni2-h",
        FEATURE_EXTRACTORS["uni2-h"].repo,
        "vit_giant_patch14_224",
        _uni2h_kwargs(),
        IMAGENET,
        "pooled",
    ),
    "virchow2": lambda: PathologyEncoder(
        "virchow2",
        FEATURE_EXTRACTORS["virchow2"].repo,
        "vit_huge_patch14_224",
        _virchow2_kwargs(),
        IMAGENET,
        "cls+mean",
        prefix_tokens=5,
    ),
    "h-optimus-1": lambda: PathologyEncoder(
        "h-optimus-1",
        FEATURE_EXTRACTORS["h-optimus-1"].repo,
        "vit_giant_patch14_reg4_dinov2",
        _hoptimus1_kwargs(),
        ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
        "pooled",
    ),
}
"""The pathology foundation models, built in timm from their model cards (no download)."""


def _pathology_space(name: str, device, weights=None, **overrides) -> FeatureSpace:
    """A pathology encoder with its weights (``weights``, else found offline); with
    architecture ``overrides`` and ``weights="random"`` a tiny seeded model (tests)."""
    import timm

    from histosynth.synthesis.models.encoders import load_checkpoint, load_state_strict

    spec = ENCODERS[name]()
    kwargs = {**spec.kwargs, **overrides}
    if weights == "random":
        torch.manual_seed(0)
        model = timm.create_model(spec.architecture, pretrained=False, **kwargs)
        source = "seeded random weights (tests)"
    else:
        from histosynth.synthesis.weights import find_extractor_weights

        file = find_extractor_weights(name, weights)
        with torch.device("meta"):
            model = timm.create_model(spec.architecture, pretrained=False, **kwargs)
        load_state_strict(model, load_checkpoint(file), path=file, what=name)
        source = str(file)
    model = model.to(device).eval().requires_grad_(False)
    mean = torch.tensor(spec.mean_std[0], device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.mean_std[1], device=device).view(1, 3, 1, 1)
    size = int(kwargs.get("img_size", 224))

    def embed(images: np.ndarray) -> np.ndarray:
        x = _model_input(images, size, mean, std)
        with torch.no_grad():
            out = model(x)
            if spec.pooling == "cls+mean":
                out = torch.cat([out[:, 0], out[:, spec.prefix_tokens :].mean(1)], dim=-1)
        return out.float().cpu().numpy()

    dim = int(model.num_features) * (2 if spec.pooling == "cls+mean" else 1)
    comparable = weights != "random" and not overrides
    return FeatureSpace(
        name,
        dim,
        _state_hash(model),
        comparable,
        f"{spec.repo} ({spec.architecture}; {source})",
        embed,
        batch_size=8,
    )


# ----------------------------------------------------------------------------- Inception, CLIP


def _inception_space(device, weights=None) -> FeatureSpace:
    """FID's Inception-v3 (torch-fidelity's network) with its weights found offline, or
    the weights file ``weights``."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ValueError(
            "the inception feature space needs torch-fidelity: "
            'pip install "histosynth[metrics]"'
        ) from None
    from histosynth.synthesis.errors import EngineError
    from histosynth.synthesis.weights import INCEPTION_FILES, find_extractor_weights

    file = find_extractor_weights("inception", weights)
    # the published file: its SHA-256 starts with the hash in its name (torch hub's rule);
    # hashed from its bytes, before anything is unpickled
    digest = file_sha256(file)
    official = any(digest.startswith(n.rsplit("-", 1)[1][:8]) for n in INCEPTION_FILES)
    try:
        # tensors only (weights_only): a planted pickle never runs. torch-fidelity unpickles
        # its path with weights_only=False, so it gets a copy written here, tensors only.
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ValueError("expected a state dict of tensors")
        with tempfile.TemporaryDirectory(prefix="histosynth-inception-") as folder:
            safe = Path(folder) / "inception.pth"
            torch.save(state, safe)
            model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(safe)
            )
    except Exception as err:  # torch.load / load_state_dict say why in their own words
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise EngineError(f"not the FID Inception-v3 weights ({reason})", path=file) from err
    model = model.to(device).eval()

    def embed(images: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(images, device=device).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            (out,) = model(x)
        return out.float().cpu().numpy()

    return FeatureSpace(
        "inception",
        2048,
        _state_hash(model),
        official,
        f"FID Inception-v3 (torch-fidelity's network, pool 2048; {file})",
        embed,
        batch_size=16,
    )


CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _clip_space(name: str, device, weights=None, normalise: bool = False) -> FeatureSpace:
    """A CLIP image tower (transformers' ``CLIPVisionModelWithProjection``) from a local
    folder: its projected image embeddings, L2-normalised when ``normalise``."""
    from transformers import CLIPVisionModelWithProjection

    from histosynth.synthesis.errors import EngineError
    from histosynth.synthesis.weights import FEATURE_EXTRACTORS, find_extractor_weights

    folder = find_extractor_weights(name, weights)
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError / ValueError / KeyError ...
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise EngineError(f"cannot load a CLIP vision model ({reason})", path=folder) from err
    model = model.to(device).eval().requires_grad_(False)
    size = int(model.config.image_size)
    mean = torch.tensor(CLIP_MEAN_STD[0], device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_MEAN_STD[1], device=device).view(1, 3, 1, 1)

    def embed(images: np.ndarray) -> np.ndarray:
        x = _model_input(images, size, mean, std)
        with torch.no_grad():
            out = model(pixel_values=x).image_embeds.float()
        if normalise:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy()

    repo = FEATURE_EXTRACTORS[name].repo
    official = weights is None
    return FeatureSpace(
        name,
        int(model.config.projection_dim),
        _state_hash(model),
        official,
        f"{repo} image embeddings{' (L2-normalised)' if normalise else ''} ({folder})",
        embed,
        batch_size=16,
    )


FEATURE_SPACES: dict[str, Callable[..., FeatureSpace]] = {
    "default": lambda device, **_: _default(device),
    "tiny": lambda device, **_: _tiny(device),
    "inception": lambda device, weights=None, **_: _inception_space(device, weights),
    "clip": lambda device, weights=None, **_: _clip_space("clip", device, weights),
    "clip-l14-336": lambda device, weights=None, **_: _clip_space(
        "clip-l14-336", device, weights, normalise=True
    ),
    **{
        name: (lambda device, _n=name, **kw: _pathology_space(_n, device, **kw))
        for name in ENCODERS
    },
}
"""The feature spaces by name."""


def load_feature_space(name: str, device: torch.device | str = "cpu", **options) -> FeatureSpace:
    """The feature space ``name`` (one of :data:`FEATURE_SPACES`), built offline.
    ``options`` (pathology encoders): ``weights=`` a checkpoint path, or ``"random"``
    with architecture overrides for a tiny test model (e.g. ``embed_dim=32, depth=1``)."""
    if name not in FEATURE_SPACES:
        raise ValueError(f"unknown feature space {name!r}; available: {', '.join(FEATURE_SPACES)}")
    return FEATURE_SPACES[name](device, **options)
