"""Specs of ELECTRA (P35): the fused generator loss + Gumbel-max sampler (``electra_generator_sample``)
and the discriminator's replaced-token-detection loss (``rtd_loss``)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import EMBED_BATCH, EMBED_DIMS, LAYOUTS, seed, upstream_grad

REF = "twinops.reference.classification.electra"
ACC = "twinops.accelerated.classification.electra"
BASE = "twinops.conformance.baselines.classification.electra"

REDUCTIONS = ("mean", "sum", "none")
VOCAB = {
    "ci": (1, 2, 3, 7, 15, 16, 17, 33),
    "dev": (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 65),
    "gpu": (2, 127, 128, 129, 1000, 30522),
}
TEMPERATURES = (0.5, 1.0, 2.0)
LOGIT_SCALES = (0.1, 1.0, 4.0, 12.0)
U_MAX = np.float32(1.0 - 2.0**-24)  # the largest float32 below 1


# ------------------------------------------------------------------------------------ generator

GENERATOR_TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    atol_scales_with_row=True,
    reasons=(
        "atol grows with sqrt(H·max(M, V)·(1 + L)), L the largest |logit|: every logit is an H-term "
        "fp32 dot product with an absolute error ~eps·L·sqrt(H), the loss sums M slots and each "
        "gradient entry sums V (hidden) or M (weight, bias) terms of softmax(h) - onehot, whose "
        "relative error is that of the logits.",
        "atol scales with the largest entry of the output row (the gradient rows of hidden and weight): "
        "an entry is a sum of terms of either sign and keeps their rounding after cancellation.",
        "samples are compared exactly (the allowed error stays below 1 for every shape drawn); the "
        "strategies keep near-ties of the perturbed score away, and exact ties are built from "
        "quantised values that every precision represents.",
        "16-bit outputs also pass when no worse than 2x the eager baseline + atol: the 16-bit kernels "
        "round G = c(softmax - onehot) to the input dtype before the two gradient products, as the "
        "eager backward does.",
    ),
)


def _generator_length(sample: Sample) -> float:
    x = np.asarray(sample.arrays["hidden"], dtype=np.float64)
    w = np.asarray(sample.arrays["weight"], dtype=np.float64)
    m, h = x.shape
    with np.errstate(invalid="ignore", over="ignore"):
        logits = np.abs(x @ w.T) if m else np.zeros(0)
    finite = logits[np.isfinite(logits)]
    largest = float(finite.max()) if finite.size else 0.0
    return h * max(m, w.shape[0], 1) * (1.0 + largest)


def _slot_weights(rng, m: int, mode: str) -> np.ndarray:
    if mode == "ones":
        return np.ones(m, np.float32)
    if mode == "zeros":
        return np.zeros(m, np.float32)
    return (rng.random(m) < 0.7).astype(np.float32)


@st.composite
def _generator_samples(draw, profile: str, dtype: str):
    """Logits of scale ~``scale`` (x of norm ~sqrt(scale), W rows of norm ~sqrt(scale)); ``quantised``
    inputs are multiples of 1/2 with duplicated vocabulary rows and noise columns, so scores tie exactly."""
    rng = seed(draw)
    m = draw(st.sampled_from(EMBED_BATCH[profile]))
    h = draw(st.sampled_from(EMBED_DIMS[profile]))
    v = draw(st.sampled_from(VOCAB[profile]))
    mode = draw(st.sampled_from(("gaussian", "gaussian", "gaussian", "quantised")))
    scale = draw(st.sampled_from(LOGIT_SCALES))
    noise = rng.random((m, v), dtype=np.float32)
    if mode == "quantised":
        x = rng.integers(-2, 3, size=(m, h)) * 0.5
        w = rng.integers(-2, 3, size=(v, h)) * 0.5 / max(1.0, np.sqrt(h) / 2)
        w = np.round(w * 4) / 4
        b = rng.integers(-2, 3, size=v) * 0.5
        if v > 2:
            dup = rng.integers(0, v, size=2)
            w[dup[1]], b[dup[1]], noise[:, dup[1]] = w[dup[0]], b[dup[0]], noise[:, dup[0]]
    else:
        x = rng.normal(size=(m, h)) * np.sqrt(scale)
        w = rng.normal(size=(v, h)) * np.sqrt(scale / h)
        b = rng.normal(size=v) * 0.5 * scale
    target = rng.integers(0, v, size=m).astype(np.int64)
    weights = _slot_weights(rng, m, draw(st.sampled_from(("ones", "some", "some", "zeros"))))
    reduction = draw(st.sampled_from(REDUCTIONS))
    kwargs = {
        "temperature": draw(st.sampled_from(TEMPERATURES) | st.floats(0.1, 4.0)),
        "disallow_correct": draw(st.booleans()),
        "reduction": reduction,
    }
    layouts = {"hidden": draw(st.sampled_from(LAYOUTS)), "weight": draw(st.sampled_from(LAYOUTS))}
    if draw(st.booleans()):
        layouts["noise"] = "transposed"
    if draw(st.booleans()):
        layouts["target"] = "strided"
    return Sample(
        arrays={"hidden": x, "weight": w, "bias": b, "target": target, "slot_weight": weights, "noise": noise},
        kwargs=kwargs,
        float_inputs=("hidden", "weight", "bias"),
        layouts=layouts,
        grad_out=upstream_grad(rng, (m,) if reduction == "none" else ()),
        note=f"{mode}, scale={scale:g}, weights={int(weights.sum())}/{m}",
    )


def _generator_examples() -> list[Sample]:
    rng = np.random.default_rng(0)
    m, h, v = 5, 6, 9
    x = rng.normal(size=(m, h))
    w = rng.normal(size=(v, h)) / np.sqrt(h)
    b = rng.normal(size=v) * 0.5
    t = rng.integers(0, v, size=m)
    u = rng.random((m, v), dtype=np.float32)
    ones = np.ones(m, np.float32)
    some = np.array([1, 0, 1, 1, 0], np.float32)
    nan_x = x.copy()
    nan_x[1, 2] = np.nan
    u_ends = u.copy()
    u_ends[:, :3] = 0.0
    u_ends[:, 3:5] = U_MAX
    confident = np.zeros((m, h))
    confident[:, 0] = 1.0
    w_conf = np.zeros((v, h))
    w_conf[t, 0] = 30.0  # the target is the argmax by a margin of 30: disallow_correct must move the sample
    quant_w = np.zeros((v, h))
    quant_w[:, 0] = [1, 0.5, 1, 0, 1, 0.5, 1, 1, 0.25]  # columns 0, 2, 4, 6, 7 tie on the logit ...
    quant_u = np.tile(np.float32(0.5), (m, v))  # ... and on the noise: the sample is 0
    quant_x = np.ones((m, h))
    cases = (
        (x, w, b, t, ones, u, {}, "plain"),
        (x, w, b, t, some, u, {"temperature": 0.3}, "padding slots, T = 0.3"),
        (x, w, b, t, np.zeros(m, np.float32), u, {}, "every slot is padding: loss 0"),
        (nan_x, w, b, t, ones, u, {}, "NaN in a weighted slot's hidden state: sample -1, NaN gradients"),
        (nan_x, w, b, t, some, u, {}, "NaN in a padding slot's hidden state: no effect on the loss"),
        (x, w, b, t, ones, u_ends, {}, "noise at 0 and at the largest float32 below 1"),
        (confident, w_conf, np.zeros(v), t, ones, u, {"disallow_correct": True}, "disallow_correct"),
        (confident, w_conf, np.zeros(v), t, ones, u, {}, "confident generator: p_target ~ 1"),
        (quant_x, quant_w, np.zeros(v), t, ones, quant_u, {}, "exact ties: lowest index"),
        (x[:, :1], w[:1, :1], b[:1], np.zeros(m, np.int64), ones, u[:, :1], {}, "one-token vocabulary"),
        (x[:0], w, b, t[:0], ones[:0], u[:0], {}, "no slots (M = 0): loss 0"),
        (x[:1], w, b, t[:1], ones[:1], u[:1], {}, "one slot"),
    )
    out = []
    for k, (xx, ww, bb, tt, sw, uu, kw, note) in enumerate(cases):
        reduction = REDUCTIONS[k % 3]
        out.append(Sample(
            {"hidden": xx, "weight": ww, "bias": bb, "target": np.asarray(tt, np.int64), "slot_weight": sw,
             "noise": uu},
            {"reduction": reduction, **kw}, ("hidden", "weight", "bias"),
            grad_out=upstream_grad(rng, (len(tt),) if reduction == "none" else ()), note=note,
        ))
    return out


def _gen_bad(description, error, match, data_dependent=False, **change) -> BadInput:
    def make(change=dict(change)):
        change = dict(change)
        arrays = {"hidden": np.zeros((2, 3)), "weight": np.zeros((4, 3)), "bias": np.zeros(4),
                  "target": np.array([0, 3]), "slot_weight": np.ones(2, np.float32),
                  "noise": np.full((2, 4), 0.5, np.float32)}
        kwargs = {k: change.pop(k) for k in ("temperature", "disallow_correct", "reduction") if k in change}
        arrays.update(change)
        return arrays, kwargs

    return BadInput(description, make, error, match, data_dependent=data_dependent)


def _gen_bad_inputs():
    return (
        _gen_bad("token id >= V", ValueError, "target", True, target=np.array([0, 4])),
        _gen_bad("negative token id", ValueError, "target", True, target=np.array([-1, 0])),
        _gen_bad("noise = 1", ValueError, "noise", True, noise=np.array([[0.5, 1.0, 0.5, 0.5]] * 2, np.float32)),
        _gen_bad("negative noise", ValueError, "noise", True, noise=np.full((2, 4), -0.25, np.float32)),
        _gen_bad("NaN noise", ValueError, "noise", True, noise=np.full((2, 4), np.nan, np.float32)),
        _gen_bad("1-D hidden", ValueError, "hidden", hidden=np.zeros(3)),
        _gen_bad("no hidden features (H = 0)", ValueError, "hidden", hidden=np.zeros((2, 0)),
                 weight=np.zeros((4, 0))),
        _gen_bad("weight's H differs from hidden's", ValueError, "weight", weight=np.zeros((4, 5))),
        _gen_bad("empty vocabulary (V = 0)", ValueError, "weight", weight=np.zeros((0, 3)), bias=np.zeros(0),
                 noise=np.zeros((2, 0), np.float32)),
        _gen_bad("bias of the wrong length", ValueError, "bias", bias=np.zeros(5)),
        _gen_bad("float token ids", TypeError, "target", target=np.array([0.0, 1.0])),
        _gen_bad("target length differs from M", ValueError, "target", target=np.array([0, 1, 2])),
        _gen_bad("slot_weight length differs from M", ValueError, "slot_weight", slot_weight=np.ones(3, np.float32)),
        _gen_bad("noise of the wrong shape", ValueError, "noise", noise=np.full((2, 3), 0.5, np.float32)),
        _gen_bad("temperature = 0", ValueError, "temperature", temperature=0.0),
        _gen_bad("temperature = nan", ValueError, "temperature", temperature=float("nan")),
        _gen_bad("disallow_correct not a bool", TypeError, "disallow_correct", disallow_correct=1.5),
        _gen_bad("unknown reduction", ValueError, "reduction", reduction="avg"),
    )


def _generator_bench(m: int, h: int, v: int, dtypes) -> BenchCase:
    def inputs(m, h, v):
        def make(rng):
            return {
                "hidden": rng.standard_normal((m, h), dtype=np.float32),
                "weight": rng.standard_normal((v, h), dtype=np.float32) * np.float32(0.05),
                "bias": np.zeros(v, np.float32),
                "target": rng.integers(0, v, m),
                "slot_weight": (rng.random(m) < 0.95).astype(np.float32),
                "noise": rng.random((m, v), dtype=np.float32),
            }, {}

        return make

    return BenchCase(f"M{m}xH{h}xV{v}", inputs(m, h, v), ("hidden", "weight", "bias"),
                     smoke=inputs(4, 16, 40), dtypes=dtypes)


def _generator_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Compulsory traffic: the forward reads x, W, b once and the fp32 noise (M, V) once; the backward
    reads x, W, b in each of its two kernels, writes the three gradients, and read-modify-writes the
    fp32 (M, H) and (V, H) accumulators once (a lower bound: they are revisited per tile, in L2)."""
    m, h = np.shape(arrays["hidden"])
    v = np.shape(arrays["weight"])[0]
    params = (m * h + v * h + v) * itemsize
    fwd = params + 4.0 * m * v + 24 * m
    bwd = 2 * params + params + 8.0 * (m + v) * h + 16 * m
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction])


