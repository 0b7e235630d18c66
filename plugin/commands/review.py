"""``histosynth review …``: the review commands (the work: :mod:`histosynth.review`).

The group is registered on the main command in :mod:`histosynth.commands.main`; user
errors (:class:`~histosynth.integration.errors.InputError`) raised here become one line on
stderr and exit code 1 there.
"""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.commands.options import HELP_CONTEXT, project_option, value_option, wait_option
from histosynth.commands.progress import progress_for


@click.group(context_settings=HELP_CONTEXT)
def review() -> None:
    """Review synthetic tiles: a gallery page, decisions in the browser or from QuPath."""


@review.command(context_settings=HELP_CONTEXT)
@click.argument("run", type=click.Path(path_type=Path, file_okay=False))
@click.pass_context
def gallery(ctx: click.Context, run: Path) -> None:
    """Write RUN/review.html: one card per tile with its inputs, result, mask overlay,
    provenance and review status; filters by status, class and type.

    Prints the page's path. Open it in a browser straight from the disk; it loads
    nothing from the network.
    """
    from histosynth.review.gallery import write_gallery

    page = write_gallery(run, progress=progress_for(ctx, "gallery"))
    click.echo(str(page))


@review.command(context_settings=HELP_CONTEXT)
@click.argument("project", type=click.Path(path_type=Path))
@click.option(
    "--run",
    "run",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The run folder whose tiles were added to PROJECT.",
)
@wait_option
@click.pass_context
def sync(ctx: click.Context, project: Path, run: Path, wait_s: float) -> None:
    """Copy reviewers' decisions (entry metadata review_status: accepted / rejected /
    pending) from the QuPath PROJECT into RUN/index.csv, atomically.
    """
    from histosynth.integration.qupath.writeback import review_sync

    result = review_sync(project, run, wait_s=wait_s)
    click.echo(result.summary())


@review.command(context_settings=HELP_CONTEXT)
@click.argument("run", type=click.Path(path_type=Path, file_okay=False))
@project_option(
    "The QuPath project the run was written into: each decision also goes into its "
    "entry (close the project in QuPath first).",
    short=False,
)
@value_option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a --host other than loopback (plain HTTP: anyone who sees the URL decides).",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    help="Another Host header to accept, NAME:PORT (e.g. behind a reverse proxy); repeatable.",
)
@value_option("--port", type=click.IntRange(0, 65535), default=0, help="Port (0: a free one).")
@click.pass_context
def serve(
    ctx: click.Context,
    run: Path,
    project: Path | None,
    host: str,
    allow_remote: bool,
    allow_hosts: tuple[str, ...],
    port: int,
) -> None:
    """Review RUN in the browser: the gallery with accept / reject / undo (keys a, r, u;
    j / k or the arrows move), a reviewer name and a comment per decision.

    Prints the URL to open (it holds this session's token). Each decision is logged in
    RUN/review/decisions.jsonl at once (and into the project's entry, with --project),
    then into RUN/index.csv within a moment; decisions a killed server logged but did
    not write are written when it starts again. Ctrl-C stops. A run of many tiles is
    shown in pages of 200.
    """
    from histosynth.review.server import make_server

    try:
        server, _state, url = make_server(
            run, project=project, host=host, port=port, allow_remote=allow_remote,
            allow_hosts=allow_hosts,
        )
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if allow_remote and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"warning: serving on {host} over plain HTTP: anyone on the network who sees "
            "this URL (its token) can accept and reject tiles",
            err=True,
        )
    import signal

    def stop(signum: int, frame: object) -> None:  # `kill`: stop as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:  # a signal right after the URL is printed still stops cleanly
        click.echo(url, nl=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
