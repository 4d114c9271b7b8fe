/*
 * nuclick-wsi, step 3 of 3: bring the NuClick outlines of this image into QuPath.
 *
 * Reads PROJECT/nuclick/results/<image name>.geojson (or .geojson.gz), written by
 * `nuclick-wsi qupath run`, after removing this image's earlier NuClick results, so that
 * importing again (after a rerun with more clicks) never duplicates objects. Earlier results are
 * recognised by their "NuClick score" measurement (every object nuclick-wsi writes has one) and by
 * their IDs (nuclick-wsi gives each nucleus a deterministic UUID, kept by QuPath on import).
 * Your clicks, lines and other objects are left alone.
 *
 * Run it for every image: Automate > Script editor > open this file > Run > Run for project
 * (or headless, saving the images' data:  QuPath script -p /path/to/project.qpproj -s import_results.groovy).
 *
 * Written for the QuPath 0.5 / 0.6 scripting API (also 0.4): getProjectEntry, buildFilePath,
 * PROJECT_BASE_DIR, PathIO.readObjects / readObjectsFromGeoJSON, PathObjectHierarchy.removeObjects
 * and addObjects, MeasurementList.containsKey, PathObject.getID.
 */

import java.util.zip.GZIPInputStream
import qupath.lib.io.PathIO

// Shared with the Python side (nuclick_wsi/workflows/qupath_project.py); a test checks they match.
def RESULT_MARKER = 'NuClick score'
def UNSAFE_FILENAME = $/[\\/:*?"<>|\x00-\x1F\x7F]+/$
def EMPTY_NAME = 'unnamed'

def entry = getProjectEntry()
if (entry == null) {
    println 'nuclick-wsi: no project image is open; run this script from a project (Run for project)'
    return
}
def imageName = entry.getImageName()
def fileName = safeName(imageName, UNSAFE_FILENAME, EMPTY_NAME)

def dir = buildFilePath(PROJECT_BASE_DIR, 'nuclick', 'results')
def plain = new File(dir, fileName + '.geojson')
def gzipped = new File(dir, fileName + '.geojson.gz')
def objects
if (plain.isFile()) {
    objects = PathIO.readObjects(plain)
} else if (gzipped.isFile()) {
    // PathIO.readObjects knows .geojson, .json and .zip, not .gz
    gzipped.withInputStream { raw ->
        new GZIPInputStream(raw).withStream { stream -> objects = PathIO.readObjectsFromGeoJSON(stream) }
    }
} else {
    println "nuclick-wsi: ${imageName}: no results (${plain}); run `nuclick-wsi qupath run` first"
    return
}

def hierarchy = getCurrentHierarchy()
def newIds = objects.collect { it.getID() } as Set
def earlier = hierarchy.getAllObjects(false).findAll { o ->
    o.getMeasurementList().containsKey(RESULT_MARKER) || newIds.contains(o.getID())
}
if (!earlier.isEmpty())
    hierarchy.removeObjects(earlier, true)  // keep any children the user attached
hierarchy.addObjects(objects)
fireHierarchyUpdate()
println "nuclick-wsi: ${imageName}: removed ${earlier.size()} earlier NuClick objects, imported ${objects.size()} from ${plain.isFile() ? plain : gzipped}"


/** The file-name form of an image name: each run of characters illegal in file names becomes '_'. */
static String safeName(String name, String unsafe, String empty) {
    def out = (name ?: '').replaceAll(unsafe, '_')
    return out.trim().isEmpty() ? empty : out
}
