"""Review tools: the gallery page of a run (``gallery``), the review server (``server``) and
its metrics view (``metrics_view``); the ``histosynth review`` commands that run them are in
:mod:`histosynth.commands.review`.

Kept import-light: the submodules are imported where they are used.
"""
