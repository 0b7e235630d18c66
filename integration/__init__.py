"""Platforms and files: QuPath projects, GeoJSON, slides, annotation stores, datasets.

This layer turns projects, slides and annotations into numpy arrays and records and
back. It never imports torch or ``histosynth.synthesis``.
"""

from histosynth.integration.annotations import Annotation, class_matches
from histosynth.integration.errors import InputError

__all__ = ["Annotation", "InputError", "class_matches"]
