"""Eager-PyTorch baselines: what a user would write without twinops. They are the speed baseline
in the benchmarks (eager and ``torch.compile``) and the "no worse than naive" yardstick for
16-bit tolerances. They are never the oracle: the NumPy reference is."""
