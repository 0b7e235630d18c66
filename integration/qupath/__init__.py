"""QuPath projects on disk: entries, image locations, classes and annotations."""

from histosynth.integration.qupath.project import ProjectEntry, QuPathProject

__all__ = ["ProjectEntry", "QuPathProject"]
