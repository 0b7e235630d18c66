"""QuPath and drawn shapes (issue 28, item 4): the *Synthesize vessels* dialog's choice
"into drawn shapes" and its style pick-list, and the sketch's id on the new entries.

QuPath cannot run here, so the script's own functions run under Debian's ``groovy``
against real files: a demo project with the installed settings, a real adapter library
(adapters saved from the tiny engine) listed by the real ``histosynth adapters list
--json``, the real write-back plan of a run with shape rows. QuPath's ``Dialogs`` is a
stand-in with its static methods' signatures (``showInputDialog``, ``showChoiceDialog``)
that answers from a list. Every command the dialog builds is parsed by the real
``histosynth synthesize`` command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import box

from histosynth.cli import main
from histosynth.integration.annotations import Annotation
from histosynth.integration.dataset import RunWriter, TileRecord, read_index, update_index
from histosynth.integration.demo.data import build_demo_project, build_demo_slide
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.qupath.classes import SKETCH_CLASS
from histosynth.integration.qupath.entries import (
    META_ID,
    META_REVIEW,
    META_SHAPE_ID,
    META_SHAPE_SOURCE,
    META_TYPE,
)
from histosynth.integration.qupath.writeback import review_sync, write_run_to_project
from histosynth.qupath import install_scripts
from histosynth.synthesis.adapters import create_adapter, save_adapter, unload_adapter

SOURCE = Path(__file__).resolve().parents[2] / "plugin" / "qupath"
BLOCK_RE = re.compile(r"// BEGIN histosynth:(\w+)\n.*?// END histosynth:\1\n", re.S)
TILE = 64
SKETCH_ID = str(uuid.UUID(int=28))
BANK_ID = f"{uuid.UUID(int=4)}:seed-7"

# QuPath's Dialogs (qupath.fx.dialogs, 0.5+) as far as the script calls it: the same static
# methods, answering from ``answers`` ("<default>": the offered default, "<cancel>": null)
DIALOGS = r"""
package qupath.fx.dialogs

class Dialogs {
    static List answers = []
    static List asked = []

    static String showInputDialog(String title, String message, String initialInput) {
        asked.add([kind: "input", message: message, default: initialInput])
        return next(initialInput)
    }

    static <T> T showChoiceDialog(String title, String message, Collection<T> choices,
                                  T defaultChoice) {
        asked.add([kind: "choice", message: message, choices: new ArrayList(choices),
                   default: defaultChoice])
        def answer = next(defaultChoice)
        if (answer != null && !choices.contains(answer))
            throw new IllegalArgumentException("not one of the choices: " + answer)
        return answer
    }

    private static Object next(Object offered) {
        def answer = answers.remove(0)
        return answer == "<default>" ? offered : (answer == "<cancel>" ? null : answer)
    }
}
"""

HARNESS = r"""
import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import groovy.transform.Field
import java.nio.file.Files
import java.nio.file.StandardCopyOption
import qupath.fx.dialogs.Dialogs

%(blocks)s

class StandInGui {}
@Field Object gui = null
Object getQuPath() { return gui }

class Entry06 {  // QuPath 0.6+'s ProjectImageEntry metadata and tags
    private Map<String, String> values = new LinkedHashMap<String, String>()
    private Set<String> tagSet = new LinkedHashSet<String>()
    Map<String, String> getMetadata() { return values }
    Set<String> getTags() { return tagSet }
}

def input = new JsonSlurper().parse(new File(args[0]), "UTF-8")
def out = [:]
File folder = new File(input.project_folder)
Map settings = readHistosynthSettings(folder)
def command = { Map p -> buildSynthesizeCommand(settings, input.project_file, p.classes, p.count,
        p.model, 7L, input.run_folder, p.mode, p.adapter) }

