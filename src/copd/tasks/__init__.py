"""Capabilities: datasets of prompts with verifiable answers, and their verifiers."""

from copd.tasks.builtin import BUILTIN_CAPABILITIES, CHAR_ALPHABET
from copd.tasks.core import Capability, Sample, SampleSource, TrainSampler
from copd.tasks.loader import load_capability
from copd.tasks.verifiers import VERIFIERS, resolve_verifier

__all__ = [
    "BUILTIN_CAPABILITIES",
    "CHAR_ALPHABET",
    "Capability",
    "Sample",
    "SampleSource",
    "TrainSampler",
    "VERIFIERS",
    "load_capability",
    "resolve_verifier",
]
