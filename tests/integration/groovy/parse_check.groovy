/*
 * Parse Groovy scripts without resolving their classes (QuPath's need not be present):
 * each file is compiled up to Phases.CONVERSION (syntax + AST), all in this one JVM.
 *
 *     groovy parse_check.groovy A.groovy B.groovy ...
 *
 * Prints one line per file, "ok <file>" or "FAIL <file>: <errors>"; exits 1 if any failed.
 */

import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.CompilerConfiguration
import org.codehaus.groovy.control.Phases

int failures = 0
if (args.length == 0) {
    System.err.println("usage: groovy parse_check.groovy FILE...")
    System.exit(2)
}
for (String name : args) {
    File file = new File(name)
    try {
        CompilationUnit unit = new CompilationUnit(new CompilerConfiguration())
        unit.addSource(file)
        unit.compile(Phases.CONVERSION)
        println("ok " + name)
    } catch (Exception e) {
        failures += 1
        String message = String.valueOf(e.getMessage()).readLines().collect { it.trim() }.findAll { it }.join(" | ")
        println("FAIL " + name + ": " + message)
    }
}
System.exit(failures == 0 ? 0 : 1)
