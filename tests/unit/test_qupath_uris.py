"""URI <-> path conversion as QuPath (Java) writes it, and moved-project relocation."""

from __future__ import annotations

import os
import posixpath
import random
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.integration.errors import InputError
from histosynth.integration.qupath.uris import (
    is_file_uri,
    java_quote_path,
    lexical_relative,
    path_to_uri,
    relocate,
    uri_to_path,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX paths are native here")

# ------------------------------------------------------------------ uri_to_path


def test_fixture_windows_uris_become_windows_paths() -> None:
    uri = (
        "file:/I:/COAD-TCGA-Diagnostic-Slide/00d69f69-3120-4b0c-8985-aab4edf9bc4b/"
        "TCGA-D5-5539-01Z-00-DX1.9c46fe78-2adb-4f49-9141-cda135c2c90b.svs"
    )
    path = uri_to_path(uri)
    assert isinstance(path, PureWindowsPath)
    assert path.drive == "I:"
    assert path.parts[1] == "COAD-TCGA-Diagnostic-Slide"
    assert path.name == "TCGA-D5-5539-01Z-00-DX1.9c46fe78-2adb-4f49-9141-cda135c2c90b.svs"


def test_fixture_project_uri_with_spaces_and_parentheses() -> None:
    path = uri_to_path("file:/D:/QuPath%20COAD%20Project%20(Annotated)/project.qpproj")
    assert path == PureWindowsPath("D:/QuPath COAD Project (Annotated)/project.qpproj")
    assert path.parent.name == "QuPath COAD Project (Annotated)"


def test_percent_encoded_non_ascii_is_decoded_as_utf8() -> None:
    path = uri_to_path(
        "file:/E:/KONTROLHE_2025/%C5%9EUBAT19.02.25_HE_0/kontrol19.02.2025_11_1_SS45328_041327.svs"
    )
    assert path.parts[2] == "\u015eUBAT19.02.25_HE_0"  # Ş: LATIN CAPITAL LETTER S WITH CEDILLA
    assert path.drive == "E:"


@posix_only
@pytest.mark.parametrize(
    "uri",
    [
        "file:/home/phm/a%20b/x.tif",
        "file:///home/phm/a%20b/x.tif",
        "file://localhost/home/phm/a%20b/x.tif",
        "FILE:/home/phm/a%20b/x.tif",
        "file:/home/phm/a%20b/x.tif#fragment",
        "file:/home/phm/a%20b/x.tif?query=1",
    ],
)
def test_posix_forms(uri: str) -> None:
    path = uri_to_path(uri)
    assert isinstance(path, Path)
    assert path == Path("/home/phm/a b/x.tif")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:/D:/x/y.svs", "D:/x/y.svs"),
        ("file:///D:/x/y.svs", "D:/x/y.svs"),
        ("file:/d|/x/y.svs", "d:/x/y.svs"),
        ("file:D:/x/y.svs", "D:/x/y.svs"),
        ("file:/C:", "C:/"),
        ("file:////server/share/dir/y.svs", "//server/share/dir/y.svs"),
        ("file://server/share/dir/y.svs", "//server/share/dir/y.svs"),
    ],
)
def test_windows_forms(uri: str, expected: str) -> None:
    path = uri_to_path(uri)
    assert PureWindowsPath(path) == PureWindowsPath(expected)
    assert PureWindowsPath(path).is_absolute()


def test_plus_is_not_a_space_and_percent_escapes_decode() -> None:
    path = uri_to_path("file:/data/a+b%2Bc%25d%23e")
    assert path.name == "a+b+c%d#e"


@pytest.mark.parametrize(
    "uri", ["https://example.org/x.svs", "omero://x", "", "file:", "file://", "file:relative/x"]
)
def test_not_a_local_path_raises_input_error(uri: str) -> None:
    with pytest.raises(InputError) as info:
        uri_to_path(uri)
    assert "uri" in str(info.value).lower()


def test_is_file_uri() -> None:
    assert is_file_uri("file:/x")
    assert is_file_uri("File:///x")
    assert not is_file_uri("http://x")
    assert not is_file_uri(None)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_uri_to_path_never_fails_with_anything_but_input_error(text: str) -> None:
    for uri in (text, "file:" + text, "file:/" + text):
        try:
            result = uri_to_path(uri)
        except InputError:
            continue
        assert isinstance(result, PurePath)
        assert result.is_absolute()


# ------------------------------------------------------------------ path_to_uri


