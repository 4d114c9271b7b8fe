/*
 * nuclick-wsi, step 1 of 3: export this image's clicks for NuClick.
 *
 * Writes the image's Points annotations (one click inside each nucleus) and line annotations
 * (squiggles), plus its area annotations (used only by `nuclick-wsi qupath run --roi` to limit the
 * work), to
 *
 *     PROJECT/nuclick/clicks/<image name>.geojson
 *
 * as a GeoJSON FeatureCollection, in QuPath's own pixel coordinates. Earlier NuClick results
 * (objects carrying the "NuClick score" measurement) and an imported review list (the "NuClick
 * review" measurement) are never exported.
 *
 * Run it for every image: Automate > Script editor > open this file > Run > Run for project
 * (or headless:  QuPath script -p /path/to/project.qpproj export_clicks.groovy).
 * Then:  nuclick-wsi qupath run /path/to/project.qpproj
 *
 * Written for the QuPath 0.5 / 0.6 scripting API (also 0.4): getProjectEntry, getProject,
 * getAnnotationObjects, exportObjectsToGeoJson(..., "FEATURE_COLLECTION"), buildFilePath,
 * PROJECT_BASE_DIR, mkdirs.
 */

import java.nio.file.Files
import java.nio.file.StandardCopyOption

// Set to false to export points and lines only.
def INCLUDE_AREAS = true

// Shared with the Python side (nuclick_wsi/workflows/qupath_project/project.py); a test checks they match.
def RESULT_MARKER = 'NuClick score'
def UNSAFE_FILENAME = $/[\\/:*?"<>|\x00-\x1F\x7F]+/$
def EMPTY_NAME = 'unnamed'
// Shared with nuclick_wsi/qc/review.py (REVIEW_MEASUREMENT); a test checks they match.
def REVIEW_MARKER = 'NuClick review'

def entry = getProjectEntry()
if (entry == null) {
    println 'nuclick-wsi: no project image is open; run this script from a project (Run for project)'
    return
}
def imageName = entry.getImageName()
def fileName = safeName(imageName, UNSAFE_FILENAME, EMPTY_NAME)

// Two images with the same file name would overwrite each other's clicks.
def twins = getProject().getImageList().findAll { safeName(it.getImageName(), UNSAFE_FILENAME, EMPTY_NAME).equalsIgnoreCase(fileName) }
if (twins.size() > 1) {
    println "nuclick-wsi: ERROR ${imageName}: ${twins.size()} images of this project share the file name '${fileName}'; rename them so that each is unique"
    return
}

def objects = getAnnotationObjects().findAll { o ->
    def roi = o.getROI()
    roi != null && !o.getMeasurementList().containsKey(RESULT_MARKER) &&
        !o.getMeasurementList().containsKey(REVIEW_MARKER) &&  // an imported review list is not clicks
        (roi.isPoint() || roi.isLine() || (INCLUDE_AREAS && roi.isArea()))
}
int nClicks = objects.findAll { it.getROI().isPoint() }.sum(0) { it.getROI().getNumPoints() }
int nLines = objects.count { it.getROI().isLine() }
int nAreas = objects.count { it.getROI().isArea() }

def dir = buildFilePath(PROJECT_BASE_DIR, 'nuclick', 'clicks')
mkdirs(dir)
def target = new File(dir, fileName + '.geojson')
if (nClicks + nLines == 0) {
    if (target.exists())
        target.delete()  // no stale clicks for an image whose points were all deleted
    println "nuclick-wsi: ${imageName}: no Points or line annotations, nothing exported"
    return
}
// Write beside the target, then rename: nuclick-wsi never sees a half-written file.
def tmp = new File(dir, fileName + '.geojson.tmp')
exportObjectsToGeoJson(objects, tmp.getAbsolutePath(), 'FEATURE_COLLECTION')
Files.move(tmp.toPath(), target.toPath(), StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
println "nuclick-wsi: ${imageName}: ${nClicks} clicks, ${nLines} lines, ${nAreas} areas -> ${target}"


/** The file-name form of an image name: each run of characters illegal in file names becomes '_'. */
static String safeName(String name, String unsafe, String empty) {
    def out = (name ?: '').replaceAll(unsafe, '_')
    return out.trim().isEmpty() ? empty : out
}
