"""``histosynth adapters list [--json]`` on a real adapter library: adapters made on the
real ``tiny`` engine and written by ``save_adapter`` (as ``train lora`` writes them), listed
in a process of their own that imports no model library, and every listed name loaded
back the way ``synthesize --adapter NAME`` loads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from histosynth.synthesis.adapters import (
    METADATA_FILE,
    create_adapter,
    loaded_adapters,
    read_adapter_info,
    save_adapter,
    unload_adapter,
)
from histosynth.workflows.adapters import ADAPTER_KEYS

HEAVY = ("torch", "diffusers", "timm", "peft", "tiatoolbox", "safetensors")

PROBE = r"""
import json, sys
from click.testing import CliRunner
from histosynth.cli import main
result = CliRunner().invoke(main, json.loads(sys.argv[1]))
print(json.dumps({"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                  "heavy": sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)}))
"""


def listing(library: Path | None, *args: str) -> dict:
    """``histosynth adapters list ARGS`` in a fresh process with ``$HISTOSYNTH_ADAPTERS`` =
    ``library``: exit code, stdout, stderr and the model libraries it imported."""
    env = dict(os.environ)
    env.pop("HISTOSYNTH_ADAPTERS", None)
    if library is not None:
        env["HISTOSYNTH_ADAPTERS"] = str(library)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(["adapters", "list", *args]), json.dumps(HEAVY)],
        capture_output=True, text=True, timeout=120, check=True, env=env,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, untrained_engine) -> Path:
    """Two adapters on the tiny engine's transformer, saved into a library and unloaded."""
    root = tmp_path_factory.mktemp("adapters") / "library"
    model = untrained_engine.transformer
    for name, domain, rank in (("lab-he", "our H&E, scanner X — ünïcode", 4),
                               ("ihc-brown", "", 8)):
        create_adapter(model, name, rank=rank, alpha=rank, domain=domain, base_id="tiny")
        save_adapter(model, name, root / name)
        unload_adapter(model, name)
    (root / ".lab-he.tmp-0000").mkdir()  # an interrupted write: not an adapter
    (root / "README.txt").write_text("a file beside the adapters\n")
    assert not loaded_adapters(model)
    return root


def test_json_lists_every_adapter_with_the_documented_keys(library: Path) -> None:
    result = listing(library, "--json")
    assert result["code"] == 0 and result["heavy"] == [], result
    assert result["stdout"].isascii()  # any console encoding reads it
    records = json.loads(result["stdout"])
    assert [r["name"] for r in records] == ["ihc-brown", "lab-he"]
    for record in records:
        assert tuple(record) == ADAPTER_KEYS
        info = read_adapter_info(library / record["name"])
        assert record == {
            "name": info.name,
            "base_model": "tiny",
            "base_hash": info.base_hash,
            "rank": info.rank,
            "alpha": info.alpha,
            "tile_size": 256,
            "domain": info.domain,
            "created": info.created,
            "histosynth_version": info.histosynth_version,
            "metrics": {},
            "path": str(library / record["name"]),
        }
    assert [r["rank"] for r in records] == [8, 4]
    assert records[1]["domain"] == "our H&E, scanner X — ünïcode"


def test_a_listed_name_is_what_synthesize_adapter_loads(library: Path, untrained_engine,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from histosynth.workflows.synthesize.tile_plan import adapter_folder, load_adapter_for

    monkeypatch.setenv("HISTOSYNTH_ADAPTERS", str(library))
    for record in json.loads(listing(library, "--json")["stdout"]):
        assert adapter_folder(record["name"]) == Path(record["path"])
        assert load_adapter_for(untrained_engine, record["name"]) == record["name"]
    assert sorted(loaded_adapters(untrained_engine.transformer)) == ["ihc-brown", "lab-he"]
    for name in ("ihc-brown", "lab-he"):
        unload_adapter(untrained_engine.transformer, name)


def test_plain_list_is_a_table(library: Path) -> None:
    result = listing(library)
    assert result["code"] == 0 and result["heavy"] == [], result
    lines = result["stdout"].splitlines()
    assert lines[0] == f"adapter library: {library}"
    assert lines[1].split() == ["NAME", "BASE", "RANK", "TILE", "PX", "CREATED", "DOMAIN",
                                "FOLDER"]
    ihc, lab = lines[2].split(), lines[3].split()
    assert ihc[:4] == ["ihc-brown", "tiny", "8", "256"] and ihc[-1] == str(library / "ihc-brown")
    assert lab[:4] == ["lab-he", "tiny", "4", "256"] and lab[-1] == str(library / "lab-he")
    assert len(lines) == 4


@pytest.mark.parametrize("state", ["missing", "empty", "only a half-written adapter"])
def test_an_empty_library_is_an_empty_list(tmp_path: Path, state: str) -> None:
    root = tmp_path / "library"
    if state != "missing":
        root.mkdir()
    if state == "only a half-written adapter":
        (root / ".style.tmp-1234").mkdir()
    result = listing(root, "--json")
    assert (result["code"], result["stdout"], result["stderr"]) == (0, "[]\n", "")
    plain = listing(root)
    assert plain["code"] == 0 and plain["stdout"].splitlines()[1] == "(no adapters)"


def test_the_library_option_overrides_the_environment(library: Path, tmp_path: Path) -> None:
    result = listing(tmp_path / "elsewhere", "--json", "--library", str(library))
    assert [r["name"] for r in json.loads(result["stdout"])] == ["ihc-brown", "lab-he"]


def _copy_library(library: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(library, to, symlinks=True)
    return to


@pytest.mark.parametrize(
    "damage, says",
    [
        ("no metadata", "missing"),
        ("not JSON", "not readable JSON"),
        ("a bad rank", "rank: expected a positive integer, found -2"),
    ],
)
def test_an_unreadable_entry_is_one_line_naming_the_file(
    library: Path, tmp_path: Path, damage: str, says: str
) -> None:
    root = _copy_library(library, tmp_path / "library")
    meta = root / "lab-he" / METADATA_FILE
    if damage == "no metadata":
        meta.unlink()
    elif damage == "not JSON":
        meta.write_text('{"format": 1, "name": ', encoding="utf-8")
    else:
        data = json.loads(meta.read_text(encoding="utf-8"))
        meta.write_text(json.dumps({**data, "rank": -2}), encoding="utf-8")
    for args in (("--json",), ()):
        result = listing(root, *args)
        assert result["code"] == 1 and result["stdout"] == "", result
        lines = result["stderr"].splitlines()
        assert len(lines) == 1 and lines[0].startswith("histosynth: error: "), result
        assert lines[0].startswith(f"histosynth: error: {meta}: {says}"), lines[0]


def test_a_library_that_is_a_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "library"
    root.write_text("not a folder\n")
    result = listing(root, "--json")
    assert result["code"] == 1 and result["stdout"] == ""
    assert f"{root}: expected an adapter library folder" in result["stderr"]
