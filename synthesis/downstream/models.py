"""The downstream benchmark's models, built offline (never downloaded).

* segmentation — ``segmentation_models_pytorch`` (UNet++ by default, any of its
  architectures by name), one output channel (vessel logit);
* classification — a timm model (EfficientNet-b1 by default), two classes (clean,
  invasive).

``encoder_weights``: ``None`` trains from scratch; a path loads a local checkpoint
(``*.safetensors`` or a torch state dict) into the encoder (segmentation) or the model
(classification, its classifier head left out), strictly by name and shape otherwise.
Encoder names follow each library: smp's ``efficientnet-b1`` or ``tu-<timm name>`` for
segmentation, timm's ``efficientnet_b1`` for classification (``efficientnet-b1`` is
accepted for both).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from histosynth.synthesis.errors import EngineError
from histosynth.synthesis.models.encoders import load_checkpoint

__all__ = ["build_classifier", "build_segmenter"]


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise EngineError(
            "the segmentation benchmark needs segmentation_models_pytorch: "
            'pip install "histosynth[downstream]"'
        ) from None
    return smp


def _load_into(module: nn.Module, path: str | os.PathLike, what: str, skip: tuple[str, ...]):
    file = Path(path).expanduser()
    state = load_checkpoint(file)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unknown = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.startswith(skip)]
    if wrong or unknown or missing:
        parts = [
            f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("wrong shape", wrong), ("unexpected", unknown),
                                ("missing", missing))
            if keys
        ]
        raise EngineError(f"does not fit the {what}: {'; '.join(parts)}", path=file)
    module.load_state_dict(state, strict=False)


def build_segmenter(
    arch: str = "unetplusplus",
    encoder: str = "efficientnet-b1",
    encoder_weights: str | os.PathLike | None = None,
) -> nn.Module:
    """An smp segmentation model (1 output channel), random or with a local encoder file.

    Raises:
        EngineError: an unknown architecture or encoder, a weights file that does not fit.
    """
    smp = _smp()
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=1)
    except (KeyError, ValueError) as err:
        raise EngineError(f"cannot build {arch} with encoder {encoder} ({err})") from None
    if encoder_weights is not None:
        _load_into(model.encoder, encoder_weights, f"{encoder} encoder", ("fc.", "classifier."))
    return model


def build_classifier(
    encoder: str = "efficientnet_b1",
    encoder_weights: str | os.PathLike | None = None,
    num_classes: int = 2,
) -> nn.Module:
    """A timm classifier, random or with a local checkpoint (its head left out).

    Raises:
        EngineError: an unknown model name, a weights file that does not fit.
    """
    import timm

    name = encoder.replace("-", "_")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except (RuntimeError, KeyError, ValueError) as err:
        raise EngineError(f"cannot build the classifier {encoder} ({err})") from None
    if encoder_weights is not None:
        head = model.default_cfg.get("classifier", "classifier")
        heads = (head,) if isinstance(head, str) else tuple(head)
        _load_into(model, encoder_weights, name, tuple(f"{h}." for h in heads))
    return model