def _generator_flops(arrays: dict, direction: str) -> float:
    """FLOPs the fused kernels execute: forward 2MVH (the logits); backward 8MVH, the logits recomputed
    in each of the two gradient kernels (2 x 2MVH) plus G W and Gᵀ x (2 x 2MVH). The eager baseline
    executes 6MVH (no recompute) but moves the (M, V) logits and their gradient through memory."""
    m, h = np.shape(arrays["hidden"])
    v = np.shape(arrays["weight"])[0]
    mvh = 2.0 * m * v * h
    return {"fwd": mvh, "bwd": 4 * mvh, "fwd+bwd": 5 * mvh}[direction]


def _sampler_with(**fixed):
    """A port whose sampler ignores one hyper-parameter (calls with it fixed)."""

    def wrap(fn):
        return lambda **kw: fn(**{**kw, **fixed})

    return wrap


def _last_tie_wins(fn):
    """Ties resolved to the highest index: a port that scans with >= instead of >."""

    def port(**kw):
        import torch

        loss, samples = fn(**kw)
        h = torch.nn.functional.linear(kw["hidden"].double(), kw["weight"].double(),
                                       None if kw.get("bias") is None else kw["bias"].double())
        u = kw["noise"].double()
        score = h / kw.get("temperature", 1.0) - torch.log(-torch.log(u + 1e-9) + 1e-9)
        if kw.get("disallow_correct", False):
            score = score - 1000.0 * torch.nn.functional.one_hot(kw["target"].long(), h.shape[1])
        last = h.shape[1] - 1 - torch.flip(score, dims=[1]).argmax(dim=1)
        return loss, torch.where(samples >= 0, last, samples)

    return port