@posix_only
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # each expected string is what Java 17's File.toURI().toASCIIString() printed
        ("/home/a b/x.tif", "file:/home/a%20b/x.tif"),
        ('/tmp/%25 #?[]{}|\\^`"<>', "file:/tmp/%2525%20%23%3F%5B%5D%7B%7D%7C%5C%5E%60%22%3C%3E"),
        ("/tmp/\u015eUBAT/\u00e9.svs", "file:/tmp/%C5%9EUBAT/%C3%A9.svs"),
        ("/tmp/a;b,c:d@e&f=g+h$i!~*'()", "file:/tmp/a;b,c:d@e&f=g+h$i!~*'()"),
        ("/tmp/x\ty", "file:/tmp/x%09y"),
    ],
)
def test_path_to_uri_matches_java(path: str, expected: str) -> None:
    assert path_to_uri(path, directory=False) == expected


@posix_only
def test_path_to_uri_to_string_form_keeps_non_ascii_letters() -> None:
    path = "/tmp/\u015eUBAT/\u00e9 x.svs"
    assert path_to_uri(path, directory=False, ascii_only=False) == "file:/tmp/ŞUBAT/é%20x.svs"


def test_windows_paths_give_the_fixture_uris_exactly() -> None:
    project = PureWindowsPath("D:/QuPath COAD Project (Annotated)/project.qpproj")
    assert path_to_uri(project) == "file:/D:/QuPath%20COAD%20Project%20(Annotated)/project.qpproj"
    image = PureWindowsPath(
        r"E:\KONTROLHE_2025\ŞUBAT19.02.25_HE_0\kontrol19.02.2025_11_1_SS45328_041327.svs"
    )
    assert path_to_uri(image) == (
        "file:/E:/KONTROLHE_2025/%C5%9EUBAT19.02.25_HE_0/kontrol19.02.2025_11_1_SS45328_041327.svs"
    )
    assert (
        path_to_uri(PureWindowsPath(r"\\server\share\a b.svs")) == "file:////server/share/a%20b.svs"
    )


def test_relative_windows_path_is_refused() -> None:
    with pytest.raises(InputError):
        path_to_uri(PureWindowsPath("D:relative/x.svs"))


@posix_only
def test_directory_gets_trailing_slash_and_relative_paths_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert path_to_uri(tmp_path).endswith("/")
    assert uri_to_path(path_to_uri(tmp_path)) == tmp_path
    (tmp_path / "x y.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert path_to_uri("x y.png") == path_to_uri(tmp_path / "x y.png")
    assert path_to_uri("x y.png").endswith("/x%20y.png")


def test_non_ascii_is_nfc_normalised_like_java() -> None:
    decomposed = "/tmp/e\u0301.svs"  # e + COMBINING ACUTE ACCENT
    uri = path_to_uri(PurePosixPath(decomposed), directory=False)
    assert uri == "file:/tmp/%C3%A9.svs"  # NFC é, as Java's URI.toASCIIString() gives


# segment text: anything but NUL, "/" and surrogates; never "." or ".."
_segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))
_ALLOWED = re.compile(r"^file:/(?:[A-Za-z0-9\-_.!~*'():@&=+$,;/]|%[0-9A-F]{2})*$")


@posix_only
@settings(max_examples=100, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=5))
def test_posix_round_trip(segments: list[str]) -> None:
    if re.match(r"^[A-Za-z][:|]$", segments[0]):  # "/C:/..." reads as a Windows drive
        segments[0] = "x" + segments[0]
    path = PurePosixPath("/", *segments)
    uri = path_to_uri(path, directory=False)
    assert _ALLOWED.match(uri), uri
    back = uri_to_path(uri)
    assert isinstance(back, Path)
    assert str(back) == unicodedata.normalize("NFC", str(path))
    assert path_to_uri(back, directory=False) == uri


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from("CDEIZcd"),
    st.lists(_segment.filter(lambda s: not set(s) & set("\\:")), min_size=1, max_size=5),
)
def test_windows_round_trip(drive: str, segments: list[str]) -> None:
    path = PureWindowsPath(f"{drive}:/", *segments)
    uri = path_to_uri(path)
    assert uri.startswith(f"file:/{drive}:/")
    assert _ALLOWED.match(uri), uri
    back = uri_to_path(uri)
    assert PureWindowsPath(back) == PureWindowsPath(unicodedata.normalize("NFC", str(path)))


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Mn", "Mc", "Me")), max_size=40))
def test_to_string_form_differs_from_ascii_form_only_by_encoding(text: str) -> None:
    # (combining marks are left out: like Java, NFC after quoting could merge one into a
    # preceding "%XX" hex digit)
    raw = java_quote_path("/" + text, ascii_only=False)
    ascii_form = java_quote_path("/" + text)
    assert ascii_form.isascii()
    from urllib.parse import unquote

    nfc = unicodedata.normalize("NFC", unquote(raw))
    assert unquote(ascii_form) == nfc


# ------------------------------------------------------------------ real Java

