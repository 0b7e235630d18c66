"""Workflows: the jobs the commands run, as click-free functions with typed settings.

Each composes the integration layer (slides, projects, run folders) with, where it needs
one, the engine, validates every input before it writes anything, and reports through a
result object (never by printing). The command line (:mod:`histosynth.commands`), the
TIAToolbox engine (:mod:`histosynth.tiatoolbox`) and Python callers call these; nothing
here imports click or a command.

``extract`` · ``synthesize`` (package) · ``writeback`` · ``cache`` · ``train`` · ``export`` ·
``evaluate`` · ``benchmark`` · ``demo``
"""
