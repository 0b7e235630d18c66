"""Review tools: the gallery page of a run (``gallery``), the ``histosynth review`` commands
(``cli``) and the copy of reviewers' decisions from a QuPath project into ``index.csv``.

Kept import-light: the submodules are imported where they are used.
"""
