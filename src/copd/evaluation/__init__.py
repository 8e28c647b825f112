"""Scoring models on capabilities (pass rates, greedy and sampled accuracy) and merge-readiness diagnostics."""
