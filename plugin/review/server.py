"""``histosynth review serve RUN``: the review gallery in the browser, with decisions.

A small standard-library server (``http.server.ThreadingHTTPServer``) on loopback serves
the run's gallery page with a decision bar (accept / reject / undo, keys a, r, u, j / k
and the arrows, a reviewer name, a comment, a progress count) and the run's images.

Safety:

* A per-session token (``secrets.token_urlsafe``) is in the URL the command prints.
  Opening it sets an ``HttpOnly``, ``SameSite=Strict`` cookie for the images; every
  decision must carry the token in an ``X-Histosynth-Token`` header, which another
  site's page cannot read or send (a custom header needs a CORS preflight this server
  never grants), and a decision whose ``Origin`` is not the server's is refused.
* Only files inside the run are served, only PNG images, by resolved path.
* The ``Host`` header must name the address the server listens on (or one given with
  ``allow_hosts``), which defeats DNS rebinding; listening on another address than
  loopback needs ``allow_remote`` (plain HTTP: anyone who sees the URL can decide).
* Each connection has a read timeout (:data:`REQUEST_TIMEOUT`): a request that sends
  less than it announced, or an idle connection, is closed; the listen backlog takes
  bursts of hundreds of connections; any error in a handler is one log line and a 4xx /
  5xx answer, never a traceback on the terminal; foreign cookies are ignored.
* The page is the gallery's: every value from the index is HTML-escaped and a
  Content-Security-Policy allows only its own two scripts (by hash).

With ``--project``, the decision then goes into the tile's entry of the QuPath project
(metadata ``review_status``, only that value's text changed, the previous file kept as
``project.qpproj.backup``, under the project lock). A project file changed on disk since
the server read it, or last wrote it, was changed by someone else — QuPath, which would
overwrite the decision when it saves — and is not written again: the page says so and
the decision stays in the run. Close the project in QuPath, ``review sync`` its own
decisions into the run, and start the server again.

Nothing lost: a decision is first appended to ``RUN/review/decisions.jsonl`` (one JSON
line, flushed and fsynced: time, tile, status, the status before, reviewer, comment,
whether it undoes one), then written into ``index.csv`` atomically. One lock orders the
decisions of every tab: the last one wins, both are logged. A server killed between the
two leaves a valid index and a log that says what was decided; a torn last log line is
skipped when read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from histosynth.integration.dataset import REVIEW_STATUSES, read_index, update_index
from histosynth.integration.decisions import (
    DECISIONS_NAME,
    append_decision,
    read_decisions,
    utc_now_ms,
)
from histosynth.integration.errors import InputError
from histosynth.integration.locks import RUN_LOCK_NAME, folder_lock, project_lock
from histosynth.integration.qupath.entries import META_REVIEW
from histosynth.integration.qupath.plan import default_run_name
from histosynth.integration.qupath.project import QuPathProject

log = logging.getLogger(__name__)

__all__ = ["DECISIONS_NAME", "ReviewServer", "make_server", "read_decisions"]

COOKIE = "histosynth_review"
MAX_BODY = 16_384
#: seconds a connection may take to send its request (and stay idle) before it is closed
REQUEST_TIMEOUT = 10.0
#: connections the listening socket queues while every thread is busy
BACKLOG = 512
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_REVIEWER, MAX_COMMENT = 100, 1000


@dataclass
class ReviewServer:
    """What the handler needs: the run, the token and the lock that orders decisions."""

    run: Path
    #: ``project.qpproj`` whose entries of this run get each decision too, if any
    project: Path | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: the project as read when the server started, then as it last wrote it: a file
    #: that differs from it was changed by someone else (QuPath) and is not written
    opened: QuPathProject | None = None

    def __post_init__(self) -> None:
        if self.project is not None and self.opened is None:
            self.opened = QuPathProject(self.project, use_paquo=False)

    def write_project(self, tile_id: str, status: str) -> str:
        """The decision into the tile's project entry (backup, refused when the file
        changed on disk); a warning for the page when it could not be written."""
        if self.project is None:
            return ""
        try:
            with project_lock(self.project, wait_s=2.0, purpose="histosynth review serve"):
                project = self.opened
                assert project is not None
                entry = project.synthetic_entry(default_run_name(self.run, project.file), tile_id)
                if entry is None:
                    return f"{tile_id} is not in the project; the decision is in the run only"
                if entry.metadata.get(META_REVIEW) == status:
                    return ""
                project.set_metadata(entry, META_REVIEW, status)
                project.save()
        except InputError as exc:
            return f"kept in the run, not written to the project: {exc}"
        return ""

    def decide(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Log and apply one decision; the new status and the progress count."""
        tile_id = payload.get("id")
        status = payload.get("status")
        reviewer = payload.get("reviewer") or ""
        comment = payload.get("comment") or ""
        if not isinstance(tile_id, str) or not tile_id:
            raise InputError("a decision names a tile id", item="id")
        if status not in REVIEW_STATUSES:
            raise InputError(
                f"status must be one of {', '.join(REVIEW_STATUSES)}", item=str(status)
            )
        if not isinstance(reviewer, str) or len(reviewer) > MAX_REVIEWER:
            raise InputError(f"reviewer: text of at most {MAX_REVIEWER} characters")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise InputError(f"comment: text of at most {MAX_COMMENT} characters")
        with self.lock:
            rows = {row["id"]: row for row in read_index(self.run)}
            if tile_id not in rows:
                raise InputError("no such tile in the run", item=tile_id)
            before = (rows[tile_id].get("review_status") or "pending").strip().lower()
            record = {
                "time": utc_now_ms(),
                "id": tile_id,
                "status": status,
                "before": before,
                "reviewer": reviewer.strip(),
                "comment": comment.strip(),
                "undo": bool(payload.get("undo")),
                "source": "browser",
            }
            append_decision(self.run, record)
            with folder_lock(
                self.run, RUN_LOCK_NAME, "the run folder", "the run folder", wait_s=5.0
            ):
                update_index(self.run, {tile_id: {"review_status": status}})
            rows[tile_id]["review_status"] = status
            warning = self.write_project(tile_id, status)
            decided = sum(
                1 for r in rows.values() if (r.get("review_status") or "pending") != "pending"
            )
        return {
            "id": tile_id,
            "status": status,
            "decided": decided,
            "total": len(rows),
            "warning": warning,
        }


