package qupath.lib.io

import groovy.json.JsonSlurper

/** Stand-in for QuPath's PathIO: reads a GeoJSON FeatureCollection into fake objects. */
class PathIO {
    static List readObjects(File file) {
        def name = file.name.toLowerCase()
        assert name.endsWith('.geojson') || name.endsWith('.json') || name.endsWith('.zip'): "QuPath cannot read $file"
        file.withInputStream { readObjectsFromGeoJSON(it) }
    }

    static List readObjectsFromGeoJSON(InputStream stream) {
        def doc = new JsonSlurper().parse(stream, 'UTF-8')
        doc.features.collect { f ->
            def type = f.geometry.type == 'Point' || f.geometry.type == 'MultiPoint' ? 'point' :
                    (f.geometry.type.contains('Line') ? 'line' : 'area')
            def spec = [kind: f.properties?.objectType ?: 'annotation', roi: type, coords: [], id: f.id,
                        measurements: f.properties?.measurements ?: [:], tag: 'imported']
            PathIO.classLoader.loadClass('FakeObject').fromSpec(spec)
        }
    }
}
