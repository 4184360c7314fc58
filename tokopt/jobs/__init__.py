"""The jobs the CLI runs, as a Python API: optimize, evaluate, bench/compare, generate."""
