"""twinops: every technique twice — a NumPy reference (``twinops.reference``), a Triton kernel
under PyTorch (``twinops.accelerated``), and the conformance suite that proves they agree
(``twinops.conformance``)."""

__version__ = "0.1.0"
