"""The comparison rule itself: it must accept what it should and reject what it should."""

import numpy as np
import torch

from twinops.conformance.numerics import compare, round_to_dtype
from twinops.conformance.spec import DEFAULT_TOLERANCE as TOL


def test_bfloat16_rounding_matches_torch():
    x = np.random.default_rng(0).normal(size=1000) * 10.0 ** np.random.default_rng(1).integers(-8, 8, 1000)
    want = torch.tensor(x).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(round_to_dtype(x, "bfloat16"), want)


def test_nan_and_inf_positions_are_exact():
    ref = np.array([1.0, np.nan, np.inf])
    assert compare(ref.copy(), ref, dtype="float32", tolerance=TOL).ok
    assert not compare(np.array([1.0, 0.0, np.inf]), ref, dtype="float32", tolerance=TOL).ok
    assert not compare(np.array([1.0, np.nan, -np.inf]), ref, dtype="float32", tolerance=TOL).ok
    assert not compare(np.array([np.nan, np.nan, np.inf]), ref, dtype="float32", tolerance=TOL).ok


def test_overflow_to_inf_is_expected_in_half_precision():
    assert compare(np.array([np.inf]), np.array([1e6]), dtype="float16", tolerance=TOL).ok
    assert not compare(np.array([np.inf]), np.array([1e6]), dtype="float32", tolerance=TOL).ok


def test_tolerance_bounds():
    ref = np.array([1.0, 2.0])
    assert compare(ref * (1 + 5e-6), ref, dtype="float32", tolerance=TOL).ok
    assert not compare(ref * (1 + 5e-5), ref, dtype="float32", tolerance=TOL).ok
    assert not compare(ref[:1], ref, dtype="float32", tolerance=TOL).ok


def test_no_worse_than_baseline_rule_only_for_16_bit():
    ref = np.array([1.0])
    acc, base = np.array([1.03]), np.array([1.02])
    assert compare(acc, ref, dtype="bfloat16", tolerance=TOL, baseline=base).ok
    assert not compare(acc, ref, dtype="bfloat16", tolerance=TOL, baseline=np.array([1.001])).ok
    assert not compare(np.array([1.001]), ref, dtype="float32", tolerance=TOL, baseline=np.array([1.01])).ok
