"""Specs of loss-based sample reweighting (P15): ``weighted_sequence_ce`` (per-sequence mean token
cross-entropy, weighted and summed) and ``loss_reweight_weights`` (the weight rule)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from twinops.reference.classification.loss_reweighting import STRATEGIES

from ... import wrong_ports
from ...registry import register
from ...spec import DEFAULT_TOLERANCE, BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EXTREME_SCALE, LOGIT_SCALES, seed, upstream_grad
from ._rowloss import ROW_LOSS_TOLERANCE

MODULE = "classification.loss_reweighting"
REF = f"twinops.reference.{MODULE}"
ACC = f"twinops.accelerated.{MODULE}"
BASE = f"twinops.conformance.baselines.{MODULE}"

# ------------------------------------------------------------------------------------ weighted_sequence_ce

# Sequences, tokens per sequence and vocabulary sizes; V crosses the 32-wide class chunks of the
# interpreter (31/32/33) and the gpu profile's 4096-wide chunks.
SEQUENCES = {"ci": (1, 2, 3), "dev": (1, 2, 3, 4), "gpu": (1, 4, 8)}
TOKENS = {"ci": (1, 2, 3, 5), "dev": (1, 2, 3, 5, 8, 17), "gpu": (1, 17, 64, 257)}
VOCAB = {"ci": (1, 2, 7, 31, 32, 33), "dev": (1, 2, 3, 7, 31, 32, 33, 65), "gpu": (2, 33, 4095, 4097, 32000)}
LAYOUTS_3D = ("contiguous", "strided", "row_strided")


def _weights(draw, rng, b):
    kind = draw(st.sampled_from(("softmax", "positive", "with zeros")))
    if kind == "softmax":  # what loss_reweight_weights produces
        return rng.dirichlet(np.ones(b)), kind
    w = rng.uniform(0.1, 2.0, size=b)
    if kind == "with zeros":
        w = np.where(rng.random(b) < 0.5, 0.0, w)
    return w, kind


@st.composite
def _ce_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    b = draw(st.sampled_from(SEQUENCES[profile]))
    t = draw(st.sampled_from(TOKENS[profile]))
    v = draw(st.sampled_from(VOCAB[profile]))
    scale = draw(st.sampled_from(LOGIT_SCALES + ((EXTREME_SCALE,) if dtype == "float32" else ())))
    logits = rng.normal(size=(b, t, v)) * scale + rng.normal() * scale
    ignore_index = draw(st.sampled_from((-100, -1)))
    mask_mode = draw(st.sampled_from(("none", "some", "some", "an empty sequence", "all")))
    labels = rng.integers(0, v, size=(b, t))
    if mask_mode in ("some", "an empty sequence"):
        labels = np.where(rng.random((b, t)) < 0.3, ignore_index, labels)
    if mask_mode == "an empty sequence":
        labels[rng.integers(b)] = ignore_index
    elif mask_mode == "all":
        labels[:] = ignore_index
    weights, weight_kind = _weights(draw, rng, b)
    kwargs = {
        "scale": draw(st.sampled_from((1.0, 0.5, 4.0)) | st.floats(0.1, 8.0)),
        "shift": draw(st.booleans()),
        "ignore_index": ignore_index,
        "reduction": draw(st.sampled_from(("sum", "mean", "none"))),
    }
    layouts = {"logits": draw(st.sampled_from(LAYOUTS_3D))}
    if draw(st.booleans()):
        layouts["labels"] = "strided"
    if draw(st.booleans()):
        layouts["weights"] = "strided"
    return Sample(
        {"logits": logits, "labels": labels.astype(np.int64), "weights": weights}, kwargs, ("logits", "weights"),
        layouts, grad_out=upstream_grad(rng, (b,) if kwargs["reduction"] == "none" else ()),
        note=f"scale={scale:g}, masked={mask_mode}, weights={weight_kind}",
    )


def _ce_edges() -> list[Sample]:
    """Fixed cases, each at one reduction (the empty-sequence cases at every reduction: that is where
    the reductions differ)."""
    rng = np.random.default_rng(15)
    z = rng.normal(size=(3, 3, 5))
    w = np.array([0.5, 0.3, 0.2])
    y = rng.integers(0, 5, size=(3, 3))
    empty = y.copy()
    empty[1] = -100
    nan, pinf, ninf = z.copy(), z.copy(), z.copy()
    nan[0, 1, 2] = np.nan
    pinf[2, 0, 4] = np.inf
    ninf[:, :, 3] = -np.inf
    masked_nan = z.copy()
    masked_nan[1] = np.nan  # sequence 1 ignored entirely
    masked_nan[0, 2] = np.nan  # the shifted-out last position
    cases = [(z, empty, {"reduction": r}, "sequence 1 has no active token") for r in ("sum", "mean", "none")]
    cases += [
        (z, np.full((3, 3), -100), {"reduction": "mean"}, "every token ignored: 0/0"),
        (z, np.full((3, 3), -100), {"reduction": "none"}, "every token ignored"),
        (z[:, :1], y[:, :1], {"reduction": "none"}, "T = 1: nothing to score after the shift"),
        (z[:, :1], y[:, :1], {"shift": False, "reduction": "mean"}, "T = 1 without shift"),
        (nan, y, {"reduction": "none"}, "NaN in an active token"),
        (masked_nan, empty, {"reduction": "sum"}, "NaN only where ignored or shifted out"),
        (pinf, y, {"shift": False, "reduction": "none"}, "+inf in an active token"),
        (ninf, np.where(y == 3, 0, y), {"reduction": "sum"}, "a -inf (masked-out) class"),
        (np.full((3, 3, 5), 2.5), y, {"scale": 3.0, "reduction": "mean"}, "constant logits, scale 3"),
        (rng.normal(size=(3, 3, 1)), np.zeros((3, 3), dtype=np.int64), {"reduction": "sum"}, "one class"),
    ]
    out = []
    for logits, labels, extra, note in cases:
        kw = {"scale": 1.0, "shift": True, "ignore_index": -100, **extra}
        grad = upstream_grad(rng, (3,) if kw["reduction"] == "none" else ())
        out.append(Sample({"logits": logits, "labels": np.asarray(labels, dtype=np.int64), "weights": w}, kw,
                          ("logits", "weights"), grad_out=grad, note=note))
    return out


def _ce_call(logits=(2, 3, 4), labels=None, weights="default", **kwargs):
    def make():
        z = np.zeros(logits)
        y = np.zeros(logits[:2], dtype=np.int64) if labels is None else np.asarray(labels)
        arrays = {"logits": z, "labels": y}
        if weights is not None:
            arrays["weights"] = np.full(logits[0], 0.5) if isinstance(weights, str) else np.asarray(weights)
        return arrays, kwargs

    return make


CE_BAD = (
    BadInput("label >= V", _ce_call(labels=[[0, 4, 1], [0, 1, 2]]), ValueError, "labels", data_dependent=True),
    BadInput("negative label other than ignore_index", _ce_call(labels=[[0, 1, 2], [0, -5, 2]]), ValueError,
             "labels", data_dependent=True),
    BadInput("2-D logits", _ce_call(logits=(2, 3), labels=np.zeros((2, 3), dtype=np.int64)), ValueError, "logits"),
    BadInput("no classes (V = 0)", _ce_call(logits=(2, 3, 0)), ValueError, "logits"),
    BadInput("float labels", _ce_call(labels=np.zeros((2, 3))), TypeError, "labels"),
    BadInput("labels shape differs from (B, T)", _ce_call(labels=np.zeros((2, 4), dtype=np.int64)), ValueError,
             "labels"),
    BadInput("weights of the wrong length", _ce_call(weights=np.ones(3)), ValueError, "weights"),
    BadInput("2-D weights", _ce_call(weights=np.ones((2, 1))), ValueError, "weights"),
    BadInput("scale NaN", _ce_call(scale=float("nan")), ValueError, "scale"),
    BadInput("shift not a bool", _ce_call(shift=1), TypeError, "shift"),
    BadInput("ignore_index not an int", _ce_call(ignore_index=-100.0), TypeError, "ignore_index"),
    BadInput("unknown reduction", _ce_call(reduction="avg"), ValueError, "reduction"),
)


def _vocab(sample: Sample) -> int:
    return int(np.shape(sample.arrays["logits"])[2])


def _ce_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads the logits once; backward reads them once and writes the gradient once. Per
    token: the int64 label (read once per pass) and the 8-byte (m, s) statistics."""
    b, t, v = np.shape(arrays["logits"])
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
    label_passes = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[direction]
    return float(passes * b * t * v * itemsize + b * t * (8 * label_passes + 8))


