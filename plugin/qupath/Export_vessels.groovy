/*
 * histosynth: Export vessels
 *
 * Writes the annotations of the chosen classes ("classes" in histosynth_settings.json;
 * "Vessel" also takes derived classes such as "Vessel: Invasive") of every image of this
 * project to P/annotations/<entryID>.geojson, the file `histosynth synthesize --project P`
 * reads, together with the outlines drawn with the sketch class ("Vessel sketch", for
 * `synthesize --mode shape --shapes drawn`). Synthetic entries (metadata
 * histosynth.synthetic = "true") are left out, so synthetic tiles never become sources.
 *
 * Run from Automate > Project scripts > histosynth, or headless:
 *     QuPath script -p P/project.qpproj P/scripts/histosynth/Export_vessels.groovy
 * (QuPath runs a script once per image of the project; this one does its work on the first.)
 * Installed by `histosynth qupath install-scripts P`. QuPath 0.4 - 0.7.
 */

import java.nio.file.Files
import java.nio.file.StandardCopyOption
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

void exportVessels() {
    def project = getProject()
    if (project == null)
        throw new IllegalStateException("open a project first (File > Open project)")
    File projectFolder = Projects.getBaseDirectory(project)
    Map settings = readHistosynthSettings(projectFolder)
    // the sketches too: `histosynth synthesize --mode shape --shapes drawn` reads them from these files
    List<String> classes = classesWithSketches(settingsClasses(settings), settings)
    Map counts = exportVesselAnnotations(project, projectFolder, classes)
    String message = counts.objects + " annotation(s) of class " + classes.join(", ") + " from " + counts.entries +
            " image(s) written to " + new File(projectFolder, "annotations").getPath()
    if (counts.kept > 0)
        message += "; " + counts.kept + " image(s) without objects kept their existing file"
    if (counts.synthetic > 0)
        message += "; " + counts.synthetic + " synthetic image(s) left out"
    if (counts.failed > 0)
        message += "; " + counts.failed + " image(s) could not be read (see the log)"
    tellUser("histosynth: export vessels", message, false)
}

if (histosynthBatch()[0] == 0) {  // project-wide work: once, not once per image of a batch
    try {
        exportVessels()
    } catch (IllegalStateException e) {
        tellUser("histosynth: export vessels", e.getMessage(), true)
    }
}
