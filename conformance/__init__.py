"""twinops.conformance — specs, strategies, tolerances and the engine that checks any
implementation of a technique (ours or a port) against its NumPy reference."""

from .check import Report, check_port, check_reference
from .registry import all_specs, get, names
from .spec import BadInput, BenchCase, Sample, Spec, Tolerance

__all__ = [
    "check_port", "check_reference", "Report", "all_specs", "get", "names",
    "Spec", "Sample", "Tolerance", "BadInput", "BenchCase",
]
