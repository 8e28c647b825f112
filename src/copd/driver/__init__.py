"""The driver: runs a plan over branches (sample, score, update), logs, checkpoints, warm-starts, merges, compares."""