def _cookie_value(header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, whatever else it holds (the
    standard library's parser gives up at the first cookie it dislikes)."""
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


class _Server(ThreadingHTTPServer):
    request_queue_size = BACKLOG
    daemon_threads = True


def _handler(state: ReviewServer, hosts: frozenset[str]) -> type[BaseHTTPRequestHandler]:
    from histosynth.review.gallery import gallery_html

    run_root = state.run.resolve()

    class Handler(BaseHTTPRequestHandler):
        server_version = "histosynth-review"
        timeout = REQUEST_TIMEOUT

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except TimeoutError:
                self.close_connection = True  # a slow or idle client: let it go
            except Exception as exc:  # one line, an answer, never a traceback
                log.warning("review server: %s %s: %s: %s", self.command, self.path,
                            type(exc).__name__, exc)
                self.close_connection = True
                with contextlib.suppress(Exception):  # the client may be gone
                    self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "server error"})

        def _host_ok(self) -> bool:
            if self.headers.get("Host", "").lower() in hosts:
                return True
            self._send(HTTPStatus.FORBIDDEN, b"host refused\n", "text/plain; charset=utf-8")
            return False

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

        def _send(
            self, code: int, body: bytes, kind: str, headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, document: dict[str, Any]) -> None:
            self._send(code, json.dumps(document).encode(), "application/json")

        def _cookie_ok(self) -> bool:
            value = _cookie_value(self.headers.get("Cookie", ""), COOKIE)
            return value is not None and _same(value, state.token)

        def do_GET(self) -> None:
            if not self._host_ok():
                return
            url = urlsplit(self.path)
            if url.path in ("/", "/review.html"):
                given = parse_qs(url.query).get("token", [""])[0]
                if not (_same(given, state.token) or self._cookie_ok()):
                    self._send(
                        HTTPStatus.FORBIDDEN,
                        b"open the URL the command printed\n",
                        "text/plain; charset=utf-8",
                    )
                    return
                page = gallery_html(state.run, review_token=state.token).encode("utf-8")
                cookie = f"{COOKIE}={state.token}; HttpOnly; SameSite=Strict; Path=/"
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", {"Set-Cookie": cookie})
                return
            if not self._cookie_ok():
                self._send(HTTPStatus.FORBIDDEN, b"", "text/plain")
                return
            try:
                target = (run_root / unquote(url.path).lstrip("/")).resolve()
                found = (
                    target.suffix.lower() == ".png"
                    and target.is_relative_to(run_root)
                    and target.is_file()
                )
            except (ValueError, OSError):  # a NUL byte, a name too long …
                found = False
            if not found:
                self._send(HTTPStatus.NOT_FOUND, b"", "text/plain")
                return
            self._send(HTTPStatus.OK, target.read_bytes(), "image/png")

        def do_POST(self) -> None:
            if not self._host_ok():
                return
            if urlsplit(self.path).path != "/api/decision":
                self._json(HTTPStatus.NOT_FOUND, {"error": "no such endpoint"})
                return
            given = self.headers.get("X-Histosynth-Token", "")
            if not _same(given, state.token):
                self._json(HTTPStatus.FORBIDDEN, {"error": "missing or wrong token"})
                return
            origin = self.headers.get("Origin")
            host = self.headers.get("Host", "")
            if origin is not None and origin != f"http://{host}":
                self._json(HTTPStatus.FORBIDDEN, {"error": f"origin {origin} refused"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 < length <= MAX_BODY:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "body missing or too large"})
                return
            try:
                payload = json.loads(self.rfile.read(length))
                if not isinstance(payload, dict):
                    raise ValueError("not an object")
                self._json(HTTPStatus.OK, state.decide(payload))
            except (ValueError, InputError, RecursionError) as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)[:300]})

    return Handler


