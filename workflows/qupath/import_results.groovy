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
 * Review list: set IMPORT_REVIEW = true (below) to also import <image name>.review.geojson, the
 * outlines worth a second look as annotations of class "NuClick review", each named with its
 * reason (low confidence, area far from its class's median, clipped at the patch border, click on
 * the outline's edge, merged into a neighbour's territory, no outline). Walk them in the
 * Annotations tab; delete each once checked. Importing again replaces the earlier review list.
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

// Shared with the Python side (nuclick_wsi/workflows/qupath_project/project.py); a test checks they match.
def RESULT_MARKER = 'NuClick score'
def UNSAFE_FILENAME = $/[\\/:*?"<>|\x00-\x1F\x7F]+/$
def EMPTY_NAME = 'unnamed'
// Shared with nuclick_wsi/qc/review.py (REVIEW_MEASUREMENT); a test checks they match.
def REVIEW_MARKER = 'NuClick review'
def IMPORT_REVIEW = false  // true: also import <image>.review.geojson (the review list)

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

if (IMPORT_REVIEW) {
    def reviewFile = new File(dir, fileName + '.review.geojson')
    if (!reviewFile.isFile()) {
        println "nuclick-wsi: ${imageName}: no review list (${reviewFile}); `nuclick-wsi report ${dir}` writes it"
        return
    }
    def review = PathIO.readObjects(reviewFile)
    def oldReview = hierarchy.getAllObjects(false).findAll { o -> o.getMeasurementList().containsKey(REVIEW_MARKER) }
    if (!oldReview.isEmpty())
        hierarchy.removeObjects(oldReview, true)
    hierarchy.addObjects(review)
    fireHierarchyUpdate()
    println "nuclick-wsi: ${imageName}: review list: ${review.size()} annotations of class 'NuClick review' from ${reviewFile}"
}


/** The file-name form of an image name: each run of characters illegal in file names becomes '_'. */
static String safeName(String name, String unsafe, String empty) {
    def out = (name ?: '').replaceAll(unsafe, '_')
    return out.trim().isEmpty() ? empty : out
}
