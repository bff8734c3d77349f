"""Metrics computed from a run: accuracy of selections against exact attention."""
