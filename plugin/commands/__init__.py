"""The command line: one module per command or command group, each a thin click function
that parses its options, builds the workflow's typed settings and calls the workflow
(:mod:`histosynth.workflows`); the shared options are in :mod:`histosynth.commands.options`
and the ``main`` group in :mod:`histosynth.commands.main` (``histosynth.cli:main`` is the
console entry point). Nothing outside this package imports it but ``histosynth.cli``.
"""
