"""A finished run's tiles into its QuPath project, as new entries marked for review
(``synthesize --write-project``, ``demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from histosynth.integration.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from histosynth.integration.qupath.writeback import WriteBackResult

__all__ = ["WRITE_BACKS", "write_run_back"]

#: how a run reaches a project: ``native`` edits ``project.qpproj`` (the project closed in
#: QuPath), ``paquo`` goes through QuPath
WRITE_BACKS = ("native", "paquo")


def write_run_back(
    how: str, project: str | Path, run_dir: str | Path, *, wait_s: float = 0.0
) -> WriteBackResult:
    """Add a finished run's tiles to the QuPath ``project`` as new entries marked for
    review, ``how`` being one of :data:`WRITE_BACKS`. ``wait_s``: seconds to wait for the
    project's lock. The result's ``summary()`` is the line the commands print.

    Raises:
        InputError: another ``how``, or the write-back refuses the project or the run.
    """
    if how == "native":
        from histosynth.integration.qupath.writeback import write_run_to_project

        return write_run_to_project(project, run_dir, wait_s=wait_s)
    if how == "paquo":
        from histosynth.integration.qupath.paquo_writer import write_run_with_paquo

        return write_run_with_paquo(project, run_dir, wait_s=wait_s)
    raise InputError(f"--write-project must be one of {', '.join(WRITE_BACKS)}, not {how!r}")
