/*
 * histosynth: Accept synthetic image
 *
 * Sets review_status = "accepted" on the open image if it is a synthetic one (metadata
 * histosynth.synthetic = "true"), saves the project and opens the next pending synthetic
 * image. `histosynth review sync P --run RUN` copies the decision into RUN/index.csv;
 * `histosynth export` never uses rejected tiles.
 *
 * Run from Automate > Project scripts > histosynth (give it a shortcut key for one-key review).
 * Installed by `histosynth qupath install-scripts P`. QuPath 0.4 - 0.7.
 */

import javafx.application.Platform
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

// BEGIN histosynth:review
/** True for a synthetic entry whose review_status is "pending" (or not set yet). */
boolean isPendingEntry(entry) {
    if (!isSyntheticEntry(entry))
        return false
    String status = getEntryMetadata(entry, "review_status")
    return status == null || status.trim().isEmpty() || status == "pending"
}

/** The synthetic entries still waiting for review, in project order. */
List pendingSyntheticEntries(project) {
    return project.getImageList().findAll { isPendingEntry(it) }
}

/** The first pending entry after `current` in project order (going round), not `current` itself; or null. */
def nextPendingEntry(project, current) {
    List images = project.getImageList()
    int start = current == null ? -1 : images.indexOf(current)
    for (int k = 1; k <= images.size(); k++) {
        def entry = images.get((start + k) % images.size())
        if (entry != current && isPendingEntry(entry))
            return entry
    }
    return null
}

/** Open an entry in the viewer (GUI; on the JavaFX thread), or name it (headless). */
void openProjectEntry(entry) {
    def gui = getQuPath()
    if (gui == null) {
        println("next: " + entry.getImageName() + " (entry " + entry.getID() + ")")
        return
    }
    Platform.runLater({ gui.openImageEntry(entry) } as Runnable)
}

/** The settings if the installer wrote them, else an empty map (reviewing needs none). */
Map optionalSettings(File projectFolder) {
    try {
        return readHistosynthSettings(projectFolder)
    } catch (IllegalStateException e) {
        println("WARNING: " + e.getMessage())
        return [:]
    }
}

/**
 * Set review_status ("accepted" or "rejected") of the open image if it is a synthetic one
 * (refuse politely otherwise), save the project, then open the next pending synthetic image
 * (unless "advance_after_review" is false in the settings).
 */
void reviewCurrentEntry(String status) {
    String title = "histosynth: review"
    List<Integer> batch = histosynthBatch()
    if (batch[1] > 1) {
        if (batch[0] == 0)
            tellUser(title, "This script reviews the open image: use Run, not Run for project.", true)
        return
    }
    def project = getProject()
    def entry = getProjectEntry()
    if (project == null || entry == null) {
        tellUser(title, "Open a synthetic image of a project first (Next pending synthetic image finds one).", false)
        return
    }
    if (!isSyntheticEntry(entry)) {
        tellUser(title, "'" + entry.getImageName() + "' is not a synthetic image (its metadata has no histosynth.synthetic = true), " +
                "so it has no review status; nothing was changed.", false)
        return
    }
    String before = getEntryMetadata(entry, "review_status")
    putEntryMetadata(entry, "review_status", status)
    project.syncChanges()
    println(entry.getImageName() + ": review_status " + (before ?: "(not set)") + " -> " + status)
    def gui = getQuPath()
    if (gui != null)
        gui.refreshProject()
    int left = pendingSyntheticEntries(project).size()
    println(left + " synthetic image(s) still pending")
    Map settings = optionalSettings(Projects.getBaseDirectory(project))
    if (gui == null || settings.get("advance_after_review") == false)
        return
    def next = nextPendingEntry(project, entry)
    if (next == null)
        tellUser(title, "Every synthetic image is reviewed. Copy the decisions into the run with: histosynth review sync P --run RUN", false)
    else
        openProjectEntry(next)
}
// END histosynth:review

reviewCurrentEntry("accepted")
