"""Claims of published papers tested on this pipeline's runs (issue: a claims table with statistics).
statistics.py holds the tests and verdicts."""
