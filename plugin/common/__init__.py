"""The low-level home every layer may import: standard library and numpy only, nothing
else of histosynth.

* :mod:`~histosynth.common.errors` — :class:`HistosynthError`, the base of
  ``InputError`` (integration) and ``EngineError`` (synthesis): one line naming the file
  and the item.
* :mod:`~histosynth.common.files` — atomic writes (a temporary file beside the target,
  fsynced, renamed over it, the folder fsynced) and :func:`fsync_dir`.
* :mod:`~histosynth.common.version` — the installed histosynth version.
* :mod:`~histosynth.common.lazy` — module ``__getattr__`` for packages that load their
  heavy names on first use.
"""