out.choices = synthesisChoices(settingsSketchClass(settings))
out.mode_args = ["inpaint", "variation", "drawn", "shape"].collect {
    modeArguments(it, "Vessel sketch")
}
try {
    modeArguments("bank", "Vessel sketch")
} catch (IllegalStateException e) {
    out.bad_mode = e.getMessage()
}
out.export_classes = [classesWithSketches(["Vessel"], settings),
                      classesWithSketches(["Vessel sketch", "Vessel"], settings),
                      classesWithSketches(["Vessel"], [sketch_class: " My sketch "])]

// headless: the settings decide
out.headless = askParameters(settings, folder)
out.headless_command = command(out.headless)
Map drawnSettings = new LinkedHashMap(settings)
drawnSettings.put("mode", "drawn")
drawnSettings.put("adapter", "lab-he")
out.headless_drawn = askParameters(drawnSettings, folder)
out.headless_drawn_command = command(out.headless_drawn)

// the GUI: the dialogs answer
gui = new StandInGui()
out.gui = []
for (List answers : input.dialog_runs) {
    Dialogs.answers = new ArrayList(answers)
    Dialogs.asked = []
    Map parameters = askParameters(settings, folder)
    out.gui.add([parameters: parameters, asked: Dialogs.asked, left: Dialogs.answers,
                 command: parameters == null ? null : command(parameters)])
}
gui = null

// the style list when histosynth cannot list the library
out.styles_broken = input.broken_pythons.collect { python ->
    Map broken = new LinkedHashMap(settings)
    broken.put("python", python)
    listAdapterChoices(broken, folder)
}
out.styles = listAdapterChoices(settings, folder)

// the plan of a run with shape rows, applied as the script applies it
out.plan = readWritePlan(new File(input.plan)).collect { planned ->
    def entry = new Entry06()
    ((Map) planned.metadata).each { k, v ->
        putEntryMetadata(entry, String.valueOf(k), String.valueOf(v))
    }
    addEntryTags(entry, planned.tags.collect { String.valueOf(it) })
    [tile_id: planned.tile_id, metadata: entry.getMetadata(), description: planned.description]
}
println(JsonOutput.toJson(out))
"""


def _java_home() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return home
    java = shutil.which("javac") or shutil.which("java")
    return str(Path(java).resolve().parent.parent) if java else None


def _blocks(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in BLOCK_RE.finditer(text)}


def _write_run(run: Path) -> None:
    """A run folder with an inpainted row and two shape rows (drawn, bank), written by
    RunWriter; the shape rows' type set in index.csv as the shape workflow writes it."""
    rng = np.random.default_rng(0)
    rows = [("inp-00000", "", ""), ("shp-00000", "drawn", SKETCH_ID),
            ("shp-00001", "bank", BANK_ID)]
    with RunWriter(run, config={"model": "tiny"},
                   extra_columns=["shape_source", "shape_id"]) as writer:
        for k, (tile_id, source, shape_id) in enumerate(rows):
            image = rng.integers(90, 230, (TILE, TILE, 3), dtype=np.uint8)
            mask = np.zeros((TILE, TILE), np.uint8)
            mask[20:40, 18:44] = 255
            writer.add_tile(
                TileRecord(id=tile_id, synthesis_type="inpainting", class_name="Vessel: Invasive",
                           source_image="s.ome.tif", source_entry_id="1", tile_x=100 * k,
                           tile_y=50, tile_size=TILE, mpp=0.5, model="tiny", seed=k,
                           extra={"shape_source": source, "shape_id": shape_id}),
                image, mask, [Annotation(box(18, 20, 44, 40), class_name="Vessel: Invasive")],
            )
    update_index(run, {"shp-00000": {"synthesis_type": "shape"},
                       "shp-00001": {"synthesis_type": "shape"}})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, untrained_engine) -> dict:
    """A demo project with the scripts installed, a run with shape rows and its plan, and a
    real adapter library made on the tiny engine."""
    tmp = tmp_path_factory.mktemp("shapes")
    slide = build_demo_slide(tmp / "s.ome.tif", width=1024, height=768, seed=2)
    project = build_demo_project(tmp / "project", slide=slide)
    install_scripts(project, classes=("Vessel: Invasive",), count=5, model="tiny", tile_size=256)
    library = tmp / "adapters"
    model = untrained_engine.transformer
    for name, domain in (("lab-he", "our H&E"), ("ihc", "")):
        create_adapter(model, name, domain=domain, base_id="tiny")
        save_adapter(model, name, library / name)
        unload_adapter(model, name)
    run = tmp / "run"
    _write_run(run)
    planned = CliRunner().invoke(main, ["qupath", "plan", str(run), "--project", str(project),
                                        "--run-name", "r1"])
    assert planned.exit_code == 0, planned.output
    return {"tmp": tmp, "project": project, "run": run, "library": library, "slide": slide}


