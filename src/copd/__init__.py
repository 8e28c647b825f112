"""copd: Co-Evolving Policy Distillation.

Branches start from one base model, each runs RLVR (GRPO) on its own capability,
periodically they distil on-policy from each other, and at the end they are merged
by parameter averaging into one model.
"""

__version__ = "0.1.0"
