"""Capabilities: datasets of prompts with verifiable answers, and their verifiers."""

from copd.capabilities.builtin import BUILTIN_CAPABILITIES, CHAR_ALPHABET
from copd.capabilities.core import Capability, Sample, SampleSource, TrainSampler
from copd.capabilities.loader import load_capability
from copd.capabilities.verifiers import VERIFIERS, resolve_verifier

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
