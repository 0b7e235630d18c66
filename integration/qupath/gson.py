"""``project.qpproj`` as text, the way QuPath's Gson writes it: pretty-printed JSON with
Gson's escapes, and new image entries appended to the existing text so that every byte of
the original entries stays as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "append_entries_text",
    "check_append",
    "check_metadata_edit",
    "gson_json",
    "set_metadata_text",
]

# Gson (QuPath's GsonTools) escapes HTML characters and the JavaScript line separators.
_GSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "=": "\\u003d",
    "'": "\\u0027",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


_GSON_RE = re.compile("[" + re.escape("".join(_GSON_ESCAPES)) + "]")


_WS = re.compile(r"[ \t\n\r]*")
_CLOSING = {"{": "}", "[": "]"}


def gson_json(value: Any, *, indent: str | None = "  ", newline: str = "\n", base: str = "") -> str:
    """``value`` as QuPath's Gson writes it: pretty (``indent`` per level, ``": "``,
    empty ``[]`` / ``{}``) or compact (``indent=None``); non-ASCII kept, ``< > & = '``
    escaped. Lines after the first start with ``base``."""
    if indent is None:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(value, ensure_ascii=False, indent=indent)
        text = text.replace("\n", newline + base)
    return _GSON_RE.sub(lambda m: _GSON_ESCAPES[m.group()], text)


def _first_item(text: str, pos: int, bracket: str, what: str) -> int | None:
    """Where the first item of the JSON container opened by ``bracket`` (``{`` or ``[``)
    at ``pos`` starts; ``None`` when the container is empty."""
    if not text.startswith(bracket, pos):
        raise ValueError(f"it is not a JSON {what}")
    pos = _WS.match(text, pos + 1).end()
    return None if text.startswith(_CLOSING[bracket], pos) else pos


def _next_item(text: str, end: int, closing: str) -> int | None:
    """Where the item after the one ending at ``end`` starts; ``None`` when the container
    closes (``closing``: ``}`` or ``]``) there."""
    pos = _WS.match(text, end).end()
    if text.startswith(",", pos):
        return _WS.match(text, pos + 1).end()
    if text.startswith(closing, pos):
        return None
    raise ValueError(f"',' or '{closing}' expected at character {pos}")


def _members(text: str) -> list[tuple[str, int, int, int]]:
    """Top-level members of a JSON object text: (key, key start, value start, value end)."""
    decoder = json.JSONDecoder()
    members: list[tuple[str, int, int, int]] = []
    pos = _first_item(text, _WS.match(text, 0).end(), "{", "object")
    while pos is not None:
        key_start = pos
        key, pos = decoder.raw_decode(text, pos)
        if not isinstance(key, str):
            raise ValueError(f"a key is not a string at character {key_start}")
        pos = _WS.match(text, pos).end()
        if not text.startswith(":", pos):
            raise ValueError(f"':' expected at character {pos}")
        value_start = _WS.match(text, pos + 1).end()
        _, pos = decoder.raw_decode(text, value_start)
        members.append((key, key_start, value_start, pos))
        pos = _next_item(text, pos, "}")
    return members


def _elements(text: str, start: int) -> list[tuple[int, int]]:
    """(start, end) of each element of the JSON array whose ``[`` is at ``start``."""
    decoder = json.JSONDecoder()
    out: list[tuple[int, int]] = []
    pos = _first_item(text, start, "[", "array")
    while pos is not None:
        _, end = decoder.raw_decode(text, pos)
        out.append((pos, end))
        pos = _next_item(text, end, "]")
    return out


def set_metadata_text(
    text: str, changes: Mapping[int, Mapping[str, str]], modify_timestamp: int | None = None
) -> str:
    """``project.qpproj`` text with metadata values of existing entries replaced
    (``changes``: position in ``images`` → {key: new value}), and ``modifyTimestamp``
    when given; every other character kept.

    Raises:
        ValueError: no such entry, an entry without ``metadata`` or without the key (only
            existing values are changed), or text that is not a project.
    """
    members = {key: (ks, vs, ve) for key, ks, vs, ve in _members(text)}
    if "images" not in members:
        raise ValueError("it has no 'images' list")
    elements = _elements(text, members["images"][1])
    edits: list[tuple[int, int, str]] = []
    for index, values in changes.items():
        if not 0 <= index < len(elements):
            raise ValueError(f"there is no image {index}")
        es, ee = elements[index]
        entry = {key: (es + vs, es + ve) for key, _, vs, ve in _members(text[es:ee])}
        if "metadata" not in entry:
            raise ValueError(f"image {index} has no metadata")
        ms, me = entry["metadata"]
        meta = {key: (ms + vs, ms + ve) for key, _, vs, ve in _members(text[ms:me])}
        for key, value in values.items():
            if key not in meta:
                raise ValueError(f"image {index} has no metadata {key!r}")
            edits.append((*meta[key], gson_json(str(value), indent=None)))
    if modify_timestamp is not None and "modifyTimestamp" in members:
        _, vs, ve = members["modifyTimestamp"]
        edits.append((vs, ve, json.dumps(modify_timestamp)))
    for begin, stop, replacement in sorted(edits, reverse=True):
        text = text[:begin] + replacement + text[stop:]
    return text


def check_metadata_edit(
    old: dict[str, Any], new: dict[str, Any], changes: Mapping[int, Mapping[str, str]]
) -> None:
    """Guard: ``new`` is ``old`` with exactly these metadata values (and the timestamp)."""
    expected = json.loads(json.dumps(old))
    for index, values in changes.items():
        expected["images"][index]["metadata"].update({k: str(v) for k, v in values.items()})
    expected["modifyTimestamp"] = new.get("modifyTimestamp", old.get("modifyTimestamp"))
    if "modifyTimestamp" not in old:
        expected.pop("modifyTimestamp", None)
    if not _same_json(expected, new):  # a bug here, never bad input: refuse to write
        raise RuntimeError("project text rewrite failed: the metadata edit changed more")


def _line_indent(text: str, pos: int) -> str | None:
    """The whitespace from the line start to ``pos``; ``None`` when other text precedes."""
    start = text.rfind("\n", 0, pos) + 1
    lead = text[start:pos]
    if start == 0 or lead.strip(" \t"):
        return None
    return lead


def append_entries_text(
    text: str, entries: Sequence[Mapping[str, Any]], last_id: int, modify_timestamp: int
) -> str:
    """``project.qpproj`` text with ``entries`` appended to ``images``, ``lastID`` and
    ``modifyTimestamp`` replaced; every other character kept.

    The new entries follow the file's style: its indentation unit and line ends when it
    is pretty-printed (as QuPath writes it), one line when it is compact. A missing
    ``lastID`` / ``createTimestamp`` / ``modifyTimestamp`` (QuPath's loader needs the
    timestamps) is inserted before ``images``.

    Raises:
        ValueError: the text is not a JSON object with an ``images`` list.
    """
    members = {key: (ks, vs, ve) for key, ks, vs, ve in _members(text)}
    if "images" not in members:
        raise ValueError("it has no 'images' list")
    images_key, start, end = members["images"]
    if not text.startswith("[", start):
        raise ValueError("'images' is not a list")
    newline = "\r\n" if "\r\n" in text else "\n"
    key_indent = _line_indent(text, images_key)
    pretty = key_indent is not None
    last = end - 2  # the character before the closing "]"
    while last > start and text[last] in " \t\r\n":
        last -= 1
    first = _WS.match(text, start + 1).end()
    unit = key_indent or "  "
    element_indent = (key_indent or "") + unit
    between = text[start + 1 : first]
    if last > start and "\n" in between:
        element_indent = between.rsplit("\n", 1)[1]
        if key_indent is not None and element_indent.startswith(key_indent):
            unit = element_indent[len(key_indent) :] or unit
    elif last > start:
        pretty = False

    def entry_text(item: Mapping[str, Any]) -> str:
        if pretty:
            return element_indent + gson_json(
                item, indent=unit, newline=newline, base=element_indent
            )
        return gson_json(item, indent=None)

    joiner = "," + newline if pretty else ","
    body = joiner.join(entry_text(item) for item in entries)
    edits: list[tuple[int, int, str]] = []
    if not entries:
        pass
    elif last == start:  # empty list
        if pretty:
            edits.append((start, end, "[" + newline + body + newline + (key_indent or "") + "]"))
        else:
            edits.append((start, end, "[" + body + "]"))
    else:
        edits.append((last + 1, last + 1, joiner + body))
    inserted = []
    for key, value in (
        ("createTimestamp", None),
        ("modifyTimestamp", modify_timestamp),
        ("lastID", last_id),
    ):
        if key in members:
            if value is not None:
                _, vs, ve = members[key]
                edits.append((vs, ve, json.dumps(value)))
        else:
            value = modify_timestamp if value is None else value
            sep = ": " if pretty else ":"
            inserted.append(f"{json.dumps(key)}{sep}{json.dumps(value)},")
    if inserted:
        glue = newline + (key_indent or "") if pretty else ""
        edits.append((images_key, images_key, glue.join(inserted) + glue))
    for begin, stop, replacement in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        text = text[:begin] + replacement + text[stop:]
    return text


def _same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_append(old: dict[str, Any], new: dict[str, Any], added: list[dict[str, Any]]) -> None:
    """Guard: ``new`` is ``old`` plus ``added`` entries (and new lastID/timestamps)."""
    count = len(old["images"])
    problems = []
    if not _same_json(new["images"][:count], old["images"]):
        problems.append("original entries differ")
    if not _same_json(new["images"][count:], added):
        problems.append("new entries differ")
    for key, value in old.items():
        if key not in ("images", "lastID", "modifyTimestamp") and not _same_json(
            new.get(key), value
        ):
            problems.append(f"key {key!r} differs")
    if problems:  # a bug here, never bad input: refuse to write
        raise RuntimeError("project text rewrite failed: " + "; ".join(problems))