def _fake_python(folder: Path, name: str, body: str) -> str:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


LAB = "lab-he (base tiny, 256 px, our H&E)"
DRAWN = "into drawn shapes (outlines of class 'Vessel sketch')"
DIALOG_RUNS = [
    # classes, what to make, model, style
    ["Vessel: Invasive", DRAWN, "<default>", LAB],
    # classes, what to make, count, model, style
    ["Vessel, Vessel: Invasive", "new tiles like real vessel tiles (variation)", "4", "default",
     "none"],
    ["<default>", "<cancel>"],
    ["<default>", "<default>", "<default>", "<default>", "<cancel>"],
]


@pytest.fixture(scope="module")
def groovy_out(world: dict) -> dict:
    """Run the script's functions in one Groovy JVM; their JSON output."""
    if shutil.which("groovy") is None:
        pytest.skip("Debian's groovy is not installed (apt-get install groovy)")
    tmp = world["tmp"]
    classes = tmp / "cp"
    (classes / "qupath" / "fx" / "dialogs").mkdir(parents=True)
    (classes / "qupath" / "fx" / "dialogs" / "Dialogs.groovy").write_text(DIALOGS)
    text = (SOURCE / "Synthesize_vessels.groovy").read_text(encoding="utf-8")
    blocks = _blocks(text)
    code = "\n".join(blocks[name] for name in
                     ("ui", "settings", "metadata", "command", "plan", "dialog"))
    harness = tmp / "harness.groovy"
    harness.write_text(HARNESS % {"blocks": code}, encoding="utf-8")
    broken = [
        _fake_python(tmp, "failing", "echo 'histosynth: error: /lib/x/histosynth_adapter.json: "
                                     "missing' >&2; exit 1"),
        _fake_python(tmp, "garbled", "echo 'not json'"),
        _fake_python(tmp, "nameless", "echo '[{\"base_model\": \"tiny\"}]'"),
    ]
    data = {
        "project_folder": str(world["project"].parent),
        "project_file": str(world["project"]),
        "run_folder": str(world["project"].parent / "histosynth" / "runs" / "r1"),
        "plan": str(world["run"] / "qupath-plan.json"),
        "dialog_runs": DIALOG_RUNS,
        "broken_pythons": broken,
    }
    (tmp / "input.json").write_text(json.dumps(data), encoding="utf-8")
    env = {**os.environ, "HISTOSYNTH_ADAPTERS": str(world["library"])}
    java_home = _java_home()
    if java_home:
        env["JAVA_HOME"] = java_home
    result = subprocess.run(["groovy", "-cp", str(classes), str(harness), str(tmp / "input.json")],
                            capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["_log"] = result.stdout
    return out


def _parse(command: list[str]) -> dict:
    """The command's options as the real ``histosynth synthesize`` parses them."""
    assert command[:4] == [sys.executable, "-c", command[2], "synthesize"], command
    synthesize = main.commands["synthesize"]
    return synthesize.make_context("synthesize", list(command[4:])).params


def test_the_choices_and_their_arguments(groovy_out: dict) -> None:
    assert groovy_out["choices"] == {
        "inpaint": "real vessels into new tissue (inpaint)",
        "variation": "new tiles like real vessel tiles (variation)",
        "drawn": DRAWN,
    }
    assert groovy_out["mode_args"] == [
        ["--mode", "inpaint"], ["--mode", "variation"],
        ["--mode", "shape", "--shapes", "drawn", "--shape-class", SKETCH_CLASS],
        ["--mode", "shape", "--shapes", "drawn", "--shape-class", SKETCH_CLASS],
    ]
    assert "unknown mode 'bank'" in groovy_out["bad_mode"]


def test_the_sketches_are_exported_with_the_vessels(groovy_out: dict) -> None:
    assert groovy_out["export_classes"] == [
        ["Vessel", SKETCH_CLASS], ["Vessel sketch", "Vessel"], ["Vessel", "My sketch"]]


def test_the_dialog_makes_drawn_shapes_with_a_picked_style(groovy_out: dict, world: dict) -> None:
    run = groovy_out["gui"][0]
    asked = run["asked"]
    assert [a["kind"] for a in asked] == ["input", "choice", "input", "choice"]  # no count asked
    assert asked[1]["choices"] == list(groovy_out["choices"].values())
    assert asked[1]["default"] == groovy_out["choices"]["inpaint"]  # the settings' mode
    assert asked[3]["choices"] == ["none", "ihc (base tiny, 256 px)", LAB]  # the real library
    assert asked[3]["default"] == "none" and run["left"] == []
    assert run["parameters"] == {"classes": ["Vessel: Invasive"], "count": None, "model": "tiny",
                                 "mode": "drawn", "adapter": "lab-he"}
    command = run["command"]
    assert command[command.index("--mode"):command.index("--mode") + 6] == [
        "--mode", "shape", "--shapes", "drawn", "--shape-class", "Vessel sketch"]
    params = _parse(command)
    assert (params["mode"], params["shapes"], params["shape_class"]) == ("shape", "drawn",
                                                                           SKETCH_CLASS)
    assert params["adapter"] == "lab-he" and params["count"] is None
    assert params["classes"] == ("Vessel: Invasive",) and params["project"] == world["project"]
    assert params["out"] == world["project"].parent / "histosynth" / "runs" / "r1"
    assert (params["model"], params["tile_size"], params["seed"]) == ("tiny", 256, 7)
    assert "--write-project" in command and command[command.index("--write-project") + 1] == "none"


def test_the_other_choices_are_as_before_and_none_passes_no_adapter(groovy_out: dict) -> None:
    run = groovy_out["gui"][1]
    assert [a["kind"] for a in run["asked"]] == ["input", "choice", "input", "input", "choice"]
    assert run["parameters"] == {"classes": ["Vessel", "Vessel: Invasive"], "count": 4,
                                 "model": "default", "mode": "variation", "adapter": None}
    assert "--adapter" not in run["command"]
    params = _parse(run["command"])
    assert (params["mode"], params["count"], params["model"]) == ("variation", 4, "default")
    assert params["adapter"] is None and params["shapes"] is None


def test_cancelling_a_choice_runs_nothing(groovy_out: dict) -> None:
    for run in groovy_out["gui"][2:]:
        assert run["parameters"] is None and run["command"] is None and run["left"] == []


def test_headless_runs_take_the_settings(groovy_out: dict) -> None:
    assert groovy_out["headless"] == {"classes": ["Vessel: Invasive"], "count": 5,
                                      "model": "tiny", "mode": "inpaint", "adapter": None}
    params = _parse(groovy_out["headless_command"])
    assert (params["mode"], params["count"], params["adapter"]) == ("inpaint", 5, None)
    assert groovy_out["headless_drawn"]["mode"] == "drawn"
    params = _parse(groovy_out["headless_drawn_command"])
    assert (params["mode"], params["shapes"], params["count"], params["adapter"]) == (
        "shape", "drawn", None, "lab-he")


def test_the_style_list_is_the_adapter_librarys(groovy_out: dict, world: dict) -> None:
    listed = CliRunner(env={"HISTOSYNTH_ADAPTERS": str(world["library"])}).invoke(
        main, ["adapters", "list", "--json"])
    names = [record["name"] for record in json.loads(listed.stdout)]
    assert groovy_out["styles"] == {"none": None, "ihc (base tiny, 256 px)": "ihc", LAB: "lab-he"}
    assert list(groovy_out["styles"].values())[1:] == names


def test_a_library_that_cannot_be_listed_offers_only_none(groovy_out: dict) -> None:
    assert groovy_out["styles_broken"] == [{"none": None}] * 3
    log = groovy_out["_log"]
    assert ("WARNING: no style to pick: histosynth adapters list stopped with exit code 1: "
            "histosynth: error: /lib/x/histosynth_adapter.json: missing") in log
    assert "WARNING: no style to pick: histosynth adapters list: not JSON" in log
    assert "WARNING: no style to pick: histosynth adapters list: an item has no name" in log


# ----------------------------------------------------------------- the sketch's id


def test_the_plan_carries_the_shape_into_the_entrys_metadata(groovy_out: dict) -> None:
    applied = {entry["tile_id"]: entry for entry in groovy_out["plan"]}
    assert sorted(applied) == ["inp-00000", "shp-00000", "shp-00001"]  # shape rows planned too
    drawn, bank, inpainted = (applied[k]["metadata"] for k in ("shp-00000", "shp-00001",
                                                               "inp-00000"))
    assert drawn[META_TYPE] == "shape" and drawn[META_SHAPE_ID] == SKETCH_ID
    assert drawn[META_SHAPE_SOURCE] == "drawn"
    assert (bank[META_SHAPE_SOURCE], bank[META_SHAPE_ID]) == ("bank", BANK_ID)
    assert META_SHAPE_ID not in inpainted and META_SHAPE_SOURCE not in inpainted
    assert f"drawn shape {SKETCH_ID}" in applied["shp-00000"]["description"]


def test_native_write_back_and_review_sync_take_shape_rows(world: dict, tmp_path: Path) -> None:
    project = build_demo_project(tmp_path / "project", slide=world["slide"])
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    result = write_run_to_project(project, run, run_name="r2")
    assert sorted(t.tile_id for t in result.added) == ["inp-00000", "shp-00000", "shp-00001"]
    entries = {e.metadata[META_ID]: e for e in QuPathProject(project).synthetic_entries("r2")}
    assert entries["shp-00000"].metadata[META_SHAPE_ID] == SKETCH_ID
    assert entries["shp-00001"].metadata[META_SHAPE_SOURCE] == "bank"
    assert META_SHAPE_ID not in entries["inp-00000"].metadata
    raw = json.loads(project.read_text(encoding="utf-8"))["images"]
    stored = {e["metadata"][META_ID]: e["metadata"] for e in raw if "metadata" in e and e[
        "metadata"].get(META_ID)}
    assert stored["shp-00000"][META_SHAPE_ID] == SKETCH_ID  # in the file QuPath reads

    qp = QuPathProject(project)
    qp.set_metadata(entries["shp-00000"].entry_id, META_REVIEW, "accepted")
    qp.save()
    review_sync(project, run, run_name="r2")
    statuses = {row["id"]: row["review_status"] for row in read_index(run)}
    assert statuses == {"inp-00000": "pending", "shp-00000": "accepted", "shp-00001": "pending"}


def test_one_sketch_class_name_everywhere() -> None:
    """The class install-scripts adds is the one synthesize looks for and the script names."""
    from histosynth.workflows.synthesize.settings import DEFAULT_SHAPE_CLASS

    option = {p.name: p for p in main.commands["synthesize"].params}["shape_class"]
    assert SKETCH_CLASS == DEFAULT_SHAPE_CLASS == option.default
    fallback = re.findall(r'name\.isEmpty\(\) \? "([^"]+)" : name',
                          (SOURCE / "Synthesize_vessels.groovy").read_text(encoding="utf-8"))
    assert fallback == [SKETCH_CLASS]
