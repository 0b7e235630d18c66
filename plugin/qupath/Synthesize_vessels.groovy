/*
 * histosynth: Synthesize vessels
 *
 * 1. asks for the vessel classes, what to make, the number of tiles, the model and the style
 *    (defaults from histosynth_settings.json, written by `histosynth qupath install-scripts P`).
 *    What to make: real vessels into new tissue (--mode inpaint), new tiles like real vessel
 *    tiles (--mode variation), or "into drawn shapes": one tile per outline drawn with the class
 *    "Vessel sketch" (--mode shape --shapes drawn --shape-class "Vessel sketch"; no tile count).
 *    The style is picked from the adapter library (`histosynth adapters list --json`), passed as
 *    --adapter NAME; "none" passes nothing;
 * 2. exports the vessels and the sketches of every image to P/annotations/<entryID>.geojson
 *    (as "Export vessels");
 * 3. runs `histosynth synthesize --project P ... --out P/histosynth/runs/<run> --write-project none`
 *    with the Python of the settings (an argument list, no shell), its output going to the log;
 * 4. runs `histosynth qupath plan RUN --project P --run-name <run>`, which decides every new
 *    entry as histosynth's own write-back does (image name "synthetic-<run>-<id>", metadata
 *    histosynth.synthetic = "true", histosynth.run, histosynth.id, histosynth.synthesis_type,
 *    histosynth.source_entry_id, review_status, tags histosynth + synthetic, description; a tile
 *    made into a drawn shape also the sketch's id and source) and
 *    writes each tile's calibrated TIFF and RUN/qupath-plan.json;
 * 5. applies that plan through QuPath's API: image type Brightfield (H&E), a thumbnail, and
 *    the tile's annotations from RUN/annotations/<id>.geojson.
 *
 * Review the new images with "Next pending synthetic image", "Accept synthetic image" and
 * "Reject synthetic image". Headless (settings only, no dialogs):
 *     QuPath script -p P/project.qpproj P/scripts/histosynth/Synthesize_vessels.groovy
 * (QuPath runs a script once per image of the project; this one does its work on the first.)
 * QuPath 0.4 - 0.7.
 */

import java.awt.image.BufferedImage
import java.nio.file.Files
import java.nio.file.StandardCopyOption
import java.text.SimpleDateFormat
import qupath.lib.gui.commands.ProjectCommands
import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServerProvider
import qupath.lib.io.PathIO
import qupath.lib.projects.Projects

// BEGIN histosynth:ui
/** QuPath's Dialogs class (0.5+: qupath.fx.dialogs, 0.4: qupath.lib.gui.dialogs), or null headless. */
Class histosynthDialogs() {
    def gui = getQuPath()
    if (gui == null)
        return null
    for (String name : ["qupath.fx.dialogs.Dialogs", "qupath.lib.gui.dialogs.Dialogs"]) {
        try {
            return Class.forName(name, true, gui.getClass().getClassLoader())
        } catch (ClassNotFoundException ignored) {
            // try the next one
        }
    }
    return null
}

/** Print a message to the log and, in the GUI, show it in a dialog too. */
void tellUser(String title, String message, boolean isError) {
    println((isError ? "ERROR: " : "") + title + ": " + message)
    def dialogs = histosynthDialogs()
    if (dialogs == null)
        return
    if (isError)
        dialogs.showErrorMessage(title, message)
    else
        dialogs.showPlainMessage(title, message)
}

/**
 * [index, size] of this run in a QuPath batch ("Run for project", or `QuPath script -p`, which
 * run a script once per image); [0, 1] for a plain run.
 */
List<Integer> histosynthBatch() {
    int index = 0
    int size = 1
    try {
        def value = getBinding().getVariable("qupath.script.batchIndex")
        if (value instanceof Number)
            index = ((Number) value).intValue()
        value = getBinding().getVariable("qupath.script.batchSize")
        if (value instanceof Number)
            size = ((Number) value).intValue()
    } catch (MissingPropertyException ignored) {
        // not run by QuPath's script runner: a plain run
    }
    return [index, size]
}
// END histosynth:ui

