"""Spec of iSogCLR (P19): the robust two-way contrastive loss with per-sample learnable temperatures."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, embeddings, seed, upstream_grad

REF = "twinops.reference.metric.isogclr_loss"
ACC = "twinops.accelerated.metric.isogclr_loss"
BASE = "twinops.conformance.baselines.metric.isogclr_loss"

FLOATS = ("image_features", "text_features", "state_image", "state_text")
TAU_MIN, TAU_MAX = 5e-3, 1.0

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-4, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 2e-6, "float16": 2e-5, "bfloat16": 1e-3},
    atol_scales_with_row=True,
    reasons=(
        "fp32 rtol 1e-4: every exponent is (S_ij - S_ii) / tau with tau down to tau_min = 5e-3, so the "
        "fp32 rounding of a similarity (~1e-7 of |x||y| sqrt(D)) is amplified up to 200x (400x for "
        "the running max b') before exp; the estimators, weights and loss inherit that relative error.",
        "atol grows with sqrt(B), the number of terms each per-anchor sum adds.",
        "atol scales with the row's largest entry: a new-state row (tau, s, b', u') carries b' (up to "
        "2 / tau), and u' = ... + log s' + b' + rho - sum w hhat is a difference of terms that large, "
        "so its absolute error is relative to b'.",
        "16-bit features: the backward multiplies the in-tile weights rounded to the features' dtype "
        "by the features (as flash-attention does with P @ V); outputs also pass when no worse than "
        "2x the eager baseline + atol.",
        "bfloat16 (GPU lane only; the interpreter cannot run bf16 dots): atol 1e-3 and the eager "
        "baseline rule, which itself rounds the B x B similarity to bf16.",
    ),
)


def _state(rng: np.random.Generator, b: int, mode: str, tau_init: float) -> np.ndarray:
    """A batch's gathered (tau, s, b, u) rows: never seen (``cold``), or carried over from earlier
    steps (``warm``: temperatures across [tau_min, tau_max], s > 0, running maxima from 0 to 1 / tau,
    momenta within the clip)."""
    if mode == "cold":
        out = np.zeros((b, 4))
        out[:, 0] = tau_init
        return out
    tau = np.exp(rng.uniform(math.log(TAU_MIN), math.log(TAU_MAX), b))
    s = rng.uniform(0.0, 2.0, b) * (rng.random(b) < 0.9)
    run_max = rng.uniform(0.0, 1.0, b) / tau * (rng.random(b) < 0.8)
    u = rng.uniform(-5.0, 5.0, b)
    return np.stack([tau, s, run_max, u], axis=1)


def _hyper(draw) -> dict:
    kw = {}
    if draw(st.booleans()):
        kw["gamma"] = draw(st.sampled_from((0.8, 1.0, 0.1)) | st.floats(0.05, 1.0))
        kw["rho"] = draw(st.sampled_from((8.0, 6.0, 0.0)) | st.floats(-2.0, 10.0))
        kw["eta"] = draw(st.sampled_from((1e-3, 1e-2, 0.1, 0.0)))
        kw["beta_u"] = draw(st.sampled_from((0.9, 0.5, 1.0)) | st.floats(0.0, 1.0))
        kw["grad_clip"] = draw(st.sampled_from((5.0, 3.0, 0.5)))
        kw["eps"] = draw(st.sampled_from((1e-10, 1e-6, 0.0)))
    return kw


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    # Under the interpreter every tile costs milliseconds: the ci profile stops at 17 (one tile boundary).
    b = draw(st.sampled_from([n for n in EMBED_BATCH[profile] if 2 <= n <= (17 if profile == "ci" else 10**9)]))
    d = draw(st.sampled_from(EMBED_DIMS[profile]))
    scale = draw(st.sampled_from((1.0, 1.0, 0.5)))  # unit rows as the model gives them; sometimes shorter
    x = embeddings(rng, b, d, normalize=True) * scale
    y = embeddings(rng, b, d, normalize=True) * scale
    dup = draw(st.sampled_from(("none", "none", "image", "text")))
    if dup == "image" and b > 2:
        x[2] = x[0]  # two identical images: tied similarities in two rows
    elif dup == "text" and b > 2:
        y[1] = y[0]  # two identical texts: tied similarities in two columns
    modes = draw(st.sampled_from((("cold", "cold"), ("warm", "warm"), ("warm", "cold"))))
    tau_init = draw(st.sampled_from((0.01, 0.07, 1.0)))
    arrays = {"image_features": x, "text_features": y,
              "state_image": _state(rng, b, modes[0], tau_init), "state_text": _state(rng, b, modes[1], tau_init)}
    layouts = {k: draw(st.sampled_from(LAYOUTS)) for k in FLOATS}
    return Sample(arrays=arrays, kwargs=_hyper(draw), float_inputs=FLOATS, layouts=layouts,
                  grad_out=upstream_grad(rng, ()), note=f"state={modes}, duplicates={dup}, scale={scale}")


def _examples() -> list[Sample]:
    rng = np.random.default_rng(0)

    def sample(x, y, si, stt, note, **kw):
        return Sample({"image_features": x, "text_features": y, "state_image": si, "state_text": stt}, kw,
                      FLOATS, grad_out=np.array(1.5), note=note)

    x, y = embeddings(rng, 5, 8, normalize=True), embeddings(rng, 5, 8, normalize=True)
    cold = _state(rng, 5, "cold", 0.01)
    warm = _state(rng, 5, "warm", 0.01)
    nan_x = x.copy()
    nan_x[3, 2] = np.nan
    stale = warm.copy()
    stale[:, 2] = 2.0 / stale[:, 0] + 120.0  # stored maxima far above any current value: exp underflows in fp32
    return [
        sample(x, y, cold, cold, "first visit (s = b = u = 0)"),
        sample(x[:2], y[:2], warm[:2], warm[:2], "B = 2: one negative per anchor"),
        sample(x, x, cold, cold, "identical views: every positive equals its row's maximum"),
        sample(nan_x, y, warm, warm, "NaN in image 3: row 3 and every text column are NaN"),
        sample(x, y, stale, stale, "stored running maxima above every current value"),
        sample(x, y, warm, warm, "temperatures pushed to the clip", eta=10.0, grad_clip=0.5),
    ]


def _bad_inputs() -> tuple[BadInput, ...]:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    ok = _state(rng, 3, "cold", 0.01)

    def call(x=x, y=y, si=ok, stt=ok, **kw):
        return lambda: ({"image_features": x, "text_features": y, "state_image": si, "state_text": stt}, kw)

    def state_with(col, value):
        bad = ok.copy()
        bad[1, col] = value
        return bad

    return (
        BadInput("batch of one pair (B - 1 = 0)", call(x[:1], y[:1], ok[:1], ok[:1]), ValueError, "image_features"),
        BadInput("empty batch", call(x[:0], y[:0], ok[:0], ok[:0]), ValueError, "image_features"),
        BadInput("1-D image_features", call(x=x[0]), ValueError, "image_features"),
        BadInput("no features (D = 0)", call(x[:, :0], y[:, :0]), ValueError, "image_features"),
        BadInput("text batch differs from the image batch", call(y=y[:2]), ValueError, "text_features"),
        BadInput("text width differs", call(y=y[:, :3]), ValueError, "text_features"),
        BadInput("state_image of shape (B, 3)", call(si=ok[:, :3]), ValueError, "state_image"),
        BadInput("state_text for another batch size", call(stt=ok[:2]), ValueError, "state_text"),
        BadInput("temperature 0", call(si=state_with(0, 0.0)), ValueError, "state_image", data_dependent=True),
        BadInput("negative temperature", call(stt=state_with(0, -0.01)), ValueError, "state_text",
                 data_dependent=True),
        BadInput("infinite temperature", call(si=state_with(0, np.inf)), ValueError, "state_image",
                 data_dependent=True),
        BadInput("NaN temperature", call(stt=state_with(0, np.nan)), ValueError, "state_text", data_dependent=True),
        BadInput("negative moving average s", call(si=state_with(1, -1.0)), ValueError, "state_image",
                 data_dependent=True),
        BadInput("non-finite running max b", call(si=state_with(2, np.inf)), ValueError, "state_image",
                 data_dependent=True),
        BadInput("gamma > 1", call(gamma=1.5), ValueError, "gamma"),
        BadInput("beta_u < 0", call(beta_u=-0.1), ValueError, "beta_u"),
        BadInput("eta < 0", call(eta=-1e-3), ValueError, "eta"),
        BadInput("grad_clip = 0", call(grad_clip=0.0), ValueError, "grad_clip"),
        BadInput("tau_min = 0", call(tau_min=0.0), ValueError, "tau_min"),
        BadInput("tau_max < tau_min", call(tau_min=0.1, tau_max=0.05), ValueError, "tau_max"),
        BadInput("eps < 0", call(eps=-1.0), ValueError, "eps"),
        BadInput("non-finite rho", call(rho=float("inf")), ValueError, "rho"),
    )


def _fd_function(values: dict, kwargs: dict):
    """Finite differences check the surrogate gradient: the loss with the weights w, w' frozen at their
    values for the unperturbed inputs (they are detached in the algorithm)."""
    from twinops.reference.metric.isogclr_loss import _frozen_weight_loss

    return _frozen_weight_loss(**values, **kwargs)


def _batch(sample: Sample) -> int:
    return int(np.shape(sample.arrays["image_features"])[0])


# ---------------------------------------------------------------------------- benchmarks

BENCH_SHAPES = ((16384, 256), (16384, 1024), (65536, 256), (65536, 1024))


def _bench_case(b: int, d: int) -> BenchCase:
    def arrays(rng, b, d):
        x = rng.standard_normal((b, d), dtype=np.float32)
        y = x + 0.5 * rng.standard_normal((b, d), dtype=np.float32)  # matched pairs: positives stand out
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        tau = rng.uniform(0.01, 0.05, (b, 1)).astype(np.float32)
        state = np.concatenate([tau, rng.uniform(0.5, 1.5, (b, 1)), rng.uniform(0.0, 20.0, (b, 1)),
                                rng.uniform(-1, 1, (b, 1))], axis=1).astype(np.float32)
        # States stay float32 (not in float_inputs): they are per-dataset fp32 buffers whatever the features.
        return {"image_features": x, "text_features": y, "state_image": state, "state_text": state.copy()}, {}

    return BenchCase(f"B={b} D={d}", lambda rng: arrays(rng, b, d), ("image_features", "text_features"),
                     smoke=lambda rng: arrays(rng, 20, 24), dtypes=("bfloat16",))


def _backward_chunks(d: int) -> int:
    """Output-feature chunks of the compiled backward (256 features per program; see `_launch`)."""
    return max(1, math.ceil(d / 256))


def _flops(arrays: dict, direction: str) -> float:
    """FLOPs the kernels execute, recomputation included: the forward forms every S tile twice (image
    and text side, 2 B^2 D each); the backward, per side, forms it again once per 256-wide output chunk
    and multiplies P by the features (2 B^2 D)."""
    b, d = np.shape(arrays["image_features"])
    gemm = 2.0 * b * b * d
    fwd = 2 * gemm
    bwd = 2 * (gemm * _backward_chunks(d) + gemm)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Compulsory traffic: the features read once per pass (2 forward, 2 backward, which also write the
    two gradients), the states read and written in fp32, 40 bytes of statistics per pair."""
    b, d = np.shape(arrays["image_features"])
    feats = 2 * b * d * itemsize
    fwd = 2 * feats + b * (2 * 16 + 2 * 16 + 8 + 40)
    bwd = 2 * feats + feats + b * 40 * 2
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction])


