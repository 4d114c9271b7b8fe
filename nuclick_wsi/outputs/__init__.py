"""Outputs: paths, commit, report; safety (output names, inputs never touched, stale outputs, free space); signals."""