// BEGIN histosynth:settings
/** P/scripts/histosynth: where `histosynth qupath install-scripts P` put the scripts. */
File histosynthScriptsFolder(File projectFolder) {
    return new File(new File(projectFolder, "scripts"), "histosynth")
}

/** The settings the installer wrote beside the scripts (histosynth_settings.json). */
Map readHistosynthSettings(File projectFolder) {
    File file = new File(histosynthScriptsFolder(projectFolder), "histosynth_settings.json")
    if (!file.isFile())
        throw new IllegalStateException("no settings file " + file.getPath()
                + "; run: histosynth qupath install-scripts \"" + projectFolder.getPath() + "\"")
    def settings
    try {
        settings = new groovy.json.JsonSlurper().parse(file, "UTF-8")
    } catch (Exception e) {
        throw new IllegalStateException(file.getPath() + ": not valid JSON: " + e.getMessage())
    }
    if (!(settings instanceof Map))
        throw new IllegalStateException(file.getPath() + ": must hold a JSON object")
    return (Map) settings
}

/** The class names of the settings (a list of strings, or one comma-separated string). */
List<String> settingsClasses(Map settings) {
    def value = settings.get("classes")
    List<String> names = []
    if (value instanceof String)
        names = ((String) value).split(",").collect { it.trim() }
    else if (value instanceof List)
        names = ((List) value).collect { String.valueOf(it).trim() }
    names = names.findAll { it.length() > 0 }
    if (names.isEmpty())
        throw new IllegalStateException("histosynth_settings.json: 'classes' names no class")
    return names
}

/**
 * The class of the outlines an annotator draws for "into drawn shapes" (settings 'sketch_class',
 * else "Vessel sketch", the class `histosynth qupath install-scripts` adds to the project).
 */
String settingsSketchClass(Map settings) {
    def value = settings.get("sketch_class")
    String name = value == null ? "" : String.valueOf(value).trim()
    return name.isEmpty() ? "Vessel sketch" : name
}

/** The classes to export: the vessel classes, then the sketch class (sketches are drawn outlines, never vessels). */
List<String> classesWithSketches(List<String> classes, Map settings) {
    List<String> all = new ArrayList<String>(classes)
    String sketch = settingsSketchClass(settings)
    if (!all.contains(sketch))
        all.add(sketch)
    return all
}
// END histosynth:settings

// BEGIN histosynth:metadata
/** True when the object has a public no-argument method of this name. */
boolean hasPublicMethod(Object target, String name) {
    try {
        target.getClass().getMethod(name)
        return true
    } catch (NoSuchMethodException ignored) {
        return false
    }
}

/** An entry's metadata value: entry.getMetadata() on QuPath 0.6+, getMetadataValue() before. */
String getEntryMetadata(entry, String key) {
    if (hasPublicMethod(entry, "getMetadata"))
        return entry.getMetadata().get(key)
    return entry.getMetadataValue(key)
}

/** Set an entry's metadata value (saved by project.syncChanges()). */
void putEntryMetadata(entry, String key, String value) {
    if (hasPublicMethod(entry, "getMetadata"))
        entry.getMetadata().put(key, value)
    else
        entry.putMetadataValue(key, value)
}

/** Add tags to an entry (QuPath 0.6+; older versions have no tags, so nothing happens). */
void addEntryTags(entry, List<String> tags) {
    if (hasPublicMethod(entry, "getTags"))
        entry.getTags().addAll(tags)
}

/** True for an entry histosynth added (metadata histosynth.synthetic = "true"). */
boolean isSyntheticEntry(entry) {
    return "true" == getEntryMetadata(entry, "histosynth.synthetic")
}
// END histosynth:metadata

// BEGIN histosynth:export
/** "Vessel: Invasive" -> ["Vessel", "Invasive"] (as histosynth's class_parts). */
List<String> classParts(String name) {
    if (name == null)
        return []
    return name.split(":").collect { it.trim() }.findAll { it.length() > 0 }
}