_JAVA_SOURCE = """
import java.io.*; import java.nio.file.*; import java.util.*; import java.net.*;
public class UriProbe { public static void main(String[] a) throws Exception {
  List<String> lines = Files.readAllLines(Path.of(a[0]), java.nio.charset.StandardCharsets.UTF_8);
  try (var w = new PrintWriter(new OutputStreamWriter(new FileOutputStream(a[1]), "UTF-8"))) {
    for (String l : lines) { URI u = new File(l).toURI();
      w.println(u.toString() + "\\t" + u.toASCIIString()); } } } }
"""


@posix_only
@pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH to compare with")
def test_path_to_uri_agrees_with_java_file_to_uri(tmp_path: Path) -> None:
    rng = random.Random(20240607)
    # units, so that the combining accent only ever follows "e"
    alphabet = [*"abcXYZ019 -_.!~*'()", *":@&=+$,;", *'%#?[]{}|\\^`"<>\t']
    alphabet += ["\u00e9", "\u015e", "\u00fc", "\u4e2d", "\u00a0", "\u3000", "\u0085"]
    alphabet += ["\u2028", "e\u0301", "\U0001f600"]
    paths = []
    for _ in range(150):
        segments = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
            for _ in range(rng.randint(1, 4))
        ]
        segments = [s for s in segments if s.strip(".") and s not in (".", "..")]
        paths.append("/tmp/histosynth-probe/" + "/".join(segments or ["x"]))
    source = tmp_path / "UriProbe.java"
    source.write_text(_JAVA_SOURCE, encoding="utf-8")
    (tmp_path / "in.txt").write_text("\n".join(paths) + "\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "JAVA_TOOL_OPTIONS": "-Dfile.encoding=UTF-8"}
    subprocess.run(
        ["java", str(source), str(tmp_path / "in.txt"), str(tmp_path / "out.txt")],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    rows = (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()
    assert len(rows) == len(paths)
    for path, row in zip(paths, rows, strict=True):
        java_string, java_ascii = row.split("\t")
        assert path_to_uri(PurePosixPath(path), directory=False, ascii_only=False) == java_string
        assert path_to_uri(PurePosixPath(path), directory=False) == java_ascii
        back = uri_to_path(java_ascii)
        assert str(back) == unicodedata.normalize("NFC", path)


# ------------------------------------------------------------------ relocation


def test_lexical_relative_like_java() -> None:
    rel = lexical_relative(PurePosixPath("/a/images/x.svs"), PurePosixPath("/a/b/proj"))
    assert rel == PurePosixPath("../../images/x.svs")
    rel = lexical_relative(PureWindowsPath("D:/Work/img/x.svs"), PureWindowsPath("d:/work/proj"))
    assert rel == PurePosixPath("../img/x.svs")  # drive and names compare case-insensitively
    assert lexical_relative(PureWindowsPath("I:/x.svs"), PureWindowsPath("D:/proj")) is None
    assert lexical_relative(PureWindowsPath("D:/x.svs"), PurePosixPath("/proj")) is None
    assert lexical_relative(PurePosixPath("/p/x"), PurePosixPath("/p/x")) == PurePosixPath(".")


@posix_only
def test_relocate_windows_project_opened_on_linux(tmp_path: Path) -> None:
    moved = relocate(
        PureWindowsPath("D:/Lab/slides/a b.svs"), PureWindowsPath("D:/Lab/p1"), tmp_path
    )
    assert moved == tmp_path.parent / "slides" / "a b.svs"
    inside = relocate(PureWindowsPath("D:/p1/img/x.svs"), PureWindowsPath("D:/p1"), tmp_path)
    assert inside == tmp_path / "img" / "x.svs"
    assert relocate(PureWindowsPath("E:/x.svs"), PureWindowsPath("D:/p1"), tmp_path) is None


@posix_only
@settings(max_examples=100, deadline=None)
@given(
    st.lists(_segment, min_size=1, max_size=4),
    st.integers(min_value=0, max_value=3),
    st.lists(_segment, min_size=1, max_size=3),
    st.lists(_segment, min_size=0, max_size=3),
)
def test_relocate_agrees_with_posix_relpath(
    old: list[str], up: int, tail: list[str], new: list[str]
) -> None:
    up = min(up, len(old))
    old_base = PurePosixPath("/", *old)
    target = PurePosixPath("/", *old[: len(old) - up], *tail)
    new_base = Path("/", *new)
    moved = relocate(target, old_base, new_base)
    expected = posixpath.normpath(
        posixpath.join(str(new_base), posixpath.relpath(str(target), str(old_base)))
    )
    assert moved == Path(expected)
    # unmoved project: the image stays where it was
    assert relocate(target, old_base, Path(old_base)) == Path(target)
