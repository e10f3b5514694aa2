"""Starting ``deit-serve`` and feeding it, for the tests and the benchmarks alike (neither imports the other).

Development tooling: it is not part of the wheel.
"""
