"""The demo world, apart from the modules that read users' real projects and slides:
synthetic slides, vessels and QuPath projects built offline from the H&E images inside
histosynth's dependencies, for ``histosynth demo``, the tests and the benchmarks.

* :mod:`~histosynth.integration.demo.data` — demo slides (pyramidal OME-TIFF) and demo
  QuPath projects (:func:`build_demo_project`, :func:`build_demo_slide`).
* :mod:`~histosynth.integration.demo.vessels` — vessel and tumour shapes painted into
  tissue.
* :mod:`~histosynth.integration.demo.crops` — the H&E crop library the slides are made of.

>>> from histosynth.integration.demo import build_demo_project  # doctest: +SKIP
"""

from __future__ import annotations

from histosynth.integration.demo.data import build_demo_project, build_demo_slide

__all__ = ["build_demo_project", "build_demo_slide"]
