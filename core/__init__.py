"""The bottom layer: facts every other package shares, with no import of the project's own packages.

`keys` (batch column names, `IGNORE_INDEX`, the metric-sum columns), `ranks` (which process this is),
`files` (atomic writes and build-once directories).
"""
