"""The ``histosynth`` command group: logging for one invocation, user errors as one line,
and every command registered.

Exit codes: 0 success; 1 a user error, reported as one line on stderr (``--debug`` shows
the traceback); 2 a usage error (click's own); 130 interrupted.
"""

from __future__ import annotations

import logging
import warnings

import click

from histosynth import __version__
from histosynth.commands.adapters import adapters
from histosynth.commands.benchmark import benchmark
from histosynth.commands.cache import cache
from histosynth.commands.demo import demo
from histosynth.commands.evaluate import evaluate
from histosynth.commands.export import export
from histosynth.commands.extract import extract
from histosynth.commands.models import models
from histosynth.commands.options import HELP_CONTEXT
from histosynth.commands.qupath import qupath
from histosynth.commands.review import review
from histosynth.commands.synthesize import synthesize
from histosynth.commands.train import train

__all__ = ["main"]


class _OneLineHandler(logging.Handler):
    """Warnings as ``histosynth: warning: …`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"histosynth: {record.levelname.lower()}: {record.getMessage()}", err=True)


def _setup_logging(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """Send histosynth's log records to stderr as one line each, for this invocation only
    (restored when the command ends, so in-process callers keep their own logging)."""
    root = logging.getLogger("histosynth")
    saved = (root.handlers[:], root.level, root.propagate)
    root.handlers[:] = [_OneLineHandler()]
    root.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING)
    root.propagate = False
    # the commands say in their own words when an engine is UNTRAINED
    warning_filters = warnings.filters[:]
    warnings.filterwarnings("ignore", message=".*UNTRAINED", category=UserWarning)

    def restore() -> None:
        root.handlers[:], level, root.propagate = saved[0], saved[1], saved[2]
        root.setLevel(level)
        warnings.filters[:] = warning_filters

    ctx.call_on_close(restore)


def _user_errors() -> tuple[type[Exception], ...]:
    from histosynth.integration.errors import InputError
    from histosynth.manifest import ManifestError

    errors: list[type[Exception]] = [InputError, ManifestError]
    try:
        from histosynth.synthesis.errors import EngineError
    except ImportError:  # engine not installed in this build
        pass
    else:
        errors.append(EngineError)
    return tuple(errors)


class HistosynthGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _user_errors() as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"histosynth: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("histosynth: interrupted; run again with --resume to continue", err=True)
            ctx.exit(130)


@click.group(cls=HistosynthGroup, context_settings=HELP_CONTEXT)
@click.version_option(__version__, prog_name="histosynth")
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress bars, warnings or notes (results still)."
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """histosynth: synthetic blood-vessel tiles for QuPath and TIAToolbox projects."""
    ctx.ensure_object(dict)
    ctx.obj.update(quiet=quiet, debug=debug)
    _setup_logging(ctx, quiet, debug)


for _command in (
    extract, synthesize, demo, evaluate, models, review, export, qupath, cache, train, benchmark
):
    main.add_command(_command)
main.add_command(adapters)
