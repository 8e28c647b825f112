"""The method as data: topologies of distillation edges, plans of phases (Algorithm 1), baselines as config transforms."""
