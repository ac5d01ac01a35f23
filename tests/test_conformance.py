"""Every registered technique: the reference's gradient against float64 finite differences, the
reference's rejection of bad inputs, and the accelerated kernels against the reference."""

import pytest

from twinops.conformance import check_port, check_reference, registry

NAMES = registry.names()


def test_foundation_techniques_registered():
    assert {"comp_sum_loss", "spherical_z_loss", "ldr_kl_loss", "aldr_kl_loss"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reference_self_check(name):
    report = check_reference(name)
    assert report.ok, str(report)
    if registry.get(name).grad_inputs:
        assert report.worst[("float64", "fd-grad")].examples > 5


@pytest.mark.parametrize("name", NAMES)
def test_accelerated_conforms(name):
    spec = registry.get(name)
    report = check_port(spec, spec.accelerated_fn())
    assert report.ok, str(report)
    for dtype in ("float32", "float16"):
        assert report.worst[(dtype, "forward")].examples > 5
        if spec.grad_inputs:
            assert report.worst[(dtype, "backward")].examples > 5


@pytest.mark.parametrize("name", NAMES)
def test_status_complete(name):
    assert all(registry.status(registry.get(name)).values()), registry.status(registry.get(name))
