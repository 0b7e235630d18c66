"""File URIs as QuPath (Java) writes them, and back to local paths.

QuPath stores image and project locations as ``java.net.URI`` strings: ``File.toURI()``
gives ``file:/abs/path`` (one slash, no authority), the path quoted by ``java.net.URI``'s
rules, and Gson writes the URI with ``toASCIIString()``, so non-ASCII characters end up
NFC-normalised and percent-encoded as UTF-8. Windows paths look like ``file:/D:/dir/x.svs``,
UNC shares like ``file:////server/share/x.svs``.

A project moves between machines, so a URI may name a Windows path while we run on Linux:
:func:`uri_to_path` returns a native :class:`pathlib.Path` when the URI's flavour matches
the running OS and a :class:`pathlib.PureWindowsPath` / :class:`pathlib.PurePosixPath`
otherwise (``isinstance(p, Path)`` tells whether it can be checked on disk).
"""

from __future__ import annotations

import os
import re
import string
import unicodedata
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from urllib.parse import unquote

from histosynth.integration.errors import InputError

__all__ = [
    "is_file_uri",
    "java_quote_path",
    "lexical_relative",
    "path_to_uri",
    "relocate",
    "uri_to_path",
]

# java.net.URI's legal path characters, left unquoted by its multi-argument constructors:
# unreserved (alphanumerics and "-_.!~*'()"), pchar punctuation ":@&=+$," and ";/".
_JAVA_PATH_SAFE = frozenset(string.ascii_letters + string.digits + "-_.!~*'()" + ":@&=+$,;/")
_DRIVE = re.compile(r"^/?([A-Za-z])[:|](?=/|$)")
_WINDOWS = os.name == "nt"


def _percent(text: str) -> str:
    """UTF-8 percent-encoding of ``text`` with upper-case hex, like Java."""
    data = text.encode("utf-8", errors="surrogateescape")
    return "".join(f"%{byte:02X}" for byte in data)


def java_quote_path(path: str, *, ascii_only: bool = True) -> str:
    """Quote a URI path component exactly as ``java.net.URI`` does.

    ASCII characters outside the legal path set become ``%XX``; non-ASCII space and
    control characters are encoded too (``URI.toString()``). With ``ascii_only`` the
    result is what ``URI.toASCIIString()`` (and so Gson, and QuPath's project file)
    gives: the string NFC-normalised and every other non-ASCII character encoded.
    """
    out = []
    for char in path:
        if char < "\u0080":
            out.append(char if char in _JAVA_PATH_SAFE else _percent(char))
        elif unicodedata.category(char) in ("Zs", "Zl", "Zp", "Cc"):
            out.append(_percent(char))
        else:
            out.append(char)
    quoted = "".join(out)
    if not ascii_only or quoted.isascii():
        return quoted
    quoted = unicodedata.normalize("NFC", quoted)
    return "".join(c if c < "\u0080" else _percent(c) for c in quoted)


def path_to_uri(
    path: str | os.PathLike, *, directory: bool | None = None, ascii_only: bool = True
) -> str:
    """The URI Java's ``File.toURI()`` gives for ``path``: ``file:/abs/path``.

    Args:
        path: a local path (made absolute) or a ``PureWindowsPath`` / ``PurePosixPath``
            of another machine (must then be absolute).
        directory: append ``/`` like Java does for a directory; ``None`` checks the disk
            (native paths only).
        ascii_only: percent-encode non-ASCII characters, as QuPath's JSON holds them
            (``False`` gives ``URI.toString()``, used for the project's own ``uri``).
    """
    if isinstance(path, PureWindowsPath) or (_WINDOWS and not isinstance(path, PurePosixPath)):
        pure: PurePath = PureWindowsPath(path)
        if _WINDOWS and not pure.is_absolute():
            pure = PureWindowsPath(Path(path).absolute())
        if not pure.is_absolute():
            raise InputError(f"not an absolute Windows path: {str(path)!r}", item="path")
        text = str(pure).replace("\\", "/")
    else:
        pure = PurePosixPath(path)
        if not pure.is_absolute():
            if isinstance(path, PurePosixPath) and not isinstance(path, Path) and os.name == "nt":
                raise InputError(f"not an absolute POSIX path: {str(path)!r}", item="path")
            pure = PurePosixPath(Path(path).absolute())
        text = str(pure)
    if not text.startswith("/"):
        text = "/" + text  # Java's slashify: "D:/x" -> "/D:/x"
    if text.startswith("//"):
        text = "//" + text  # UNC share: File.toURI() gives "file:////server/share/..."
    if directory is None:
        directory = isinstance(path, Path) and Path(path).is_dir()
    if directory and not text.endswith("/"):
        text += "/"
    return "file:" + java_quote_path(text, ascii_only=ascii_only)