def _ce_bench(b, t, v):
    def inputs(b, t, v):
        def make(rng):
            return {"logits": rng.standard_normal((b, t, v), dtype=np.float32),
                    "labels": rng.integers(0, v, (b, t)),
                    "weights": rng.dirichlet(np.ones(b))}, {}

        return make

    return BenchCase(f"B={b} T={t} V={v} ({b * t} tokens)", inputs(b, t, v), ("logits", "weights"),
                     smoke=inputs(2, 3, 40), dtypes=("float32", "bfloat16"))


def _flips_shift(fn):
    """Scores logits[:, t] against labels[:, t] where the caller asked for the shift (or the reverse)."""
    return lambda **kw: fn(**{**kw, "shift": not kw.get("shift", True)})


def _token_mean(fn):
    """Averages over every active token of the batch instead of within each sequence: sequence i's
    weight becomes w_i n_i / N, so long sequences dominate."""
    import torch

    def port(**kw):
        labels, shift = kw["labels"], kw.get("shift", True)
        n = (labels[:, int(shift):] != kw.get("ignore_index", -100)).sum(1).to(kw["weights"].dtype)
        return fn(**{**kw, "weights": kw["weights"] * n / torch.clamp(n.sum(), min=1)})

    return port


def _ignored_as_class_0(labels, kw):
    import torch

    return torch.where(labels == kw.get("ignore_index", -100), 0, labels)


