"""Defensive input reading (issue: hostile input): special files refused before reading,
sizes and JSON depth bounded, one InputError naming the file; atomic writes go through a
symbolic link instead of replacing it."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import pytest

from histosynth.common.files import atomic_write_bytes, atomic_write_text
from histosynth.integration.errors import InputError
from histosynth.integration.files import check_not_special, parse_json, read_input_bytes
from histosynth.integration.geojson import read_annotations
from histosynth.integration.qupath import QuPathProject


@pytest.fixture
def alarm():
    """Fail instead of hanging: a SIGALRM after 20 s."""

    def timeout(*_):
        raise TimeoutError("the reader blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_and_a_device_are_refused_before_reading(tmp_path, alarm):
    fifo = tmp_path / "pipe.geojson"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(InputError, match="not a regular file") as err:
            read_annotations(path)
        assert str(path) in str(err.value)
        with pytest.raises(InputError, match="not a regular file"):
            check_not_special(path)
    check_not_special(tmp_path)  # a folder passes: the caller says what it needs
    check_not_special(tmp_path / "missing")


def test_the_command_line_refuses_dev_zero_and_a_fifo_with_one_line(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for args in (
        ["--slide", "/dev/zero", "--annotations", "/dev/zero"],
        ["--slide", fifo, "--annotations", fifo],
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "histosynth",
                "extract",
                *map(str, args),
                "--class",
                "V",
                "--out",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and "not a regular file" in errors[0], done.stderr
        assert not (tmp_path / "out").exists()


def test_sizes_are_bounded_compressed_or_not(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"[" + b"0," * 20 + b"0]")
    assert read_input_bytes(path, max_bytes=100) == path.read_bytes()
    with pytest.raises(InputError, match="more than the 10 bytes"):
        read_input_bytes(path, max_bytes=10)
    bomb = tmp_path / "bomb.geojson"
    bomb.write_bytes(gzip.compress(b" " * 100_000))
    assert len(bomb.read_bytes()) < 1000
    with pytest.raises(InputError, match="decompresses to more"):
        read_input_bytes(bomb, max_bytes=10_000, gunzip=True)
    with pytest.raises(InputError, match="is a folder"):
        read_input_bytes(tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_input_bytes(tmp_path / "missing")


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_json_nested_too_deeply_is_one_clear_error(tmp_path, depth):
    deep = "[" * depth + "]" * depth
    with pytest.raises(InputError, match="nested too deeply"):
        parse_json(deep, "x.json")
    geojson = tmp_path / "deep.geojson"
    geojson.write_text(deep)
    with pytest.raises(InputError, match="nested too deeply"):
        read_annotations(geojson)
    project = tmp_path / "p" / "project.qpproj"
    project.parent.mkdir()
    project.write_text('{"version": "0.5.1", "images": ' + deep + "}")
    with pytest.raises(InputError, match="nested too deeply") as err:
        QuPathProject(project)
    assert "project.qpproj" in str(err.value)
    assert parse_json("[[1]]", None) == [[1]]


def test_atomic_writes_go_through_a_symbolic_link(tmp_path):
    """A lab that keeps project.qpproj elsewhere and links it into the project: the link
    stays a link and its target gets the new content."""
    target = tmp_path / "real" / "project.qpproj"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "project.qpproj"
    link.symlink_to(target)
    atomic_write_text(link, json.dumps({"version": "0.5.1"}))
    assert link.is_symlink() and json.loads(target.read_text()) == {"version": "0.5.1"}
    chain = tmp_path / "chain"
    chain.symlink_to(link)
    atomic_write_bytes(chain, b"x")
    assert chain.is_symlink() and link.is_symlink() and target.read_bytes() == b"x"
    assert not list(target.parent.glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_folder_written_in_place_replaces_the_old_one_only_when_it_is_whole(tmp_path):
    from histosynth.common.files import folder_written_in_place

    target = tmp_path / "model"
    with folder_written_in_place(target) as tmp:
        (tmp / "weights").write_text("one")
    assert (target / "weights").read_text() == "one"
    with pytest.raises(RuntimeError), folder_written_in_place(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed while writing")
    assert (target / "weights").read_text() == "one"
    with folder_written_in_place(target) as tmp:
        (tmp / "weights").write_text("two")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or old folder
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert (target / "weights").read_text() == "two"
