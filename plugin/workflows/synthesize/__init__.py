"""The ``synthesize`` workflow and its parts.

``settings`` (what to make: :class:`SynthesisSettings`) · ``workflow`` (:func:`synthesize`,
one process) · ``run_setup`` (the run set up before its first tile: slides, engine,
resolved settings, donors and backgrounds) · ``tile_plan`` (one tile planned and made:
the steps every executor shares) · ``scale_out`` (the same plan rendered by Ray actors:
:class:`RayOptions`) · ``run_checks`` (what a run may ask of its engine; its tiles'
content check).

The names below load on first use, so that importing one part loads no other.

Example::

    from histosynth.workflows.synthesize import SynthesisSettings, synthesize
    synthesize(SynthesisSettings(classes=("Vessel",), count=4), out="run", project="P")
"""

from histosynth.common.lazy import lazy_names

_LAZY = {
    "RayOptions": "histosynth.workflows.synthesize.scale_out",
    "SynthesisSettings": "histosynth.workflows.synthesize.settings",
    "SynthesizeResult": "histosynth.workflows.synthesize.workflow",
    "synthesize": "histosynth.workflows.synthesize.workflow",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