WEIGHTED_SEQUENCE_CE = Spec(
    name="weighted_sequence_ce",
    paper=15,
    family="classification",
    summary="Per-sequence mean token cross-entropy (shifted, ignore_index), weighted and summed: the P15 "
            "training loss, fused, with the per-sequence backward scale.",
    reference=f"{REF}:weighted_sequence_ce",
    reference_grad=f"{REF}:weighted_sequence_ce_grad",
    accelerated=f"{ACC}:weighted_sequence_ce",
    baseline=f"{BASE}:weighted_sequence_ce",
    samples=lambda profile, dtype: _ce_samples(profile, dtype),
    examples=_ce_edges,
    grad_inputs=("logits", "weights"),
    tolerance=ROW_LOSS_TOLERANCE,
    reduction_length=_vocab,
    bad_inputs=CE_BAD,
    bench_cases=(_ce_bench(8, 1024, 32000), _ce_bench(4, 1024, 128256)),
    bytes_moved=_ce_bytes,
    properties=(
        "with weights=None, scale=1, shift=False and reduction='none', a sequence of one token is "
        "torch.nn.functional.cross_entropy (tested)",
        "reduction='none' with the defaults gives the per-sequence losses loss_reweight_weights takes",
        "sequences without an active token contribute 0 and get gradient 0",
    ),
    wrong_ports={
        "ignores the shift": _flips_shift,
        "ignores ignore_index": wrong_ports.replaces_argument("labels", _ignored_as_class_0),
        "averages over the batch's tokens, not per sequence": _token_mean,
        "mean over all sequences, empty ones included": wrong_ports.mean_over_all_rows,
    },
)


# ------------------------------------------------------------------------------------ loss_reweight_weights