def _same(given: str, token: str) -> bool:
    """Constant-time comparison that tolerates any text (a non-ASCII token is just wrong)."""
    return secrets.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def make_server(
    run_dir: str | os.PathLike,
    *,
    project: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    allow_remote: bool = False,
    allow_hosts: tuple[str, ...] = (),
) -> tuple[ThreadingHTTPServer, ReviewServer, str]:
    """The server (not started), its state and the URL to open (with the token).
    ``project``: the QuPath project the run was written into (each decision also goes
    into the tile's entry metadata ``review_status``). ``allow_remote``: listen on an
    address other than loopback; ``allow_hosts``: more ``Host`` header values to accept
    (``name:port``, e.g. behind a proxy).

    Raises:
        InputError: not a run folder (no readable ``index.csv``), or not a project; a
            non-loopback ``host`` without ``allow_remote``.
    """
    if host not in LOOPBACK and not allow_remote:
        raise InputError(
            f"--host {host} serves the review over plain HTTP to the network: anyone who "
            "sees the URL can decide; pass --allow-remote to do it anyway"
        )
    run = Path(run_dir)
    read_index(run)  # a bad run or project fails here, before a port is taken
    project_file = None
    if project is not None:
        project_file = QuPathProject(project, use_paquo=False).file
    state = ReviewServer(run, project_file)
    hosts: set[str] = {h.lower() for h in allow_hosts}
    server = _Server((host, port), None)  # type: ignore[arg-type]  # handler set below
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    names = {str(shown), host, *(["localhost", "127.0.0.1", "[::1]"] if host in LOOPBACK else [])}
    hosts |= {f"{name}:{bound_port}".lower() for name in names}
    server.RequestHandlerClass = _handler(state, frozenset(hosts))
    return server, state, f"http://{shown}:{bound_port}/?token={state.token}"
