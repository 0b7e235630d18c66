"""Atomic writes: whole files or nothing, normal permissions, no temp files left."""

from __future__ import annotations

import json
import os

import pytest

from histosynth.common.files import atomic_write_bytes, atomic_write_json


def test_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"b": "µm"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"b": "µm"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"keep": True})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"keep": True}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