LENGTHS = {
    "ci": (1, 2, 3, 5, 16, 31, 33, 65),
    "dev": (1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33, 64, 65, 100),
    "gpu": (1, 7, 4095, 4096, 4097, 65536),
}
SPREADS = (1e-8, 1e-3, 1.0, 10.0)  # 1e-8: below the 1e-6 range floor


@st.composite
def _weight_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    n = draw(st.sampled_from(LENGTHS[profile]))
    spread = draw(st.sampled_from(SPREADS))
    offset = draw(st.sampled_from((0.0, 3.0)))
    losses = offset + spread * rng.standard_normal(n)
    if draw(st.booleans()):  # duplicates and ties at the extremes
        losses = rng.choice(losses[: max(1, n // 4)], size=n)
    mask_mode = draw(st.sampled_from(("none", "some", "some", "one", "nothing")))
    arrays = {"losses": losses}
    if mask_mode != "none":
        active = {"some": rng.random(n) < 0.7, "one": np.arange(n) == rng.integers(n),
                  "nothing": np.zeros(n, dtype=bool)}[mask_mode]
        if draw(st.booleans()):
            losses[~active] = np.nan  # values of inactive entries never matter
        arrays["active"] = active
    kwargs = {
        "strategy": draw(st.sampled_from(STRATEGIES)),
        "delta": draw(st.sampled_from((1.0, 0.5, 2.0)) | st.floats(0.25, 2.0)),
        "temperature": draw(st.sampled_from((1.0, 0.1, 0.5, 5.0)) | st.floats(0.1, 10.0)),
        "readme_uniform": draw(st.booleans()),
    }
    layouts = {"losses": draw(st.sampled_from(("contiguous", "strided")))}
    if "active" in arrays and draw(st.booleans()):
        layouts["active"] = "strided"
    return Sample(arrays, kwargs, ("losses",), layouts, note=f"spread={spread:g}, active={mask_mode}")


def _weight_edges() -> list[Sample]:
    rng = np.random.default_rng(150)
    losses = 3.0 + rng.standard_normal(9)
    with_nan = losses.copy()
    with_nan[[2, 5]] = np.nan
    mask = np.ones(9, dtype=bool)
    mask[[2, 5]] = False
    ties = np.array([1.0, 2.0, 2.0, 1.0, 1.5, 2.0])

    def sample(arrays, note, **kwargs):
        return Sample(arrays, {"strategy": "linupper", **kwargs}, ("losses",), note=note)

    out = [
        sample({"losses": np.full(5, 2.5)}, "all losses equal: uniform", strategy="quadratic"),
        sample({"losses": 3.0 + 1e-8 * np.arange(4)}, "spread below the range floor", strategy="extremes"),
        sample({"losses": losses, "active": np.zeros(9, dtype=bool)}, "no active entry: all zeros"),
        sample({"losses": losses[:0]}, "empty"),
        sample({"losses": losses[:1]}, "one sequence"),
        sample({"losses": with_nan, "active": mask}, "NaN only in inactive entries", strategy="quadratic"),
        sample({"losses": ties}, "ties at the minimum and maximum", strategy="extremes", temperature=0.5),
        sample({"losses": losses}, "true uniform", strategy="uniform"),
        sample({"losses": losses}, "README uniform", strategy="uniform", readme_uniform=True),
        sample({"losses": losses}, "sharp temperature", temperature=0.1, delta=2.0),
        sample({"losses": losses}, "flat temperature", strategy="quadratic", temperature=10.0),
    ]
    return out


def _wcall(losses=(1.0, 2.0, 3.0), active=None, **kwargs):
    def make():
        arrays = {"losses": np.asarray(losses, dtype=np.float64)}
        if active is not None:
            arrays["active"] = np.asarray(active)
        return arrays, kwargs

    return make


WEIGHT_BAD = (
    BadInput("NaN active loss", _wcall((1.0, float("nan"), 3.0)), ValueError, "losses", data_dependent=True),
    BadInput("infinite active loss", _wcall((1.0, float("inf"), 3.0)), ValueError, "losses", data_dependent=True),
    BadInput("2-D losses", _wcall(((1.0, 2.0),)), ValueError, "losses"),
    BadInput("integer active mask", _wcall(active=(1, 0, 1)), TypeError, "active"),
    BadInput("active of the wrong length", _wcall(active=(True, False)), ValueError, "active"),
    BadInput("unknown strategy", _wcall(strategy="linear"), ValueError, "strategy"),
    BadInput("temperature = 0 (must be > 0)", _wcall(temperature=0.0), ValueError, "temperature"),
    BadInput("negative temperature", _wcall(temperature=-1.0), ValueError, "temperature"),
    BadInput("temperature NaN", _wcall(temperature=float("nan")), ValueError, "temperature"),
    BadInput("delta = 0 (must be > 0)", _wcall(delta=0.0), ValueError, "delta"),
    BadInput("readme_uniform not a bool", _wcall(readme_uniform=1), TypeError, "readme_uniform"),
)


def _weight_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """The compulsory traffic: the losses and the mask read once, the weights written once (the
    kernel's three passes re-read the losses from L2 at these sizes)."""
    n = np.shape(arrays["losses"])[0]
    return float(2 * n * itemsize + (n if "active" in arrays else 0))


def _weight_bench(n):
    def inputs(n):
        def make(rng):
            return {"losses": (2.0 + 0.5 * rng.standard_normal(n)).astype(np.float32),
                    "active": rng.random(n) < 0.99}, {"strategy": "linupper", "temperature": 0.5}

        return make

    return BenchCase(f"n={n} sequences (an all-gathered global batch)", inputs(n), ("losses",),
                     smoke=inputs(40), dtypes=("float32",))


def _readme_uniform(fn):
    return lambda **kw: fn(**{**kw, "readme_uniform": True})


def _drops_mask(fn):
    return lambda **kw: fn(**{k: v for k, v in kw.items() if k != "active"})


def _temperature_multiplies(fn):
    """exp(f * r) instead of exp(f / r)."""
    return wrong_ports.replaces_argument("temperature", lambda r, kw: 1.0 / r)(fn)


WEIGHT_TOLERANCE = Tolerance(
    rtol=dict(DEFAULT_TOLERANCE.rtol),
    atol=dict(DEFAULT_TOLERANCE.atol),
    reasons=("atol grows with sqrt(n): the softmax denominator is a sum over the n losses.",),
)


LOSS_REWEIGHT_WEIGHTS = Spec(
    name="loss_reweight_weights",
    paper=15,
    family="classification",
    summary="The P15 weight rule: per-sequence losses normalised to [-delta, delta], a strategy "
            "(LinUpper, Quadratic, Extremes, uniform) and a tempered softmax, under stop-gradient.",
    reference=f"{REF}:loss_reweight_weights",
    reference_grad=None,
    accelerated=f"{ACC}:loss_reweight_weights",
    baseline=f"{BASE}:loss_reweight_weights",
    samples=lambda profile, dtype: _weight_samples(profile, dtype),
    examples=_weight_edges,
    tolerance=WEIGHT_TOLERANCE,
    reduction_length=lambda sample: int(np.shape(sample.arrays["losses"])[0]),
    bad_inputs=WEIGHT_BAD,
    bench_cases=(_weight_bench(65536),),
    bytes_moved=_weight_bytes,
    properties=(
        "active weights sum to 1; inactive entries get exactly 0",
        "strategy='uniform' gives 1 / n_active; readme_uniform=True reproduces the README snippet instead",
        "not trained through: no gradient (stop-gradient weights)",
    ),
    wrong_ports={
        "the README's uniform (up-weights high losses)": _readme_uniform,
        "ignores the active mask": _drops_mask,
        "multiplies by the temperature": _temperature_multiplies,
    },
)

register(WEIGHTED_SEQUENCE_CE, LOSS_REWEIGHT_WEIGHTS)
