"""The command line: one module per command or command group, each a thin click function
that parses its options, builds the workflow's typed settings and calls the workflow
(:mod:`histosynth.workflows`); the shared options are in :mod:`histosynth.commands.options`,
the step from options to a workflow's settings in :mod:`histosynth.commands.to_workflow`
and the ``main`` group in :mod:`histosynth.commands.main` (``histosynth.cli:main`` is the
console entry point). Nothing outside this package imports it but ``histosynth.cli``.
"""