GENERATOR = Spec(
    name="electra_generator_sample",
    paper=35,
    family="classification",
    summary="ELECTRA generator: LM head + MLM cross-entropy + Gumbel-max replacement sampling, fused "
            "so the (M, V) logits are never stored.",
    reference=f"{REF}:electra_generator_sample",
    reference_grad=f"{REF}:electra_generator_sample_grad",
    accelerated=f"{ACC}:electra_generator_sample",
    baseline=f"{BASE}:electra_generator_sample",
    samples=_generator_samples,
    grad_inputs=("hidden", "weight", "bias"),
    tolerance=GENERATOR_TOLERANCE,
    reduction_length=_generator_length,
    bad_inputs=_gen_bad_inputs(),
    examples=_generator_examples,
    bench_cases=(_generator_bench(8192, 768, 30522, ("bfloat16", "float32")),
                 _generator_bench(8192, 768, 128256, ("bfloat16",))),
    bytes_moved=_generator_bytes,
    flops=_generator_flops,
    output_dtypes=("input", "int64"),
    grad_output_index=0,
    properties=(
        "samples are int64 and match the reference exactly (lowest index on ties; -1 for NaN scores)",
        "the loss does not depend on temperature; slots of weight 0 contribute 0 and gradient 0",
        "the (M, V) logits are never stored: extra memory O(M + (M + V) H)",
    ),
    wrong_ports={
        "sampler ignores temperature": _sampler_with(temperature=1.0),
        "sampler ignores disallow_correct": _sampler_with(disallow_correct=False),
        "padding slots counted": wrong_ports.replaces_argument("slot_weight", lambda w, kw: w * 0 + 1),
        "mean over all slots": wrong_ports.mean_over_all_rows,
        "ties to the highest index": _last_tie_wins,
    },
)


