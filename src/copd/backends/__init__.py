"""The roles a branch plays (sampling, scoring, learning) and the backends that play them.

`roles` is the seam: protocols and the plain CPU data that crosses them. `local` holds
the in-process transformers implementations (full weights, LoRA, vision-language), the
reference every other backend must match; `engine` a rollout engine (vLLM) in its own
process that takes the sampling role, kept in step with the learner's weights;
`ray_backend` a branch per Ray actor.
"""