def is_file_uri(uri: str) -> bool:
    """True for a ``file:`` URI (any case)."""
    return isinstance(uri, str) and uri.strip()[:5].lower() == "file:"


def uri_to_path(uri: str) -> PurePath:
    """The local path a ``file:`` URI names (Java ``Paths.get(URI)`` semantics).

    Accepts ``file:/abs``, ``file:///abs``, ``file://localhost/abs``, Windows drives
    (``file:/D:/x``, ``file:///D:/x``, ``file:/D|/x``), UNC shares (``file:////srv/share/x``,
    ``file://srv/share/x``) and percent-encoding, including UTF-8 non-ASCII. A query or
    fragment is ignored. Returns a native ``Path`` when the flavour matches this OS,
    else a ``PureWindowsPath`` / ``PurePosixPath``.

    Raises:
        InputError: not a ``file:`` URI, or no path in it.
    """
    if not is_file_uri(uri):
        raise InputError(f"not a file URI: {uri!r}", item="uri")
    rest = uri.strip()[5:]
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    unc = False
    if rest.startswith("//"):
        authority, slash, tail = rest[2:].partition("/")
        if authority and authority.lower() != "localhost":
            rest, unc = "//" + authority + slash + tail, True
        else:
            rest = slash + tail
    text = unquote(rest, encoding="utf-8", errors="surrogateescape")
    if not text or text == "//":
        raise InputError(f"no path in URI {uri!r}", item="uri")
    drive = _DRIVE.match(text)
    if drive:
        rest_of_path = text[drive.end() :] or "/"
        return _windows(f"{drive.group(1)}:{rest_of_path}")
    if unc or text.startswith("//"):
        share = PureWindowsPath("//" + text.lstrip("/"))
        if not share.is_absolute():
            raise InputError(f"incomplete UNC path (//server/share/...) in URI {uri!r}", item="uri")
        return _windows(str(share))
    if not text.startswith("/"):
        raise InputError(f"not an absolute path in URI {uri!r}", item="uri")
    return Path(text) if not _WINDOWS else PurePosixPath(text)


def _windows(text: str) -> PurePath:
    return Path(text) if _WINDOWS else PureWindowsPath(text)


def _same_flavour(a: PurePath, b: PurePath) -> bool:
    return isinstance(a, PureWindowsPath) == isinstance(b, PureWindowsPath)


def _key(part: str, windows: bool) -> str:
    return part.casefold() if windows else part


def lexical_relative(target: PurePath, base: PurePath) -> PurePath | None:
    """``base.relativize(target)`` like Java's ``Path``: lexical, with ``..`` steps.

    ``None`` when the two do not share a flavour and an anchor (drive or root); Windows
    components compare case-insensitively.
    """
    if not _same_flavour(target, base) or not target.is_absolute() or not base.is_absolute():
        return None
    windows = isinstance(target, PureWindowsPath)
    if _key(target.anchor, windows) != _key(base.anchor, windows):
        return None
    t_parts, b_parts = _normal_parts(target), _normal_parts(base)
    common = 0
    for tp, bp in zip(t_parts, b_parts, strict=False):
        if _key(tp, windows) != _key(bp, windows):
            break
        common += 1
    steps = [".."] * (len(b_parts) - common) + t_parts[common:]
    return PurePosixPath(*steps) if steps else PurePosixPath(".")


def _normal_parts(path: PurePath) -> list[str]:
    """Components after the anchor, with ``.`` dropped and ``name/..`` folded (Java normalize)."""
    parts: list[str] = []
    for part in path.parts[1:] if path.anchor else path.parts:
        if part in ("", "."):
            continue
        if part == ".." and parts and parts[-1] != "..":
            parts.pop()
        elif part == ".." and path.anchor:
            continue  # ".." above the root stays at the root
        else:
            parts.append(part)
    return parts


def relocate(target: PurePath, old_base: PurePath, new_base: Path) -> Path | None:
    """Where ``target`` lies now if everything under ``old_base``'s parent tree moved with it.

    QuPath's ``UriUpdater.relative``: ``new_base.resolve(old_base.relativize(target))``,
    normalised. ``new_base`` is a local absolute folder; ``old_base`` and ``target`` may
    be paths of another machine (a Windows project opened on Linux works when the image
    was on the same drive as the project). ``None`` when the two are not comparable.
    """
    relative = lexical_relative(target, old_base)
    if relative is None:
        return None
    joined = PurePosixPath(new_base.as_posix()) if not _WINDOWS else PurePath(new_base)
    for part in relative.parts:
        joined = joined / part
    anchor = Path(joined.anchor)
    return anchor.joinpath(*_normal_parts(joined))
