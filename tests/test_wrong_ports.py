"""The suite can fail: deliberately wrong ports of every technique must be caught by check_port,
each with a readable message. The wrong ports wrap our (conforming) kernels and break one thing:
the generic ones (`twinops.conformance.wrong_ports.generic`) for every technique, plus each spec's
own ``wrong_ports`` (an ignored mask, a wrong reduction, ...)."""

import pytest

from twinops.conformance import check_port, registry, wrong_ports

CASES = [
    (spec.name, bug)
    for spec in registry.all_specs()
    for bug in {**wrong_ports.generic(spec), **spec.wrong_ports}
]


def _port(spec, bug):
    ports = {**wrong_ports.generic(spec), **spec.wrong_ports}
    return ports[bug](spec.accelerated_fn())


@pytest.mark.parametrize("name,bug", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_wrong_port_is_caught(name, bug):
    spec = registry.get(name)
    report = check_port(name, _port(spec, bug), dtypes=("float32",), bad_inputs=False, shrink=False)
    assert not report.ok, f"{bug} port of {name} passed:\n{report}"
    text = str(report)
    assert name in text and "FAIL" in text and "input:" in text and "reference" in text


def test_every_technique_has_a_characteristic_wrong_port():
    """Beyond the generic two, each technique names at least one bug of its own kind."""
    missing = [s.name for s in registry.all_specs() if not s.wrong_ports]
    assert not missing, f"no technique-specific wrong ports: {missing}"


def test_missing_technique_is_reported_not_crashed():
    report = check_port("no_such_technique", lambda **kw: None)
    assert report.verdict == "not implemented" and "comp_sum_loss" in str(report)


def test_not_implemented_port_is_reported():
    def port(**kw):
        raise NotImplementedError("ours has no fp16 yet")

    report = check_port("comp_sum_loss", port, dtypes=("float32",))
    assert report.verdict == "not implemented"


def test_non_torch_port_with_converters():
    """A port in another framework (here plain NumPy standing in for JAX) plugs in with converters."""
    import numpy as np

    from twinops.reference.classification import comp_sum_loss

    def numpy_port(**kw):
        return comp_sum_loss(**kw)

    report = check_port("comp_sum_loss", numpy_port, to_native=lambda a, dtype, layout: np.asarray(a),
                        to_numpy=np.asarray, dtypes=("float32",))
    assert report.ok, str(report)
    assert any("no vjp" in s for s in report.skipped)