# ---------------------------------------------------------------------------------------- rtd_loss

RTD_TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    reasons=("atol grows with sqrt(B·L): the mean and sum add B·L fp32 terms.",
             "16-bit outputs also pass when no worse than 2x the eager baseline + atol."),
)
RTD_SCALES = (0.1, 1.0, 4.0, 30.0)


@st.composite
def _rtd_samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    b = draw(st.sampled_from(EMBED_BATCH[profile]))
    length = draw(st.sampled_from(EMBED_DIMS[profile] + (33, 65)))
    scale = draw(st.sampled_from(RTD_SCALES + ((1e3,) if dtype == "float32" else ())))
    z = rng.normal(size=(b, length)) * scale
    y = (rng.random((b, length)) < 0.15).astype(np.int64)
    if draw(st.booleans()):
        y = y.astype(bool)
    mode = draw(st.sampled_from(("ones", "padded", "padded", "weights", "zeros")))
    if mode == "ones":
        a = np.ones((b, length), np.int64)
    elif mode == "zeros":
        a = np.zeros((b, length), np.int64)
    elif mode == "weights":
        a = (rng.uniform(0.0, 2.0, (b, length)) * (rng.random((b, length)) < 0.8)).astype(np.float32)
    else:  # right padding, as a tokenizer produces
        lengths = rng.integers(0, length + 1, size=b)
        a = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
        if draw(st.booleans()):
            a = a.astype(bool)
    reduction = draw(st.sampled_from(REDUCTIONS))
    layouts = {"logits": draw(st.sampled_from(LAYOUTS))}
    if draw(st.booleans()):
        layouts["labels"] = draw(st.sampled_from(("transposed", "strided")))
    if draw(st.booleans()):
        layouts["attention_mask"] = "strided"
    return Sample(
        arrays={"logits": z, "labels": y, "attention_mask": a},
        kwargs={"reduction": reduction},
        float_inputs=("logits",),
        layouts=layouts,
        grad_out=upstream_grad(rng, (b, length) if reduction == "none" else ()),
        note=f"scale={scale:g}, mask={mode}",
    )


