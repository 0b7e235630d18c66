"""QuPath menu scripts: the installer, Groovy parse checks and the scripts' plain-Groovy parts.

QuPath itself cannot be installed here, so the scripts are checked by parsing them with
Debian's ``groovy`` (Groovy 2.4; ``HISTOSYNTH_GROOVY4_JAR`` adds a Groovy 4 jar), by running
their QuPath-free helper blocks (CSV, settings, class matching, the command line, metadata
dispatch) in Groovy against files written by histosynth itself, and by checking the command
they build against the real ``histosynth synthesize`` command line.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import box

from histosynth.commands.qupath import qupath
from histosynth.integration.annotations import Annotation, class_matches
from histosynth.integration.dataset import RunWriter, TileRecord, read_index
from histosynth.integration.demo.data import build_demo_project, build_demo_slide
from histosynth.integration.errors import InputError
from histosynth.integration.qupath.entries import (
    META_ID,
    META_REVIEW,
    META_RUN,
    META_SOURCE_ENTRY,
    META_SYNTHETIC,
    META_TYPE,
    SYNTHETIC_TAGS,
)
from histosynth.qupath import SETTINGS_NAME, install_scripts, script_names

SOURCE = Path(__file__).resolve().parents[2] / "plugin" / "qupath"
PARSE_DRIVER = Path(__file__).with_name("groovy") / "parse_check.groovy"
SCRIPTS = sorted(SOURCE.glob("*.groovy"))
EXPECTED = {
    "Accept_synthetic_image.groovy",
    "Export_vessels.groovy",
    "Import_synthetic_annotations.groovy",
    "Next_pending_synthetic_image.groovy",
    "Reject_synthetic_image.groovy",
    "Synthesize_vessels.groovy",
}
# entry metadata of a synthetic image (contracts.md, "Project write-back")
METADATA_KEYS = {META_SYNTHETIC, META_RUN, META_ID, META_TYPE, META_SOURCE_ENTRY, META_REVIEW}
assert METADATA_KEYS == {"histosynth.synthetic", "histosynth.run", "histosynth.id",
                         "histosynth.synthesis_type", "histosynth.source_entry_id",
                         "review_status"}
BLOCK_RE = re.compile(r"// BEGIN histosynth:(\w+)\n.*?// END histosynth:\1\n", re.S)


def _text(name: str) -> str:
    return (SOURCE / name).read_text(encoding="utf-8")


def _blocks(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in BLOCK_RE.finditer(text)}


@pytest.fixture(scope="module")
def demo_slide(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("slide")
    return build_demo_slide(folder / "s.ome.tif", width=1024, height=768, seed=0)


@pytest.fixture()
def project(tmp_path: Path, demo_slide) -> Path:
    return build_demo_project(tmp_path / "project", slide=demo_slide)


# ------------------------------------------------------------------------------ installer
def test_scripts_ship_in_the_package() -> None:
    assert {p.name for p in SCRIPTS} == EXPECTED
    assert script_names() == sorted(EXPECTED)  # found through importlib.resources


def test_install_copies_scripts_and_writes_settings(project: Path) -> None:
    paths = install_scripts(project, classes=("Vessel", "Vessel: Invasive"), count=5,
                            model="pixcell-256")
    folder = project.parent / "scripts" / "histosynth"
    assert paths == [folder / n for n in sorted(EXPECTED)] + [folder / SETTINGS_NAME]
    for name in EXPECTED:
        assert (folder / name).read_bytes() == (SOURCE / name).read_bytes()
    settings = json.loads((folder / SETTINGS_NAME).read_text(encoding="utf-8"))
    assert settings["python"] == sys.executable  # the venv's link, not its target
    assert Path(settings["python"]).is_absolute()
    assert settings["classes"] == ["Vessel", "Vessel: Invasive"]
    assert (settings["count"], settings["model"], settings["mode"]) == (5, "pixcell-256", "inpaint")
    assert (settings["tile_size"], settings["mpp"]) == (None, 0.5)  # None: the model's
    # no temporary files left behind, nothing else touched
    assert sorted(p.name for p in folder.iterdir()) == sorted([*EXPECTED, SETTINGS_NAME])


def test_install_into_folder_or_qpproj_and_overwrite(project: Path) -> None:
    folder = project.parent / "scripts" / "histosynth"
    install_scripts(project.parent)
    (folder / "Export_vessels.groovy").write_text("// edited\n")
    install_scripts(project, count=3)  # overwrite=True replaces
    export = "Export_vessels.groovy"
    assert (folder / export).read_bytes() == (SOURCE / export).read_bytes()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(InputError, match="already there"):
        install_scripts(project, count=7, overwrite=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_install_refuses_what_is_not_a_project(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"project\.qpproj"):
        install_scripts(tmp_path)
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(InputError, match="not a QuPath project"):
        install_scripts(other)
    with pytest.raises(InputError, match="no such file"):
        install_scripts(tmp_path / "missing")
    assert not (tmp_path / "scripts").exists()


@pytest.mark.parametrize(
    ("kwargs", "item"),
    [
        ({"count": 0}, "count"),
        ({"classes": ()}, "classes"),
        ({"classes": ("Vessel", " ")}, "classes"),
        ({"model": ""}, "model"),
        ({"python": "/no/such/python"}, "python"),
        ({"mode": "paint"}, "mode"),
        ({"tile_size": 32}, "tile_size"),
        ({"mpp": float("nan")}, "mpp"),
    ],
)
def test_install_rejects_bad_settings_and_writes_nothing(project: Path, kwargs, item) -> None:
    with pytest.raises(InputError) as info:
        install_scripts(project, **kwargs)
    assert info.value.item == item
    assert not (project.parent / "scripts").exists()


def test_cli_install_scripts(project: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(qupath, ["install-scripts", str(project.parent), "--class", "Vessel",
                                    "--class", "Tumor", "--count", "4", "--model", "tiny",
                                    "--python", sys.executable])
    assert result.exit_code == 0, result.output
    folder = project.parent / "scripts" / "histosynth"
    assert str(folder) in result.output
    for name in EXPECTED:
        assert name in result.output
    settings = json.loads((folder / SETTINGS_NAME).read_text(encoding="utf-8"))
    assert settings["classes"] == ["Vessel", "Tumor"] and settings["count"] == 4
    bad = runner.invoke(qupath, ["install-scripts", str(tmp_path / "nowhere")])
    assert isinstance(bad.exception, InputError)
    assert runner.invoke(qupath, ["install-scripts", str(project), "--count", "0"]).exit_code == 2


def test_main_cli_reports_install_errors_in_one_line(tmp_path: Path) -> None:
    from histosynth.cli import main

    assert "qupath" in main.commands
    result = CliRunner().invoke(main, ["qupath", "install-scripts", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "nowhere" in result.output


# --------------------------------------------------------------------------- static checks
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_script_avoids_removed_api_and_shells(name: str) -> None:
    text = _text(name)
    assert "addPathObjects" not in text  # removed in QuPath 0.6
    assert not re.search(r'"(?:/bin/)?(?:ba)?sh"\s*,\s*"-c"', text)
    assert not re.search(r'"cmd(?:\.exe)?"\s*,\s*"/[cC]"', text)
    assert "Runtime.getRuntime().exec" not in text
    assert not re.search(r"\.execute\(", text)  # Groovy's String.execute() splits on spaces
    for argument in re.findall(r"new ProcessBuilder\(([^)]*)\)", text):
        argument = argument.strip()
        declared = re.search(rf"List<String>\s+{re.escape(argument)}\s*=", text)
        assert argument.startswith("[") or declared, f"ProcessBuilder({argument}) is no list"


def test_synthesize_runs_a_process_from_a_list() -> None:
    assert re.search(r"new ProcessBuilder\(command\)", _text("Synthesize_vessels.groovy"))
    assert "redirectErrorStream(true)" in _text("Synthesize_vessels.groovy")


def test_scripts_use_the_contract_metadata_keys() -> None:
    for name in EXPECTED:
        text = _text(name)
        used = set(re.findall(r'"((?:histosynth\.[A-Za-z_.]+)|review_status)"', text))
        assert used <= METADATA_KEYS, f"{name}: unknown metadata keys {used - METADATA_KEYS}"
        assert '"histosynth.synthetic"' in text, name
    for name in ("Accept_synthetic_image.groovy", "Reject_synthetic_image.groovy",
                 "Next_pending_synthetic_image.groovy"):
        assert '"review_status"' in _text(name)
    # the synthesize script names no entry field itself: it applies histosynth's plan
    assert "describeTile" not in _text("Synthesize_vessels.groovy")
    assert "readWritePlan(" in _text("Synthesize_vessels.groovy")
    for name in ("Export_vessels.groovy", "Synthesize_vessels.groovy",
                 "Import_synthetic_annotations.groovy", "Next_pending_synthetic_image.groovy"):
        assert "if (histosynthBatch()[0] == 0)" in _text(name), name
    assert 'reviewCurrentEntry("accepted")' in _text("Accept_synthetic_image.groovy")
    assert 'reviewCurrentEntry("rejected")' in _text("Reject_synthetic_image.groovy")


def test_shared_blocks_are_identical_in_every_script() -> None:
    copies: dict[str, set[str]] = {}
    for name in EXPECTED:
        for block, text in _blocks(_text(name)).items():
            copies.setdefault(block, set()).add(text)
    assert {"ui", "settings", "metadata", "export", "review", "csv", "command"} <= set(copies)
    assert {block: len(texts) for block, texts in copies.items() if len(texts) > 1} == {}


# ------------------------------------------------------------------------------- groovy
def _java_home() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return home
    java = shutil.which("javac") or shutil.which("java")
    return str(Path(java).resolve().parent.parent) if java else None


def _groovy(
    *args: str, jar: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run Debian's ``groovy`` launcher (or ``java -cp jar groovy.ui.GroovyMain``)."""
    java_home = _java_home()
    if jar is not None:
        command = [str(Path(java_home or "/usr") / "bin" / "java"), "-cp", jar,
                   "groovy.ui.GroovyMain", *args]
    else:
        groovy = shutil.which("groovy")
        if groovy is None:
            pytest.skip("Debian's groovy is not installed (apt-get install groovy)")
        command = [groovy, *args]
    env = dict(os.environ)
    if java_home:
        env["JAVA_HOME"] = java_home
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def test_every_script_parses_with_groovy() -> None:
    result = _groovy(str(PARSE_DRIVER), *map(str, SCRIPTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"ok {p}" for p in SCRIPTS]


def test_parse_driver_fails_on_a_broken_script(tmp_path: Path) -> None:
    broken = tmp_path / "Broken.groovy"
    text = _text("Synthesize_vessels.groovy")
    broken.write_text(text.replace("void synthesizeVessels() {", "void synthesizeVessels() {{"))
    lambda_ = tmp_path / "Lambda.groovy"  # Groovy 3+ only syntax: QuPath 0.4's Groovy fails
    lambda_.write_text("def twice = [1, 2].collect(x -> x * 2)\n")
    result = _groovy(str(PARSE_DRIVER), str(SCRIPTS[0]), str(broken), str(lambda_))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == f"ok {SCRIPTS[0]}"
    assert lines[1].startswith(f"FAIL {broken}") and lines[2].startswith(f"FAIL {lambda_}")


@pytest.mark.skipif(not os.environ.get("HISTOSYNTH_GROOVY4_JAR"),
                    reason="set HISTOSYNTH_GROOVY4_JAR to a groovy-4.x.jar to parse with Groovy 4")
def test_every_script_parses_with_groovy4() -> None:
    result = _groovy(str(PARSE_DRIVER), *map(str, SCRIPTS),
                     jar=os.environ["HISTOSYNTH_GROOVY4_JAR"])
    assert result.returncode == 0, result.stdout + result.stderr


HARNESS = r"""
import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import java.nio.file.Files
import java.nio.file.StandardCopyOption

%(blocks)s

// Stand-ins with the metadata methods of QuPath's ProjectImageEntry, as in its source:
// 0.4/0.5 getMetadataValue/putMetadataValue; 0.6+ getMetadata() (a modifiable map) and
// getTags(), the old methods deprecated (here they fail, to show they are not used).
class Entry05 {
    private Map<String, String> values = new LinkedHashMap<String, String>()
    private String name
    Entry05(String name) { this.name = name }
    String getImageName() { return name }
    String getMetadataValue(String key) { return values.get(key) }
    String putMetadataValue(String key, String value) { return values.put(key, value) }
    Map<String, String> getMetadataMap() { return Collections.unmodifiableMap(values) }
}
class Entry06 {
    private Map<String, String> values = new LinkedHashMap<String, String>()
    private Set<String> tagSet = new LinkedHashSet<String>()
    private String name
    Entry06(String name) { this.name = name }
    String getImageName() { return name }
    Map<String, String> getMetadata() { return values }
    Set<String> getTags() { return tagSet }
    String getMetadataValue(String key) { throw new IllegalStateException("old API") }
    String putMetadataValue(String key, String value) { throw new IllegalStateException("old API") }
}
class Images {
    private List list
    Images(List list) { this.list = list }
    List getImageList() { return list }
}

def input = new JsonSlurper().parse(new File(args[0]), "UTF-8")
def out = [:]
out.csv = readCsvRows(new File(input.csv))
out.classes = input.class_cases.collect { c -> classMatchesAny(c[0], c[1]) }
Map settings = readHistosynthSettings(new File(input.project_folder))
out.settings_classes = settingsClasses(settings)
out.command = buildSynthesizeCommand(settings, input.project_file, settingsClasses(settings), 3,
        "tiny", 7L, input.run_folder)
out.plan_command = buildPlanCommand(settings, input.project_file, input.run_folder, "r1")
out.plan = readWritePlan(new File(input.plan))
out.plan_applied = out.plan.collect { planned ->
    def entry = new Entry06(planned.image_name)
    ((Map) planned.metadata).each { k, v ->
        putEntryMetadata(entry, String.valueOf(k), String.valueOf(v))
    }
    addEntryTags(entry, planned.tags.collect { String.valueOf(it) })
    [metadata: entry.getMetadata(), tags: entry.getTags() as List]
}
try {
    readWritePlan(new File(input.not_a_plan))
    out.not_a_plan = null
} catch (IllegalStateException e) {
    out.not_a_plan = e.getMessage()
}
try {
    readHistosynthSettings(new File(input.missing_folder))
    out.missing = null
} catch (IllegalStateException e) {
    out.missing = e.getMessage()
}
def entries = [:]
for (entry in [new Entry05("a"), new Entry06("b")]) {
    boolean before = isSyntheticEntry(entry)
    putEntryMetadata(entry, "histosynth.synthetic", "true")
    putEntryMetadata(entry, "review_status", "pending")
    addEntryTags(entry, %(tags)s)
    entries[entry.getClass().getSimpleName()] = [
        before: before, synthetic: isSyntheticEntry(entry),
        status: getEntryMetadata(entry, "review_status"),
        metadata: entry instanceof Entry06 ? entry.getMetadata() : entry.getMetadataMap(),
        tags: entry instanceof Entry06 ? (entry.getTags() as List) : null]
}
out.entries = entries
def mark = { e, synthetic, status ->
    if (synthetic) putEntryMetadata(e, "histosynth.synthetic", "true")
    if (status != null) putEntryMetadata(e, "review_status", status)
    e
}
def real = mark(new Entry06("real"), false, null)
def p1 = mark(new Entry06("p1"), true, "pending")
def done = mark(new Entry06("done"), true, "accepted")
def p2 = mark(new Entry06("p2"), true, null)
def images = new Images([real, p1, done, p2])
def name = { e -> e == null ? null : e.getImageName() }
out.next = [fromNone: name(nextPendingEntry(images, null)),
            fromP1: name(nextPendingEntry(images, p1)),
            fromP2: name(nextPendingEntry(images, p2)),
            fromReal: name(nextPendingEntry(images, real)),
            pending: pendingSyntheticEntries(images).collect { name(it) },
            none: name(nextPendingEntry(new Images([real, done]), real))]
println("process output follows")
out.exit_help = runAndLog(out.command.subList(0, 4) + ["--help"], new File(input.project_folder))
out.exit_fail = runAndLog([out.command[0], "-c", "import sys; print('failing'); sys.exit(3)"],
        new File(input.project_folder))
out.batch = [histosynthBatch()]
binding.setVariable("qupath.script.batchIndex", 2)  // as QuPath's "Run for project" sets them
binding.setVariable("qupath.script.batchSize", 5)
out.batch.add(histosynthBatch())
println(JsonOutput.toJson(out))
"""


def _class_cases() -> list[tuple[str | None, list[str]]]:
    cases: list[tuple[str | None, list[str]]] = [
        ("Vessel", ["Vessel"]),
        ("Vessel: Invasive", ["Vessel"]),
        ("Vessel: Invasive", ["Vessel: Invasive"]),
        ("Vessel", ["Vessel: Invasive"]),
        ("Vessels", ["Vessel"]),
        ("Tumor", ["Vessel", "Tumor"]),
        ("Vessel:Invasive: Big", ["Vessel: Invasive"]),
        (" Vessel :  Invasive ", ["Vessel:Invasive"]),
        (None, ["Vessel"]),
        ("Vessel", [":"]),
        ("", ["Vessel"]),
    ]
    rng = random.Random(0)
    parts = ["Vessel", "Invasive", "Tumor", " ", "", "Ves sel", "Ä"]
    for _ in range(150):
        have = ":".join(rng.choice(parts) for _ in range(rng.randint(1, 3)))
        wanted = [":".join(rng.choice(parts) for _ in range(rng.randint(1, 2)))
                  for _ in range(rng.randint(1, 2))]
        cases.append((have, wanted))
    return cases


def _write_run(run_dir: Path) -> None:
    """A real run folder whose index.csv holds cells the CSV reader must get right."""
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    vessel = Annotation(geometry=box(4, 4, 8, 8), class_name="Vessel: Invasive")
    with RunWriter(run_dir, config={"model": "tiny"}, extra_columns=["note"]) as writer:
        for k, (source, note) in enumerate([
            ('slide, "one".tif', 'quote " and, comma'),
            ("multi\nline\r\nname.svs", ""),
            ("µm ünïcode.ome.tif", "trailing,"),
        ]):
            writer.add_tile(
                TileRecord(id=f"t{k}", synthesis_type="inpainting", class_name="Vessel: Invasive",
                           source_image=source, source_entry_id=str(k + 1), tile_x=k * 10,
                           tile_y=5, tile_size=16, mpp=0.5, model="tiny", seed=k,
                           extra={"note": note}),
                image, mask, [vessel],
            )


@pytest.fixture(scope="module")
def groovy_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the scripts' QuPath-free helper blocks in one Groovy JVM; their JSON output."""
    if shutil.which("groovy") is None:
        pytest.skip("Debian's groovy is not installed (apt-get install groovy)")
    tmp = tmp_path_factory.mktemp("groovy")
    slide = build_demo_slide(tmp / "s.ome.tif", width=1024, height=768, seed=1)
    project = build_demo_project(tmp / "project", slide=slide)
    install_scripts(project, classes=("Vessel", "Vessel: Invasive"), count=9, tile_size=512)
    _write_run(tmp / "run")
    cases = _class_cases()
    blocks = _blocks(_text("Synthesize_vessels.groovy"))
    blocks["review"] = _blocks(_text("Accept_synthetic_image.groovy"))["review"]
    code = "\n".join(blocks[name] for name in
                     ("ui", "settings", "metadata", "export", "csv", "command", "plan", "review"))
    # the real write-back plan of that run, written by the command the script runs
    planned = CliRunner().invoke(
        qupath, ["plan", str(tmp / "run"), "--project", str(project), "--run-name", "r1"]
    )
    assert planned.exit_code == 0, planned.output
    (tmp / "not-a-plan.json").write_text('{"entries": 3}', encoding="utf-8")
    harness = tmp / "harness.groovy"
    harness.write_text(HARNESS % {"blocks": code, "tags": json.dumps(list(SYNTHETIC_TAGS))},
                       encoding="utf-8")
    data = {
        "csv": str(tmp / "run" / "index.csv"),
        "class_cases": cases,
        "project_folder": str(project.parent),
        "project_file": str(project),
        "run_folder": str(tmp / "project" / "histosynth" / "runs" / "r1"),
        "missing_folder": str(tmp / "nowhere"),
        "plan": str(tmp / "run" / "qupath-plan.json"),
        "not_a_plan": str(tmp / "not-a-plan.json"),
    }
    (tmp / "input.json").write_text(json.dumps(data), encoding="utf-8")
    result = _groovy(str(harness), str(tmp / "input.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["_stdout"] = result.stdout
    out["_cases"] = cases
    out["_run"] = tmp / "run"
    out["_project"] = project
    return out


def test_groovy_csv_reader_matches_histosynth(groovy_results: dict) -> None:
    rows = read_index(groovy_results["_run"])
    assert len(rows) == 3 and rows[1]["source_image"] == "multi\nline\r\nname.svs"
    assert groovy_results["csv"] == rows


def test_groovy_class_matching_matches_python(groovy_results: dict) -> None:
    expected = [any(class_matches(have, w) for w in wanted)
                for have, wanted in groovy_results["_cases"]]
    assert groovy_results["classes"] == expected


def test_groovy_reads_the_installed_settings(groovy_results: dict) -> None:
    assert groovy_results["settings_classes"] == ["Vessel", "Vessel: Invasive"]
    assert "install-scripts" in groovy_results["missing"]
    assert "histosynth_settings.json" in groovy_results["missing"]


def test_groovy_metadata_uses_each_qupath_api(groovy_results: dict) -> None:
    old, new = groovy_results["entries"]["Entry05"], groovy_results["entries"]["Entry06"]
    for entry in (old, new):
        assert not entry["before"] and entry["synthetic"] and entry["status"] == "pending"
        assert entry["metadata"] == {"histosynth.synthetic": "true", "review_status": "pending"}
    assert old["tags"] is None and new["tags"] == list(SYNTHETIC_TAGS)


def test_groovy_next_pending_goes_round_the_project(groovy_results: dict) -> None:
    assert groovy_results["next"] == {
        "fromNone": "p1", "fromP1": "p2", "fromP2": "p1", "fromReal": "p1",
        "pending": ["p1", "p2"], "none": None,
    }


def test_groovy_runs_the_command_and_logs_its_output(groovy_results: dict) -> None:
    assert groovy_results["exit_help"] == 0 and groovy_results["exit_fail"] == 3
    log = groovy_results["_stdout"]
    assert "histosynth> Usage: histosynth synthesize" in log
    assert "histosynth> failing" in log


def test_groovy_batch_position(groovy_results: dict) -> None:
    # project-wide scripts act once: on the first image of "Run for project" / QuPath script -p
    assert groovy_results["batch"] == [[0, 1], [2, 5]]


def _synthesize_command():
    from histosynth.cli import main

    return main.commands["synthesize"]


def test_synthesize_command_matches_the_cli(groovy_results: dict) -> None:
    command = groovy_results["command"]
    project = groovy_results["_project"]
    assert command[:3] == [sys.executable, "-c", command[2]] and command[3] == "synthesize"
    args = command[4:]
    synthesize = _synthesize_command()
    known = {opt for param in synthesize.params for opt in param.opts + param.secondary_opts}
    passed = [a for a in args if a.startswith("--")]
    assert {"--project", "--class", "--count", "--out", "--write-project", "--model", "--mode",
            "--tile-size", "--mpp", "--seed"} == set(passed)
    assert [a for a in passed if a not in known] == []
    ctx = synthesize.make_context("synthesize", list(args))
    assert ctx.params["project"] == project
    assert ctx.params["classes"] == ("Vessel", "Vessel: Invasive")
    assert (ctx.params["count"], ctx.params["model"], ctx.params["seed"]) == (3, "tiny", 7)
    assert (ctx.params["tile_size"], ctx.params["mpp"]) == (512, 0.5)
    assert ctx.params["mode"] == "inpaint"
    assert ctx.params["out"] == project.parent / "histosynth" / "runs" / "r1"


def test_cli_has_write_project_none() -> None:
    synthesize = _synthesize_command()
    names = {opt for param in synthesize.params for opt in param.opts}
    assert "--write-project" in names
    ctx = synthesize.make_context(
        "synthesize", ["--project", "P", "--class", "V", "--count", "1", "--out", "O",
                       "--write-project", "none"])
    assert "none" in {str(v) for v in ctx.params.values()}


def test_launcher_code_runs_the_cli(groovy_results: dict) -> None:
    command = groovy_results["command"]
    result = subprocess.run([*command[:4], "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--count" in result.stdout and "histosynth synthesize" in result.stdout


def test_groovy_applies_the_write_back_plan(groovy_results: dict) -> None:
    """The script reads the plan `histosynth qupath plan` wrote and sets exactly its name,
    metadata (every contract key) and tags; a file that is no plan is refused."""
    plan = json.loads((groovy_results["_run"] / "qupath-plan.json").read_text("utf-8"))
    assert [e["tile_id"] for e in plan["entries"]] == ["t0", "t1", "t2"]
    assert groovy_results["plan"] == plan["entries"]
    for planned, applied in zip(plan["entries"], groovy_results["plan_applied"], strict=True):
        assert applied["metadata"] == planned["metadata"]
        assert set(applied["metadata"]) == METADATA_KEYS
        assert applied["metadata"][META_RUN] == "r1"
        assert applied["tags"] == list(SYNTHETIC_TAGS)
        assert Path(planned["image"]).is_file() and planned["image"].endswith(".tif")
        assert planned["image_name"] == f"synthetic-r1-{planned['tile_id']}"
        assert planned["description"].endswith(f"run r1, tile {planned['tile_id']}")
    assert "not a histosynth write-back plan" in groovy_results["not_a_plan"]


def test_plan_command_matches_the_cli(groovy_results: dict) -> None:
    command = groovy_results["plan_command"]
    assert command[3:6] == ["qupath", "plan", groovy_results["command"][-3]]
    assert command[6:] == ["--project", str(groovy_results["_project"]), "--run-name", "r1"]
