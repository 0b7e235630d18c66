"""The downstream benchmark's models, augmentation, training loop and scores (arrays and
tensors only; the folds and files are ``histosynth.integration.splits``')."""

from histosynth.synthesis.downstream.augment import AUGMENTATION, augment
from histosynth.synthesis.downstream.models import build_classifier, build_segmenter
from histosynth.synthesis.downstream.scores import (
    classification_scores,
    confusion,
    segmentation_scores,
)
from histosynth.synthesis.downstream.train import TrainedModel, predict, train_model

__all__ = [
    "AUGMENTATION",
    "TrainedModel",
    "augment",
    "build_classifier",
    "build_segmenter",
    "classification_scores",
    "confusion",
    "predict",
    "segmentation_scores",
    "train_model",
]
