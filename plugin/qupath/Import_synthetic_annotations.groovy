/*
 * histosynth: Import synthetic annotations
 *
 * For synthetic images that histosynth added to the project from Python
 * (`histosynth synthesize ... --write-project native`, while QuPath was closed): every entry
 * with metadata histosynth.synthetic = "true" that holds no objects yet gets the annotations
 * of P/annotations/<entryID>.geojson, image type Brightfield (H&E) (when not set) and a
 * thumbnail, and is saved. Entries that already hold objects are left alone, so running it
 * again changes nothing.
 *
 * Run from Automate > Project scripts > histosynth, or headless:
 *     QuPath script -p P/project.qpproj P/scripts/histosynth/Import_synthetic_annotations.groovy
 * (QuPath runs a script once per image of the project; this one does its work on the first.)
 * Installed by `histosynth qupath install-scripts P`. QuPath 0.4 - 0.7.
 */

import qupath.lib.gui.commands.ProjectCommands
import qupath.lib.images.ImageData
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

/** Import one entry's annotations; returns "imported", "has objects" or "no file". */
String importEntryAnnotations(entry, File geojson, boolean isOpen) {
    def hierarchy = isOpen ? getCurrentHierarchy() : entry.readHierarchy()
    if (!hierarchy.getAllObjects(false).isEmpty())
        return "has objects"
    if (!geojson.isFile())
        return "no file"
    def objects = PathIO.readObjects(geojson)
    def imageData = isOpen ? getCurrentImageData() : entry.readImageData()
    try {
        def type = imageData.getImageType()
        if (type == null || type == ImageData.ImageType.UNSET)
            imageData.setImageType(ImageData.ImageType.BRIGHTFIELD_H_E)
        imageData.getHierarchy().addObjects(objects)
        entry.saveImageData(imageData)
        if (entry.getThumbnail() == null) {
            try {
                entry.setThumbnail(ProjectCommands.getThumbnailRGB(imageData.getServer()))
            } catch (Exception e) {
                println("WARNING: " + entry.getImageName() + ": no thumbnail: " + e.getMessage())
            }
        }
    } finally {
        if (!isOpen) {
            try {
                imageData.getServer().close()
            } catch (Exception ignored) {
                // closing only frees the reader early
            }
        }
    }
    println(entry.getImageName() + " (entry " + entry.getID() + "): " + objects.size() + " annotation(s) from " + geojson.getPath())
    return "imported"
}

void importSyntheticAnnotations() {
    String title = "histosynth: import synthetic annotations"
    def project = getProject()
    if (project == null)
        throw new IllegalStateException("open a project first (File > Open project)")
    File folder = new File(Projects.getBaseDirectory(project), "annotations")
    def openEntry = getProjectEntry()
    Map counts = ["imported": 0, "has objects": 0, "no file": 0, "failed": 0]
    for (entry in project.getImageList()) {
        if (!isSyntheticEntry(entry))
            continue
        File geojson = new File(folder, entry.getID() + ".geojson")
        try {
            String result = importEntryAnnotations(entry, geojson, openEntry != null && entry == openEntry)
            counts.put(result, counts.get(result) + 1)
            if (result == "no file")
                println("WARNING: " + entry.getImageName() + " (entry " + entry.getID() + "): no " + geojson.getPath())
        } catch (Exception e) {
            println("ERROR: " + entry.getImageName() + " (entry " + entry.getID() + "): " + e.getMessage())
            counts.put("failed", counts.get("failed") + 1)
        }
    }
    project.syncChanges()
    def gui = getQuPath()
    if (gui != null)
        gui.refreshProject()
    String message = "annotations imported into " + counts.get("imported") + " synthetic image(s); " +
            counts.get("has objects") + " already had objects"
    if (counts.get("no file") > 0)
        message += "; " + counts.get("no file") + " had no GeoJSON in " + folder.getPath()
    if (counts.get("failed") > 0)
        message += "; " + counts.get("failed") + " failed (see the log)"
    tellUser(title, message, counts.get("failed") > 0)
}

if (histosynthBatch()[0] == 0) {  // project-wide work: once, not once per image of a batch
    try {
        importSyntheticAnnotations()
    } catch (IllegalStateException e) {
        tellUser("histosynth: import synthetic annotations", e.getMessage(), true)
    }
}