# ---------------------------------------------------------------------------- wrong ports


def _shared_temperature(state, kw):
    """One temperature for the whole batch (the mean), as SogCLR with a global tau would use."""
    out = state.clone()
    out[:, 0] = state[:, 0].mean()
    return out


def _forgets_moving_average(state, kw):
    """s and b reset every step: the estimator sees only the current batch."""
    out = state.clone()
    out[:, 1:3] = 0
    return out


def _swapped_states(fn):
    """Image and text states exchanged (a port that anchors each state at the wrong side)."""
    def port(**kw):
        kw = dict(kw, state_image=kw["state_text"], state_text=kw["state_image"])
        loss, new_t, new_i = fn(**kw)
        return loss, new_i, new_t

    return port


ISOGCLR = Spec(
    name="isogclr_loss",
    paper=19,
    family="metric",
    summary="iSogCLR: robust two-way contrastive loss with per-sample learnable temperatures and "
            "moving-average estimators passed in and returned, tiled so no B x B matrix is stored.",
    reference=f"{REF}:isogclr_loss",
    reference_grad=f"{REF}:isogclr_loss_grad",
    accelerated=f"{ACC}:isogclr_loss",
    baseline=f"{BASE}:isogclr_loss",
    samples=_samples,
    examples=_examples,
    grad_inputs=("image_features", "text_features"),
    tolerance=TOLERANCE,
    reduction_length=_batch,
    bad_inputs=_bad_inputs(),
    bench_cases=tuple(_bench_case(b, d) for b, d in BENCH_SHAPES),
    flops=_flops,
    bytes_moved=_bytes,
    fd_function=_fd_function,
    output_dtypes=("input", "float32", "float32"),
    grad_output_index=0,
    properties=(
        "the new states are returned, never written: inputs are left unchanged",
        "the gradient is the algorithm's surrogate gradient (weights detached); no gradient reaches the states",
    ),
    wrong_ports={
        "one shared temperature": wrong_ports.replaces_argument("state_image", _shared_temperature),
        "forgets the moving average": wrong_ports.replaces_argument("state_text", _forgets_moving_average),
        "image and text states swapped": _swapped_states,
    },
)

register(ISOGCLR)
