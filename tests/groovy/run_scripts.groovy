/*
 * Runs QuPath scripts against FakeQP. Usage: groovy -cp tests/groovy run_scripts.groovy jobs.json out.json
 * jobs.json: [{script, project, image, images: [names], objects: [{kind, roi, coords, measurements, id, tag}] or 'previous'}]
 */
import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import org.codehaus.groovy.control.CompilerConfiguration

def jobs = new JsonSlurper().parse(new File(args[0]))
def results = []
jobs.each { job ->
    FakeQP.setUp(job)
    def cc = new CompilerConfiguration()
    cc.scriptBaseClass = 'FakeQP'
    def printed = new StringWriter()
    def binding = new Binding()
    binding.setVariable('out', new PrintWriter(printed, true))
    def shell = new GroovyShell(FakeQP.classLoader, binding, cc)
    shell.evaluate(new File(job.script))
    results << (FakeQP.dump() + [printed: printed.toString()])
}
new File(args[1]).text = JsonOutput.toJson(results)