def _rtd_examples() -> list[Sample]:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 6))
    y = np.array([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]])
    a = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    nan_pad, nan_real, infs = z.copy(), z.copy(), z.copy()
    nan_pad[1, 4] = np.nan
    nan_real[0, 2] = np.nan
    infs[0, :4] = [np.inf, -np.inf, -np.inf, np.inf]  # labels 0, 1, 0, 0: inf, inf, 0, inf
    infs[2, 2:4] = [np.inf, -np.inf]  # labels 1, 1: 0, inf
    cases = (
        (z, y, a, "padded batch"),
        (z, y, np.zeros_like(a), "all tokens masked: loss 0"),
        (nan_pad, y, a, "NaN logit at a padding position: no effect"),
        (nan_real, y, a, "NaN logit at a real token"),
        (infs, y, a, "infinite logits: 0 when right, inf when wrong"),
        (z * 40.0, y, a, "saturated logits"),
        (z[:1, :1], y[:1, :1], a[:1, :1], "one token"),
        (z[:0], y[:0], a[:0], "empty batch: loss 0"),
        (z, y.astype(bool), a.astype(bool), "bool labels and mask"),
    )
    out = []
    for k, (zz, yy, aa, note) in enumerate(cases):
        reduction = REDUCTIONS[k % 3]
        out.append(Sample({"logits": zz, "labels": yy, "attention_mask": aa}, {"reduction": reduction},
                          ("logits",), grad_out=upstream_grad(rng, zz.shape if reduction == "none" else ()),
                          note=note))
    return out


