"""Pure-torch algorithm core of CoPD: advantages, losses, diagnostics, merging.

Nothing here does I/O or imports the rest of the project, so every function can be
tested on small hand-made tensors (docs/method.md gives the equations).
"""
