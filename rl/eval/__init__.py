"""Evaluation harness: the R1 protocol (sampling, the shared grader) and honest metrics with uncertainty."""