/** True when className is one of wanted or derived from one ("Vessel: Invasive" for "Vessel"). */
boolean classMatchesAny(String className, List<String> wanted) {
    List<String> have = classParts(className)
    for (String one : wanted) {
        List<String> want = classParts(one)
        if (!want.isEmpty() && have.size() >= want.size() && have.subList(0, want.size()) == want)
            return true
    }
    return false
}

/**
 * Write the annotations of the wanted classes of every non-synthetic entry to
 * P/annotations/<entryID>.geojson (a FeatureCollection; written to a temporary file, then
 * moved over the old one). An entry that holds no objects at all in QuPath keeps an existing
 * file (it may come from outside QuPath and not be imported yet). Returns counts.
 */
Map exportVesselAnnotations(project, File projectFolder, List<String> classes) {
    File folder = new File(projectFolder, "annotations")
    folder.mkdirs()
    def currentEntry = getProjectEntry()
    Map counts = [entries: 0, objects: 0, kept: 0, synthetic: 0, failed: 0]
    for (entry in project.getImageList()) {
        if (isSyntheticEntry(entry)) {
            counts.synthetic += 1
            continue
        }
        File target = new File(folder, entry.getID() + ".geojson")
        def hierarchy
        try {
            // the open image may hold unsaved changes: use it rather than the saved data
            hierarchy = (currentEntry != null && entry == currentEntry) ? getCurrentHierarchy() : entry.readHierarchy()
        } catch (Exception e) {
            println("WARNING: " + entry.getImageName() + " (entry " + entry.getID() + "): cannot read its objects: " + e.getMessage())
            counts.failed += 1
            continue
        }
        if (hierarchy.getAllObjects(false).isEmpty() && target.isFile()) {
            println(entry.getImageName() + " (entry " + entry.getID() + "): no objects in QuPath; keeping " + target.getName())
            counts.kept += 1
            continue
        }
        def objects = hierarchy.getAnnotationObjects().findAll { annotation ->
            def pathClass = annotation.getPathClass()
            pathClass != null && classMatchesAny(pathClass.toString(), classes)
        }
        File temporary = new File(folder, "." + entry.getID() + ".geojson.tmp")
        exportObjectsToGeoJson(objects, temporary.getPath(), "FEATURE_COLLECTION")
        try {
            Files.move(temporary.toPath(), target.toPath(), StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
        } catch (IOException ignored) {
            Files.move(temporary.toPath(), target.toPath(), StandardCopyOption.REPLACE_EXISTING)
        }
        println(entry.getImageName() + " (entry " + entry.getID() + "): " + objects.size() + " annotation(s) -> " + target.getPath())
        counts.entries += 1
        counts.objects += objects.size()
    }
    return counts
}
// END histosynth:export

// BEGIN histosynth:csv
/** Rows of a CSV file (RFC 4180: quoted fields, doubled quotes, CRLF) as column -> text maps. */
List<Map<String, String>> readCsvRows(File file) {
    String text = file.getText("UTF-8")
    if (text.startsWith("\uFEFF"))
        text = text.substring(1)
    List<List<String>> records = []
    List<String> record = []
    StringBuilder field = new StringBuilder()
    boolean quoted = false
    boolean started = false
    int n = text.length()
    int i = 0
    while (i < n) {
        String c = text.substring(i, i + 1)
        if (quoted) {
            if (c == "\"") {
                if (i + 1 < n && text.substring(i + 1, i + 2) == "\"") {
                    field.append("\"")
                    i += 1
                } else {
                    quoted = false
                }
            } else {
                field.append(c)
            }
        } else if (c == "\"") {
            quoted = true
            started = true
        } else if (c == ",") {
            record.add(field.toString())
            field = new StringBuilder()
            started = true
        } else if (c == "\r" || c == "\n") {
            if (c == "\r" && i + 1 < n && text.substring(i + 1, i + 2) == "\n")
                i += 1
            if (started || field.length() > 0 || !record.isEmpty()) {
                record.add(field.toString())
                records.add(record)
            }
            record = []
            field = new StringBuilder()
            started = false
        } else {
            field.append(c)
            started = true
        }
        i += 1
    }
    if (quoted)
        throw new IOException(file.getPath() + ": a quoted field is not closed")
    if (started || field.length() > 0 || !record.isEmpty()) {
        record.add(field.toString())
        records.add(record)
    }
    List<Map<String, String>> rows = []
    if (records.isEmpty())
        return rows
    List<String> header = records.get(0)
    for (int r = 1; r < records.size(); r++) {
        List<String> cells = records.get(r)
        if (cells.size() != header.size())
            throw new IOException(file.getPath() + ": row " + r + " has " + cells.size() + " cells, the header " + header.size())
        Map<String, String> row = new LinkedHashMap<String, String>()
        for (int k = 0; k < header.size(); k++)
            row.put(header.get(k), cells.get(k))
        rows.add(row)
    }
    return rows
}
// END histosynth:csv

// BEGIN histosynth:command
/** Python code that runs the histosynth command line (needs no histosynth/__main__.py). */
String histosynthLauncherCode() {
    return "import sys; from histosynth.cli import main; sys.exit(main(prog_name='histosynth'))"
}

/**
 * What the dialog offers to make, choice -> its label: "inpaint" and "variation" (the `synthesize` modes) and
 * "drawn" (into the outlines drawn with the sketch class: `--mode shape --shapes drawn`).
 */
Map<String, String> synthesisChoices(String sketchClass) {
    Map<String, String> choices = new LinkedHashMap<String, String>()
    choices.put("inpaint", "real vessels into new tissue (inpaint)")
    choices.put("variation", "new tiles like real vessel tiles (variation)")
    choices.put("drawn", "into drawn shapes (outlines of class '" + sketchClass + "')")
    return choices
}

/** The `synthesize` arguments of a choice of synthesisChoices. */
List<String> modeArguments(String choice, String sketchClass) {
    if (choice == "inpaint" || choice == "variation")
        return ["--mode", choice]
    if (choice == "drawn" || choice == "shape")
        return ["--mode", "shape", "--shapes", "drawn", "--shape-class", sketchClass]
    throw new IllegalStateException("unknown mode '" + choice + "'; use inpaint, variation or drawn")
}

/**
 * The `histosynth synthesize` command as an argument list, run without a shell. choice: a key of
 * synthesisChoices (null: the settings' mode); count null: none passed ("drawn" makes one tile per sketch);
 * adapter: a style adapter's name in the library, or null for none.
 */
List<String> buildSynthesizeCommand(Map settings, String projectFile, List<String> classes, Integer count, String model,
                                    long seed, String runFolder, String choice = null, String adapter = null) {
    def python = settings.get("python")
    if (python == null || String.valueOf(python).trim().isEmpty())
        throw new IllegalStateException("histosynth_settings.json: 'python' is not set; run histosynth qupath install-scripts again")
    List<Object> command = [python, "-c", histosynthLauncherCode(), "synthesize", "--project", projectFile]
    for (String name : classes) {
        command.add("--class")
        command.add(name)
    }
    if (count != null)
        command.addAll(["--count", count])
    command.addAll(["--model", model])
    command.addAll(modeArguments(choice ?: String.valueOf(settings.get("mode") ?: "inpaint"), settingsSketchClass(settings)))
    if (settings.get("tile_size") != null)  // null: the model's tile size
        command.addAll(["--tile-size", settings.get("tile_size")])
    command.addAll(["--mpp", settings.get("mpp") ?: 0.5, "--seed", seed, "--out", runFolder,
                    "--write-project", "none"])
    if (adapter != null && !adapter.trim().isEmpty() && adapter.trim() != "none")
        command.addAll(["--adapter", adapter.trim()])
    return command.collect { String.valueOf(it) }
}

/** The `histosynth adapters list --json` command: the adapter library's styles, as JSON. */
List<String> buildAdaptersCommand(Map settings) {
    def python = settings.get("python")
    if (python == null || String.valueOf(python).trim().isEmpty())
        throw new IllegalStateException("histosynth_settings.json: 'python' is not set; run histosynth qupath install-scripts again")
    return [python, "-c", histosynthLauncherCode(), "adapters", "list", "--json"].collect { String.valueOf(it) }
}

/** Run the command; returns [exit code, its standard output, its error output] (UTF-8 text). */
List runAndCapture(List<String> command, File workingFolder) {
    File errors = File.createTempFile("histosynth-", ".log")
    try {
        ProcessBuilder builder = new ProcessBuilder(command)
        builder.directory(workingFolder)
        builder.redirectError(errors)
        Map<String, String> environment = builder.environment()
        environment.put("PYTHONIOENCODING", "utf-8")
        Process process = builder.start()
        process.getOutputStream().close()
        String output = process.getInputStream().getText("UTF-8")
        int exitCode = process.waitFor()
        return [exitCode, output, errors.getText("UTF-8")]
    } finally {
        errors.delete()
    }
}

/** The adapters in the output of `histosynth adapters list --json` (a JSON list of objects with a 'name'). */
List<Map> parseAdapterList(String text) {
    def value
    try {
        value = new groovy.json.JsonSlurper().parseText(text)
    } catch (Exception e) {
        throw new IllegalStateException("histosynth adapters list: not JSON: " + e.getMessage())
    }
    if (!(value instanceof List))
        throw new IllegalStateException("histosynth adapters list: expected a JSON list")
    List<Map> adapters = []
    for (def item : (List) value) {
        if (!(item instanceof Map) || !(item.get("name") instanceof String) || ((String) item.get("name")).isEmpty())
            throw new IllegalStateException("histosynth adapters list: an item has no name")
        adapters.add((Map) item)
    }
    return adapters
}

/** The style pick-list, label -> adapter name: "none" (no adapter) first, then each adapter with its base and tile size. */
Map<String, String> adapterChoices(List<Map> adapters) {
    Map<String, String> choices = new LinkedHashMap<String, String>()
    choices.put("none", null)
    for (Map adapter : adapters) {
        String name = (String) adapter.get("name")
        List<String> about = []
        if (adapter.get("base_model"))
            about.add("base " + adapter.get("base_model"))
        if (adapter.get("tile_size") != null)
            about.add(adapter.get("tile_size") + " px")
        if (adapter.get("domain"))
            about.add(String.valueOf(adapter.get("domain")))
        choices.put(about.isEmpty() ? name : name + " (" + about.join(", ") + ")", name)
    }
    return choices
}

/** Run the command, every output line to the log; returns its exit code. */
int runAndLog(List<String> command, File workingFolder) {
    ProcessBuilder builder = new ProcessBuilder(command)
    builder.directory(workingFolder)
    builder.redirectErrorStream(true)
    Map<String, String> environment = builder.environment()
    environment.put("PYTHONUNBUFFERED", "1")
    environment.put("PYTHONIOENCODING", "utf-8")
    environment.put("TQDM_MININTERVAL", "5")  // a progress line every 5 s, not every update
    Process process = builder.start()
    try {
        process.getOutputStream().close()
        BufferedReader reader = new BufferedReader(new InputStreamReader(process.getInputStream(), "UTF-8"))
        String line
        while ((line = reader.readLine()) != null) {
            if (line.trim().length() > 0)
                println("histosynth> " + line)
        }
        return process.waitFor()
    } finally {
        if (process.isAlive()) {
            println("stopping histosynth")
            process.destroy()
        }
    }
}
// END histosynth:command

// BEGIN histosynth:plan
/** The `histosynth qupath plan` command: writes the TIFFs and RUN/qupath-plan.json. */
List<String> buildPlanCommand(Map settings, String projectFile, String runFolder, String runName) {
    def python = settings.get("python")
    if (python == null || String.valueOf(python).trim().isEmpty())
        throw new IllegalStateException("histosynth_settings.json: 'python' is not set; run histosynth qupath install-scripts again")
    return [python, "-c", histosynthLauncherCode(), "qupath", "plan", runFolder, "--project", projectFile,
            "--run-name", runName].collect { String.valueOf(it) }
}

/**
 * The write-back plan histosynth wrote (RUN/qupath-plan.json): per new entry its image,
 * image name, description, metadata, tags and annotations file, decided by histosynth
 * exactly as its own write-back decides them.
 */
List<Map> readWritePlan(File planFile) {
    if (!planFile.isFile())
        throw new IllegalStateException("histosynth wrote no plan " + planFile.getPath())
    def plan
    try {
        plan = new groovy.json.JsonSlurper().parse(planFile, "UTF-8")
    } catch (Exception e) {
        throw new IllegalStateException(planFile.getPath() + ": not valid JSON: " + e.getMessage())
    }
    if (!(plan instanceof Map) || plan.get("format_version") != 1 || !(plan.get("entries") instanceof List))
        throw new IllegalStateException(planFile.getPath() + ": not a histosynth write-back plan (format 1)")
    List<Map> entries = []
    for (def entry : (List) plan.get("entries")) {
        if (!(entry instanceof Map) || !(entry.get("metadata") instanceof Map) || !entry.get("image") || !entry.get("image_name"))
            throw new IllegalStateException(planFile.getPath() + ": an entry lacks image, image_name or metadata")
        entries.add((Map) entry)
    }
    return entries
}
// END histosynth:plan

/**
 * Add one planned entry to the project: its image (the calibrated TIFF), name, description,
 * metadata, tags, image type, thumbnail and annotations. Reads the annotations before adding
 * anything, and removes the entry again if a later step fails, so that no half-made entry
 * stays behind.
 */
def addPlannedEntry(project, Map planned) {
    String id = String.valueOf(planned.get("tile_id"))
    File image = new File(String.valueOf(planned.get("image")))
    if (!image.isFile())
        throw new IOException("image not found: " + image.getPath())
    def annotationPath = planned.get("annotations")
    File annotationFile = annotationPath ? new File(String.valueOf(annotationPath)) : null
    def objects = (annotationFile != null && annotationFile.isFile()) ? PathIO.readObjects(annotationFile) : []
    if (annotationFile != null && !annotationFile.isFile())
        println("WARNING: tile " + id + ": no annotations (" + annotationFile.getPath() + " is missing)")
    def support = ImageServerProvider.getPreferredUriImageSupport(BufferedImage, image.getAbsolutePath())
    if (support == null || support.getBuilders().isEmpty())
        throw new IOException("QuPath has no reader for " + image.getPath())
    def builder = support.getBuilders().get(0)
    def server = builder.build()
    def entry = null
    try {
        entry = project.addImage(builder)
        if (entry == null)
            throw new IOException("the project refused " + image.getPath())
        entry.setImageName(String.valueOf(planned.get("image_name")))
        entry.setDescription(String.valueOf(planned.get("description") ?: ""))
        ((Map) planned.get("metadata")).each { key, value -> putEntryMetadata(entry, String.valueOf(key), String.valueOf(value)) }
        addEntryTags(entry, ((List) (planned.get("tags") ?: [])).collect { String.valueOf(it) })
        def imageData = new ImageData(server, ImageData.ImageType.BRIGHTFIELD_H_E)
        imageData.getHierarchy().addObjects(objects)
        entry.saveImageData(imageData)
        try {
            entry.setThumbnail(ProjectCommands.getThumbnailRGB(server))
        } catch (Exception e) {
            println("WARNING: tile " + id + ": no thumbnail: " + e.getMessage())
        }
    } catch (Exception e) {
        if (entry != null)
            project.removeImage(entry, true)
        throw e
    } finally {
        server.close()
    }
    return entry
}

// BEGIN histosynth:dialog
/**
 * The style pick-list (adapterChoices) of the adapter library that `synthesize --adapter NAME` reads, from
 * `histosynth adapters list --json`; only "none" when the library cannot be listed (the reason goes to the log).
 */
Map<String, String> listAdapterChoices(Map settings, File workingFolder) {
    List result = runAndCapture(buildAdaptersCommand(settings), workingFolder)
    if (result[0] != 0) {
        List<String> lines = String.valueOf(result[2]).readLines().findAll { it.trim().length() > 0 }
        println("WARNING: no style to pick: histosynth adapters list stopped with exit code " + result[0] +
                (lines.isEmpty() ? "" : ": " + lines.last()))
        return adapterChoices([])
    }
    try {
        return adapterChoices(parseAdapterList((String) result[1]))
    } catch (IllegalStateException e) {
        println("WARNING: no style to pick: " + e.getMessage())
        return adapterChoices([])
    }
}

/**
 * Vessel classes, what to make (inpaint, variation or into drawn shapes), tile count (none for drawn shapes:
 * one tile per sketch), model and style: asked in the GUI (defaults from the settings), else the settings.
 */
Map askParameters(Map settings, File projectFolder) {
    String title = "histosynth: synthesize vessels"
    List<String> classes = settingsClasses(settings)
    Map<String, String> choices = synthesisChoices(settingsSketchClass(settings))
    String choice = String.valueOf(settings.get("mode") ?: "inpaint")
    if (choice == "shape")
        choice = "drawn"
    if (!choices.containsKey(choice))
        throw new IllegalStateException("histosynth_settings.json: 'mode' must be inpaint, variation or drawn, not '" + choice + "'")
    Integer count = 16
    try {
        count = Integer.parseInt(String.valueOf(settings.get("count") ?: 16))
    } catch (NumberFormatException ignored) {
        throw new IllegalStateException("histosynth_settings.json: 'count' must be a whole number")
    }
    String model = String.valueOf(settings.get("model") ?: "auto")
    String adapter = settings.get("adapter") ? String.valueOf(settings.get("adapter")).trim() : null
    def dialogs = histosynthDialogs()
    if (dialogs != null) {
        String answer = dialogs.showInputDialog(title, "Vessel classes, comma-separated ('Vessel' includes 'Vessel: ...')", classes.join(", "))
        if (answer == null)
            return null
        classes = answer.split(",").collect { it.trim() }.findAll { it.length() > 0 }
        if (classes.isEmpty())
            throw new IllegalStateException("no vessel class given")
        def picked = dialogs.showChoiceDialog(title, "What to make", new ArrayList<String>(choices.values()), choices.get(choice))
        if (picked == null)
            return null
        choice = choices.find { it.value == picked }.key
        if (choice != "drawn") {
            answer = dialogs.showInputDialog(title, "Number of synthetic tiles", String.valueOf(count))
            if (answer == null)
                return null
            try {
                count = Integer.parseInt(answer.trim())
            } catch (NumberFormatException ignored) {
                throw new IllegalStateException("the number of tiles must be a whole number, not '" + answer + "'")
            }
        }
        answer = dialogs.showInputDialog(title, "Model: auto (PixCell-1024 when installed, else the embedded default), a preset (pixcell-1024, pixcell-256, default, tiny) or a local folder", model)
        if (answer == null)
            return null
        model = answer.trim()
        Map<String, String> styles = listAdapterChoices(settings, projectFolder)
        if (styles.size() > 1) {
            String current = styles.find { it.value != null && it.value == adapter }?.key ?: "none"
            picked = dialogs.showChoiceDialog(title, "Style: a LoRA adapter of the adapter library (it must have been trained on the model)",
                    new ArrayList<String>(styles.keySet()), current)
            if (picked == null)
                return null
            adapter = styles.get(picked)
        }
    }
    if (choice == "drawn")
        count = null  // one tile per sketch
    else if (count < 1)
        throw new IllegalStateException("the number of tiles must be at least 1, not " + count)
    if (model.isEmpty())
        throw new IllegalStateException("no model given")
    return [classes: classes, count: count, model: model, mode: choice, adapter: adapter == "none" ? null : adapter]
}
// END histosynth:dialog

void synthesizeVessels() {
    String title = "histosynth: synthesize vessels"
    def project = getProject()
    if (project == null)
        throw new IllegalStateException("open a project first (File > Open project)")
    File projectFolder = Projects.getBaseDirectory(project)
    Map settings = readHistosynthSettings(projectFolder)
    Map parameters = askParameters(settings, projectFolder)
    if (parameters == null) {
        println(title + ": cancelled")
        return
    }
    File python = new File(String.valueOf(settings.get("python") ?: ""))
    if (!python.isFile())
        throw new IllegalStateException("the Python in histosynth_settings.json does not exist: " + python.getPath() +
                "; run `histosynth qupath install-scripts` again with the Python that has histosynth")

    // the project file on disk must list every entry, and P/annotations the current vessels
    project.syncChanges()
    // the sketches too, for "into drawn shapes" (and for a later `histosynth synthesize --mode shape` of one's own)
    List<String> exportClasses = classesWithSketches((List<String>) parameters.classes, settings)
    Map exported = exportVesselAnnotations(project, projectFolder, exportClasses)
    println("exported " + exported.objects + " annotation(s) of class " + exportClasses.join(", ") + " from " +
            exported.entries + " image(s)")

    Date now = new Date()
    String runName = new SimpleDateFormat("yyyyMMdd-HHmmss").format(now)
    File runs = new File(new File(projectFolder, "histosynth"), "runs")
    File runFolder = new File(runs, runName)
    int suffix = 2
    while (runFolder.exists()) {
        runFolder = new File(runs, runName + "-" + suffix)
        suffix += 1
    }
    runName = runFolder.getName()
    runs.mkdirs()
    long seed = settings.get("seed") instanceof Number ? ((Number) settings.get("seed")).longValue() : now.getTime().intdiv(1000L) % 2147483647L
    List<String> command = buildSynthesizeCommand(settings, project.getPath().toString(), (List<String>) parameters.classes,
            (Integer) parameters.count, (String) parameters.model, seed, runFolder.getPath(), (String) parameters.mode,
            (String) parameters.adapter)
    println("running: " + command.collect { it.contains(" ") ? "\"" + it + "\"" : it }.join(" "))
    int exitCode = runAndLog(command, projectFolder)
    if (exitCode != 0)
        throw new IllegalStateException("histosynth stopped with exit code " + exitCode + " (the reason is in the log above); " +
                "nothing was added to the project. Run folder: " + runFolder.getPath())

    // histosynth decides every entry (name, description, metadata, tags) and writes the TIFFs
    List<String> planCommand = buildPlanCommand(settings, project.getPath().toString(), runFolder.getPath(), runName)
    exitCode = runAndLog(planCommand, projectFolder)
    if (exitCode != 0)
        throw new IllegalStateException("histosynth could not plan the new entries (exit code " + exitCode +
                "; the reason is in the log above); nothing was added to the project. Run folder: " + runFolder.getPath())
    Set<String> present = new HashSet<String>()
    for (entry in project.getImageList())
        present.add(getEntryMetadata(entry, "histosynth.run") + "/" + getEntryMetadata(entry, "histosynth.id"))
    int added = 0
    int failed = 0
    for (Map planned : readWritePlan(new File(runFolder, "qupath-plan.json"))) {
        Map metadata = (Map) planned.get("metadata")
        if (present.contains(metadata.get("histosynth.run") + "/" + metadata.get("histosynth.id")))
            continue
        try {
            def entry = addPlannedEntry(project, planned)
            println("added " + entry.getImageName())
            added += 1
        } catch (Exception e) {
            println("ERROR: tile " + planned.get("tile_id") + ": not added: " + e.getMessage())
            failed += 1
        }
    }
    project.syncChanges()
    def gui = getQuPath()
    if (gui != null)
        gui.refreshProject()
    String message = added + " synthetic image(s) added to the project (review_status pending; run " + runName + ", " +
            runFolder.getPath() + ")."
    if (failed > 0)
        message += " " + failed + " tile(s) could not be added (see the log)."
    message += " Review them with 'Next pending synthetic image', then 'Accept' or 'Reject synthetic image'."
    tellUser(title, message, failed > 0)
}

if (histosynthBatch()[0] == 0) {  // project-wide work: once, not once per image of a batch
    try {
        synthesizeVessels()
    } catch (IllegalStateException e) {
        tellUser("histosynth: synthesize vessels", e.getMessage(), true)
    }
}
