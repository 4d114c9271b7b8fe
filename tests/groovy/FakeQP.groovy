/*
 * A stand-in for QuPath's scripting API (qupath.lib.scripting.QP), just enough to run
 * workflows/qupath/*.groovy under plain Groovy in the tests: project entry and image list,
 * annotations with point/line/area ROIs, measurement lists, object IDs, a hierarchy, GeoJSON
 * export, buildFilePath/PROJECT_BASE_DIR/mkdirs. Not QuPath: it checks the scripts' own logic
 * (file names, folders, which objects go out, what is removed before an import).
 */
import groovy.json.JsonOutput

abstract class FakeQP extends Script {
    static String PROJECT_BASE_DIR = '{%PROJECT}'
    static String projectDir
    static FakeEntry entry
    static List<FakeEntry> images = []
    static FakeHierarchy hierarchy = new FakeHierarchy()
    static int updates = 0

    static void setUp(Map job) {
        projectDir = job.project
        images = job.images.collect { new FakeEntry(it) }
        entry = job.image == null ? null : new FakeEntry(job.image)
        if (job.objects != 'previous') {  // 'previous': keep the hierarchy the last job left
            hierarchy = new FakeHierarchy()
            job.objects.each { hierarchy.objects << FakeObject.fromSpec(it) }
        }
        updates = 0
    }

    static Map dump() {
        [objects: hierarchy.objects.collect { it.toSpec() }, updates: updates]
    }

    def getProjectEntry() { entry }
    def getProject() { [getImageList: { -> images }] as FakeProject }
    def getAnnotationObjects() { hierarchy.objects.findAll { it.kind == 'annotation' } }
    def getCurrentHierarchy() { hierarchy }
    void fireHierarchyUpdate() { updates++ }
    String buildFilePath(String first, String... more) {
        def parts = [first.replace(PROJECT_BASE_DIR, projectDir)] + (more as List)
        parts.join(File.separator)
    }
    void mkdirs(String path) { new File(path).mkdirs() }

    void exportObjectsToGeoJson(Collection objects, String path, String option, String... more) {
        assert option == 'FEATURE_COLLECTION'
        def features = objects.collect { o -> o.toFeature() }
        new File(path).text = JsonOutput.toJson([type: 'FeatureCollection', features: features])
    }
}

interface FakeProject { List getImageList() }

class FakeEntry {
    String name
    FakeEntry(String name) { this.name = name }
    String getImageName() { name }
}

class FakeROI {
    String type  // point, line, area
    List coords
    boolean isPoint() { type == 'point' }
    boolean isLine() { type == 'line' }
    boolean isArea() { type == 'area' }
    int getNumPoints() { coords.size() }
}

class FakeMeasurements {
    Map<String, Double> map = [:]
    boolean containsKey(String name) { map.containsKey(name) }
}

class FakeObject {
    String kind  // annotation, detection, cell
    FakeROI roi
    FakeMeasurements measurements = new FakeMeasurements()
    UUID id = UUID.randomUUID()
    String tag

    FakeROI getROI() { roi }
    FakeMeasurements getMeasurementList() { measurements }
    UUID getID() { id }

    static FakeObject fromSpec(Map s) {
        def o = new FakeObject(kind: s.kind ?: 'annotation', roi: new FakeROI(type: s.roi, coords: s.coords), tag: s.tag)
        if (s.id) o.id = UUID.fromString(s.id)
        def m = s.measurements ?: [:]
        if (m instanceof Map)
            m.each { k, v -> o.measurements.map[k] = v as Double }
        else
            m.each { k -> o.measurements.map[k] = 1d }  // names only, as toSpec() writes them
        return o
    }

    Map toSpec() {
        [kind: kind, roi: roi.type, id: id.toString(), measurements: measurements.map.keySet().sort(), tag: tag]
    }

    Map toFeature() {
        def geometry
        if (roi.type == 'point')
            geometry = roi.coords.size() == 1 ? [type: 'Point', coordinates: roi.coords[0]] : [type: 'MultiPoint', coordinates: roi.coords]
        else if (roi.type == 'line')
            geometry = [type: 'LineString', coordinates: roi.coords]
        else
            geometry = [type: 'Polygon', coordinates: [roi.coords + [roi.coords[0]]]]
        [type: 'Feature', id: id.toString(), geometry: geometry, properties: [objectType: kind]]
    }
}

class FakeHierarchy {
    List<FakeObject> objects = []
    Collection getAllObjects(boolean includeRoot) { new ArrayList(objects) }
    void removeObjects(Collection gone, boolean keepChildren) { objects.removeAll(gone) }
    boolean addObjects(Collection more) { objects.addAll(more) }
}
