"""histosynth: synthetic vessel tiles for whole-slide-image projects.

Kept import-light: importing ``histosynth`` (or any of its sub-packages) loads no
model library.
"""

__version__ = "0.1.0"
