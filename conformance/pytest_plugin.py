"""pytest plugin (auto-loaded once twinops is installed) for checking ports in a test suite.

    def test_my_comp_sum(twinops_check):
        twinops_check("comp_sum_loss", my_comp_sum_loss)            # PyTorch port
        twinops_check("comp_sum_loss", jax_fn, to_native=jnp.asarray, to_numpy=np.asarray)

``twinops_check`` runs `twinops.conformance.check_port` with the profile given by
``--twinops-profile`` (default ``ci``) and fails the test with the report when it does not pass.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("twinops")
    group.addoption("--twinops-profile", default="ci", choices=("ci", "dev", "gpu"),
                    help="Hypothesis profile for twinops conformance checks (default: ci)")


@pytest.fixture
def twinops_check(request):
    from .check import check_port

    profile = request.config.getoption("--twinops-profile")

    def run(technique, fn, **kwargs):
        kwargs.setdefault("profile", profile)
        report = check_port(technique, fn, **kwargs)
        if not report.ok:
            pytest.fail(str(report), pytrace=False)
        return report

    return run
