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
import time
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from histosynth.integration.dataset import INDEX_NAME, REVIEW_STATUSES, read_index, update_index
from histosynth.integration.decisions import (
    DECISIONS_NAME,
    append_decision,
    decision_time,
    mark_applied,
    read_decisions,
    replay_decisions,
    utc_now_ms,
)
from histosynth.integration.errors import InputError
from histosynth.integration.locks import RUN_LOCK_NAME, folder_lock, project_lock
from histosynth.integration.qupath.entries import META_REVIEW
from histosynth.integration.qupath.plan import default_run_name
from histosynth.integration.qupath.project import QuPathProject
from histosynth.integration.run_folder import review_status

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
#: seconds the index writer waits after a decision, to write a burst of them at once
FLUSH_DELAY = 0.05


@dataclass
class ReviewServer:
    """What the handler needs: the run, its rows, the token and the lock that orders
    decisions.

    The rows are read once (after :func:`~histosynth.integration.decisions.replay_decisions`)
    and kept: a decision is checked against them and logged (the durable record), the
    project entry written, and ``index.csv`` rewritten in the background shortly after
    (:meth:`flush`), all decisions since the last write at once — a 100 000-row index
    takes about a second to rewrite, a decision must not wait for it. A server killed
    before that write leaves them in the log, replayed at its next start. An index
    changed by someone else (``review sync``) is read again before the next page.
    """

    run: Path
    #: ``project.qpproj`` whose entries of this run get each decision too, if any
    project: Path | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: the project as read when the server started, then as it last wrote it: a file
    #: that differs from it was changed by someone else (QuPath) and is not written
    opened: QuPathProject | None = None
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    #: decisions logged, not yet in ``index.csv``, and the log size they run to, bytes
    pending: dict[str, str] = field(default_factory=dict)
    pending_bytes: int = 0
    index_stat: tuple[int, int] = (0, 0)
    status_counts: Counter[str] = field(default_factory=Counter)
    flush_error: str = ""
    _wake: threading.Condition = field(default_factory=threading.Condition)
    _flushed: int = 0
    _requested: int = 0
    _stopped: bool = False
    _writer: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.project is not None and self.opened is None:
            self.opened = QuPathProject(self.project, use_paquo=False)
        if not self.rows:
            self.reload()

    # ------------------------------------------------------------------ index

    def _stat(self) -> tuple[int, int]:
        try:
            stat = (self.run / INDEX_NAME).stat()
        except OSError:
            return (0, 0)
        return (stat.st_mtime_ns, stat.st_size)

    def reload(self) -> None:
        """Read ``index.csv`` again, keeping the decisions not yet written into it."""
        stat = self._stat()
        rows = {row["id"]: row for row in read_index(self.run)}
        for tile_id, status in self.pending.items():
            if tile_id in rows:
                rows[tile_id]["review_status"] = status
        self.rows, self.index_stat = rows, stat
        self.status_counts = Counter(review_status(row) for row in rows.values())

    def current_rows(self) -> list[dict[str, str]]:
        """The rows as they stand (``index.csv`` read again if someone else changed it)."""
        with self.lock:
            if self._stat() != self.index_stat:
                self.reload()
            return list(self.rows.values())

    def start(self) -> None:
        """Start the thread that writes decisions into ``index.csv``."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name="histosynth-review-index")
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while self._requested == self._flushed and not self._stopped:
                    self._wake.wait()
                if self._stopped and self._requested == self._flushed:
                    return
            time.sleep(FLUSH_DELAY)  # let a burst of decisions gather
            self._write_pending()

    def _write_pending(self) -> None:
        with self.lock:
            target = self._requested
            changes, upto = dict(self.pending), self.pending_bytes
        if changes:
            try:
                with folder_lock(self.run, RUN_LOCK_NAME, "the run folder", "the run folder",
                                 wait_s=30.0):
                    update_index(self.run, {t: {"review_status": s} for t, s in changes.items()})
                    mark_applied(self.run, upto)
                self.flush_error = ""
            except (InputError, OSError) as exc:  # kept pending; the log holds them
                self.flush_error = f"index.csv not written yet: {exc}"
                log.warning("review server: %s", self.flush_error)
                with self._wake:
                    self._flushed = target
                    self._wake.notify_all()
                return
            with self.lock:
                for tile_id, status in changes.items():
                    if self.pending.get(tile_id) == status:
                        del self.pending[tile_id]
                self.index_stat = self._stat()
        with self._wake:
            self._flushed = max(self._flushed, target)
            self._wake.notify_all()

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until ``index.csv`` holds every decision made so far (or write them now
        when the writer thread is not running)."""
        if self._writer is None:
            self._write_pending()
            return
        with self._wake:
            target = self._requested
            self._wake.wait_for(lambda: self._flushed >= target, timeout=timeout)

    def stop(self) -> None:
        """Write what is pending and stop the writer thread."""
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=120.0)
        self._write_pending()

    # ------------------------------------------------------------------ decisions

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

    def replay_project(self) -> int:
        """Write into the project the logged decisions newer than its last save whose
        entry holds another status (a server killed between its log append and its
        project write); returns how many entries changed."""
        if self.project is None or self.opened is None:
            return 0
        project = self.opened
        saved = (project.modify_timestamp / 1000.0 if project.modify_timestamp
                 else project.file.stat().st_mtime)
        newer: dict[str, str] = {}
        for record in read_decisions(self.run):
            when = decision_time(record)
            if when is not None and when > saved and record["status"] in REVIEW_STATUSES:
                newer[record["id"]] = record["status"]
        run_name = default_run_name(self.run, project.file)
        changed = 0
        for tile_id, status in newer.items():
            entry = project.synthetic_entry(run_name, tile_id)
            if entry is not None and entry.metadata.get(META_REVIEW) != status:
                project.set_metadata(entry, META_REVIEW, status)
                changed += 1
        if changed:
            with project_lock(self.project, wait_s=2.0, purpose="histosynth review serve"):
                project.save()
        return changed

    def counts(self) -> dict[str, int]:
        """Rows per review status."""
        return {name: n for name, n in self.status_counts.items() if n}

    def decide(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Log and apply one decision; the new status and the progress counts."""
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
            row = self.rows.get(tile_id)
            if row is None:
                raise InputError("no such tile in the run", item=tile_id)
            record = {
                "time": utc_now_ms(),
                "id": tile_id,
                "status": status,
                "before": review_status(row),
                "reviewer": reviewer.strip(),
                "comment": comment.strip(),
                "undo": bool(payload.get("undo")),
                "source": "browser",
            }
            self.pending_bytes = append_decision(self.run, record)
            self.pending[tile_id] = status
            self.status_counts[record["before"]] -= 1
            self.status_counts[status] += 1
            row["review_status"] = status
            warning = self.write_project(tile_id, status) or self.flush_error
            counts = self.counts()
        with self._wake:
            self._requested += 1
            self._wake.notify_all()
        if self._writer is None:
            self.flush()
        return {
            "id": tile_id,
            "status": status,
            "decided": len(self.rows) - counts.get("pending", 0),
            "total": len(self.rows),
            "counts": counts,
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
    """The listening server; :func:`make_server` sets what its handlers read."""

    request_queue_size = BACKLOG
    daemon_threads = True
    state: ReviewServer | None = None
    #: the run folder, resolved: only PNG files below it are served
    run_root: Path | None = None
    #: ``Host`` header values accepted, lower case (defeats DNS rebinding)
    allowed_hosts: frozenset[str] = frozenset()
    #: seconds a connection may take to send its request (and stay idle)
    request_timeout: float = REQUEST_TIMEOUT

    def server_close(self) -> None:
        super().server_close()
        if self.state is not None:
            self.state.stop()  # what is pending goes into index.csv


class _Handler(BaseHTTPRequestHandler):
    """One request: the gallery page, a run image, or a decision (``/api/decision``)."""

    server: _Server
    server_version = "histosynth-review"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # the connection's read timeout
        super().setup()

    @property
    def state(self) -> ReviewServer:
        state = self.server.state
        assert state is not None, "make_server sets the state"
        return state

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
        if self.headers.get("Host", "").lower() in self.server.allowed_hosts:
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
        return value is not None and _same(value, self.state.token)

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        if url.path in ("/", "/review.html"):
            self._page(parse_qs(url.query))
        elif not self._cookie_ok():
            self._send(HTTPStatus.FORBIDDEN, b"", "text/plain")
        else:
            self._image(url.path)

    def _page(self, query: dict[str, list[str]]) -> None:
        """The gallery page (``page``, ``status`` from the query), for the token or cookie."""
        from histosynth.review.gallery import gallery_html

        state = self.state
        given = query.get("token", [""])[0]
        if not (_same(given, state.token) or self._cookie_ok()):
            self._send(
                HTTPStatus.FORBIDDEN,
                b"open the URL the command printed\n",
                "text/plain; charset=utf-8",
            )
            return
        try:
            number = int(query.get("page", ["1"])[0])
        except ValueError:
            number = 1
        wanted = [s for s in query.get("status", [""])[0].split(",") if s]
        page = gallery_html(
            state.run, review_token=state.token, rows=state.current_rows(),
            page=number, statuses=wanted,
        ).encode("utf-8")
        cookie = f"{COOKIE}={state.token}; HttpOnly; SameSite=Strict; Path=/"
        self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", {"Set-Cookie": cookie})

    def _image(self, path: str) -> None:
        """A PNG file inside the run (by resolved path), else 404."""
        run_root = self.server.run_root
        assert run_root is not None, "make_server sets the run root"
        try:
            target = (run_root / unquote(path).lstrip("/")).resolve()
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
        if not _same(given, self.state.token):
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
            self._json(HTTPStatus.OK, self.state.decide(payload))
        except (ValueError, InputError, RecursionError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)[:300]})


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
    with folder_lock(run, RUN_LOCK_NAME, "the run folder", "the run folder", wait_s=30.0):
        replayed = replay_decisions(run)  # what a killed server logged but did not write
    if replayed:
        log.warning("%s: %d logged decision(s) written into index.csv", run, len(replayed))
    state = ReviewServer(run, project_file)
    if state.replay_project():
        log.warning("%s: logged decision(s) written into %s", run, project_file)
    hosts: set[str] = {h.lower() for h in allow_hosts}
    server = _Server((host, port), _Handler)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    names = {str(shown), host, *(["localhost", "127.0.0.1", "[::1]"] if host in LOOPBACK else [])}
    hosts |= {f"{name}:{bound_port}".lower() for name in names}
    server.allowed_hosts = frozenset(hosts)
    server.run_root = run.resolve()
    server.request_timeout = REQUEST_TIMEOUT
    server.state = state
    state.start()
    return server, state, f"http://{shown}:{bound_port}/?token={state.token}"
