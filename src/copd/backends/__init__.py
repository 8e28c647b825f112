"""The roles a branch plays (sampling, scoring, learning) and the backends that play them.

`roles` is the seam: protocols and the plain CPU data that crosses them. `local` holds
the in-process transformers implementations (full weights, LoRA, vision-language), the
reference every other backend must match.
"""