def _rtd_bad(description, error, match, data_dependent=False, **change) -> BadInput:
    def make(change=dict(change)):
        change = dict(change)
        arrays = {"logits": np.zeros((2, 3)), "labels": np.array([[0, 1, 0], [1, 0, 0]]),
                  "attention_mask": np.ones((2, 3), np.int64)}
        kwargs = {"reduction": change.pop("reduction")} if "reduction" in change else {}
        arrays.update(change)
        return arrays, kwargs

    return BadInput(description, make, error, match, data_dependent=data_dependent)


RTD_BAD_INPUTS = (
    _rtd_bad("label 2", ValueError, "labels", True, labels=np.array([[0, 2, 0], [1, 0, 0]])),
    _rtd_bad("label -1", ValueError, "labels", True, labels=np.array([[0, -1, 0], [1, 0, 0]])),
    _rtd_bad("float labels", TypeError, "labels", labels=np.zeros((2, 3))),
    _rtd_bad("labels of another shape", ValueError, "labels", labels=np.zeros((2, 4), np.int64)),
    _rtd_bad("attention_mask of another shape", ValueError, "attention_mask",
             attention_mask=np.ones((3, 3), np.int64)),
    _rtd_bad("1-D logits", ValueError, "logits", logits=np.zeros(3), labels=np.zeros(3, np.int64),
             attention_mask=np.ones(3, np.int64)),
    _rtd_bad("unknown reduction", ValueError, "reduction", reduction="avg"),
)


def _rtd_bench(b: int, length: int) -> BenchCase:
    def inputs(b, length):
        def make(rng):
            lengths = rng.integers(length // 2, length + 1, size=b)
            return {
                "logits": rng.standard_normal((b, length), dtype=np.float32),
                "labels": (rng.random((b, length)) < 0.15).astype(np.int64),
                "attention_mask": (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64),
            }, {}

        return make

    return BenchCase(f"B{b}xL{length}", inputs(b, length), ("logits",), smoke=inputs(4, 40))


def _rtd_bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads logits, labels and mask and writes the fp32 terms; the backward reads the three
    inputs (the broadcast upstream gradient is free) and writes the gradient."""
    n = np.size(arrays["logits"])
    flags = np.asarray(arrays["labels"]).itemsize + np.asarray(arrays["attention_mask"]).itemsize
    fwd = n * (itemsize + flags + 4)
    bwd = n * (2 * itemsize + flags)
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction])


def _clear_mask(mask, kw):
    import torch

    return torch.ones_like(mask)


RTD = Spec(
    name="rtd_loss",
    paper=35,
    family="classification",
    summary="ELECTRA's replaced-token-detection loss: masked binary cross-entropy, a global token mean.",
    reference=f"{REF}:rtd_loss",
    reference_grad=f"{REF}:rtd_loss_grad",
    accelerated=f"{ACC}:rtd_loss",
    baseline=f"{BASE}:rtd_loss",
    samples=_rtd_samples,
    grad_inputs=("logits",),
    tolerance=RTD_TOLERANCE,
    reduction_length=lambda sample: int(np.size(sample.arrays["logits"])),
    bad_inputs=RTD_BAD_INPUTS,
    examples=_rtd_examples,
    bench_cases=(_rtd_bench(256, 512),),
    bytes_moved=_rtd_bytes,
    properties=("masked tokens contribute 0 and gradient 0, even with NaN logits",
                "'mean' is the global token mean sum(a·bce) / (sum(a) + 1e-6), 0 for an all-masked batch"),
    wrong_ports={
        "ignores the attention mask": wrong_ports.replaces_argument("attention_mask", _clear_mask),
        "mean over all tokens": wrong_ports.mean_over_all_rows,
    },
)

register(GENERATOR)
register(RTD)
