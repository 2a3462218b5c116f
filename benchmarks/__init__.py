"""jaxnorm benchmarks: ratios of jitted steps measured side by side in one run.

Run ``python -m benchmarks.run`` (or ``make bench``); ``--smoke`` runs every section at toy size
once, which the test suite does so that the benchmarks cannot rot. Results are recorded in
BENCHMARKS.md.
"""
