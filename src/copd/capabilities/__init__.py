"""Capabilities: datasets of prompts with verifiable answers, and their verifiers."""

from copd.capabilities.builtin import BUILTIN_CAPABILITIES, CHAR_ALPHABET
from copd.capabilities.capability import Capability, Sample, SampleSource, TrainSampler
from copd.capabilities.loader import load_capability
from copd.capabilities.verifiers import VERIFIERS, resolve_verifier

__all__ = [
    "BUILTIN_CAPABILITIES",
    "CHAR_ALPHABET",
    "VERIFIERS",
    "Capability",
    "Sample",
    "SampleSource",
    "TrainSampler",
    "load_capability",
    "resolve_verifier",
]
