"""Spec of the DDS surrogate loss (P3, ED-NeRF, ``dds_loss``)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ... import wrong_ports
from ...registry import register
from ...spec import BadInput, BenchCase, Sample, Spec, Tolerance
from ...strategies import seed, upstream_grad

REF = "twinops.reference.classification.dds_loss"
ACC = "twinops.accelerated.classification.dds_loss"
BASE = "twinops.conformance.baselines.classification.dds_loss"

NOISE = ("eps_src_uncond", "eps_src_cond", "eps_tgt_uncond", "eps_tgt_cond")
REDUCTIONS = ("sum", "mean", "none")
# (heights, widths): planes of up to 17 x 4 pixels cross the 16-pixel blocks of the interpreter
SIZES = {"ci": ((1, 2, 5, 17), (1, 3, 4)), "dev": ((1, 2, 3, 5, 8, 16, 17), (1, 2, 4, 5, 8)),
         "gpu": ((1, 7, 16, 33, 64, 96), (1, 7, 16, 33, 64, 96))}

TOLERANCE = Tolerance(
    rtol={"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2},
    atol={"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-4},
    reasons=(
        "atol grows with sqrt(B·C·h·w) (1 + S), S = max|z_tgt| · max|weight · mask| · (1 + 2|w|) · max|eps|: "
        "the loss sums B·C·h·w products z · g whose signs vary, and g = weight · mask · (eps_tgt_hat - "
        "eps_src_hat) is a difference of guided predictions of size (1 + 2|w|) max|eps| that nearly cancel "
        "when the prompts agree, keeping their fp32 rounding.",
    ),
)


def _noise(rng, shape, mode):
    """The UNet's four predictions: ``close`` prompts give nearly equal source and target predictions."""
    base = rng.normal(size=shape)
    su = base + 0.1 * rng.normal(size=shape)
    tu = base + 0.1 * rng.normal(size=shape)
    spread = 0.01 if mode == "close" else 0.3
    return {"eps_src_uncond": su, "eps_src_cond": su + spread * rng.normal(size=shape),
            "eps_tgt_uncond": tu, "eps_tgt_cond": tu + spread * rng.normal(size=shape)}


@st.composite
def _samples(draw, profile: str, dtype: str):
    rng = seed(draw)
    b = draw(st.sampled_from((1, 2) if profile == "ci" else (1, 2, 3)))
    c = draw(st.sampled_from((1, 4) if profile == "ci" else (1, 3, 4)))  # 4: Stable Diffusion's latents
    h, w = draw(st.sampled_from(SIZES[profile][0])), draw(st.sampled_from(SIZES[profile][1]))
    shape = (b, c, h, w)
    z_scale = draw(st.sampled_from((0.18, 1.0, 4.0)))
    arrays = {"z_tgt": rng.normal(size=shape) * z_scale,
              **_noise(rng, shape, draw(st.sampled_from(("close", "different"))))}
    float_inputs = ["z_tgt", *NOISE]
    mask_kind = draw(st.sampled_from(("none", "none", "binary (B, 1, h, w)", "soft (h, w)", "soft full", "bool")))
    if mask_kind == "binary (B, 1, h, w)":
        arrays["mask"] = (rng.random((b, 1, h, w)) < 0.6).astype(np.float64)
    elif mask_kind == "soft (h, w)":
        arrays["mask"] = rng.uniform(0.0, 1.0, (h, w))
    elif mask_kind == "soft full":
        arrays["mask"] = rng.uniform(0.0, 1.0, shape)
    elif mask_kind == "bool":
        arrays["mask"] = rng.random((1, c, h, w)) < 0.5  # passed as a bool tensor
    if mask_kind not in ("none", "bool"):
        float_inputs.append("mask")
    if draw(st.booleans()):
        arrays["weight"] = rng.uniform(0.1, 2.0, b)
        float_inputs.append("weight")
    reduction = draw(st.sampled_from(REDUCTIONS))
    layouts = {name: draw(st.sampled_from(("strided", "row_strided"))) for name in ["z_tgt", *NOISE]
               if draw(st.booleans())}
    return Sample(
        arrays=arrays,
        kwargs={"guidance_scale": draw(st.sampled_from((7.5, 7.5, 0.0, 1.0, 100.0)) | st.floats(-2.0, 20.0)),
                "reduction": reduction},
        float_inputs=tuple(float_inputs), layouts=layouts,
        grad_out=upstream_grad(rng, (b,) if reduction == "none" else ()),
        note=f"mask {mask_kind}, z scale {z_scale:g}",
    )


def _examples() -> list[Sample]:
    rng = np.random.default_rng(0)
    shape = (2, 4, 3, 5)
    z = rng.normal(size=shape)
    noise = _noise(rng, shape, "different")
    nan_z, inf_z = z.copy(), z.copy()
    nan_z[0, 1, 2, 3], inf_z[1, 0, 0, 0] = np.nan, np.inf
    same = {"eps_src_uncond": noise["eps_tgt_uncond"], "eps_src_cond": noise["eps_tgt_cond"]}
    one = {k: v[:1, :1, :1, :1] for k, v in {"z_tgt": z, **noise}.items()}
    cases = (
        ({"z_tgt": z, **noise}, {}, "defaults"),
        ({"z_tgt": z, **noise, **same}, {}, "identical source and target predictions: loss 0, gradient 0"),
        ({"z_tgt": z, **noise}, {"guidance_scale": 0.0}, "guidance 0: unconditional predictions only"),
        ({"z_tgt": z, **noise, "mask": np.zeros(shape)}, {}, "all-zero mask: loss 0, gradient 0"),
        ({"z_tgt": z, **noise, "mask": np.array([[1.0, 0.0, 1.0, 0.0, 1.0]])}, {}, "mask (1, w) broadcast over B, C, h"),
        (one, {}, "one element (1, 1, 1, 1)"),
        ({"z_tgt": nan_z, **noise}, {}, "NaN in z_tgt: NaN loss, finite gradient"),
        ({"z_tgt": inf_z, **noise}, {}, "+inf in z_tgt"),
        ({"z_tgt": z, **noise, "weight": np.array([0.0, 2.0])}, {}, "per-sample weight 0 and 2"),
    )
    out = []
    for i, (arrays, kwargs, note) in enumerate(cases):
        reduction = REDUCTIONS[i % 3]
        b = len(arrays["z_tgt"])
        out.append(Sample(arrays, {"guidance_scale": 7.5, **kwargs, "reduction": reduction}, tuple(arrays),
                          grad_out=upstream_grad(rng, (b,) if reduction == "none" else ()), note=note))
    return out


def _length(sample: Sample) -> float:
    a = sample.arrays
    z = np.asarray(a["z_tgt"], dtype=np.float64)
    finite_max = lambda x: float(np.max(np.abs(np.where(np.isfinite(x), x, 0.0)), initial=0.0))
    eps = max(finite_max(np.asarray(a[k], dtype=np.float64)) for k in NOISE)
    scale = 1.0
    for k in ("mask", "weight"):
        if k in a:
            scale *= max(1.0, finite_max(np.asarray(a[k], dtype=np.float64)))
    s = max(1.0, finite_max(z)) * scale * (1 + 2 * abs(sample.kwargs.get("guidance_scale", 7.5))) * eps
    return z.size * (1.0 + s) ** 2


def _bad(description, error, match, data_dependent=False, **change) -> BadInput:
    def make():
        rng = np.random.default_rng(2)
        shape = (2, 3, 4, 4)
        arrays = {"z_tgt": rng.normal(size=shape), **_noise(rng, shape, "different")}
        kwargs = {}
        for key, value in change.items():
            if callable(value):
                arrays[key] = value(arrays[key])
            elif key in ("z_tgt", "mask", "weight", *NOISE):
                arrays[key] = value
            else:
                kwargs[key] = value
        return arrays, kwargs

    return BadInput(description, make, error, match, data_dependent=data_dependent)


def _poke(value):
    def change(x):
        x = x.copy()
        x[1, 2, 3, 0] = value
        return x

    return change


BAD_INPUTS = (
    _bad("eps_src_cond shape differs from z_tgt", ValueError, "eps_src_cond", eps_src_cond=np.zeros((2, 3, 4, 5))),
    _bad("eps_tgt_uncond 3-D", ValueError, "eps_tgt_uncond", eps_tgt_uncond=np.zeros((3, 4, 4))),
    _bad("z_tgt 3-D (one latent without the batch axis)", ValueError, "z_tgt", z_tgt=np.zeros((3, 4, 4))),
    _bad("empty latent (h = 0)", ValueError, "z_tgt", z_tgt=np.zeros((2, 3, 0, 4)),
         **{k: np.zeros((2, 3, 0, 4)) for k in NOISE}),
    _bad("boolean z_tgt", TypeError, "z_tgt", z_tgt=np.zeros((2, 3, 4, 4), dtype=bool)),
    _bad("mask that does not broadcast", ValueError, "mask", mask=np.ones((2, 3, 4, 5))),
    _bad("weight of the wrong length", ValueError, "weight", weight=np.ones(3)),
    _bad("guidance_scale = nan", ValueError, "guidance_scale", guidance_scale=float("nan")),
    _bad("guidance_scale given as a string", TypeError, "guidance_scale", guidance_scale="7.5"),
    _bad("unknown reduction", ValueError, "reduction", reduction="avg"),
    _bad("NaN in eps_tgt_cond", ValueError, "eps_tgt_cond", data_dependent=True, eps_tgt_cond=_poke(np.nan)),
    _bad("inf in eps_src_uncond", ValueError, "eps_src_uncond", data_dependent=True,
         eps_src_uncond=_poke(np.inf)),
)


def _bench(b: int, c: int, h: int, w: int) -> BenchCase:
    def make_inputs(shape):
        def make(rng):
            arrays = {"z_tgt": rng.standard_normal(shape, dtype=np.float32)}
            arrays.update({k: v.astype(np.float32) for k, v in _noise(rng, shape, "different").items()})
            return arrays, {}

        return make

    return BenchCase(f"B{b}xC{c}x{h}x{w} (SD latents of 512x512 renders; launch-bound)", make_inputs((b, c, h, w)),
                     ("z_tgt", *NOISE), smoke=make_inputs((1, 2, 5, 4)))


def _bytes(arrays: dict, itemsize: int, direction: str) -> float:
    """Forward reads z_tgt and the four predictions; backward reads the predictions and writes d/d z_tgt."""
    n = np.asarray(arrays["z_tgt"]).size
    return float({"fwd": 5, "bwd": 5, "fwd+bwd": 10}[direction] * n * itemsize)


def _mean_over_channels(fn):
    """A port that also averages over the channels (``(z * g).mean(dim=(1, 2, 3))``), not just h·w."""

    def port(*, z_tgt, **kw):
        out = fn(z_tgt=z_tgt, **kw)
        return (out.float() / z_tgt.shape[1]).to(out.dtype)

    return port


DDS = Spec(
    name="dds_loss",
    paper=3,
    family="classification",
    summary="Delta denoising score surrogate sum(z_tgt * sg(g)) / (h w) for ED-NeRF's latent editing: "
            "classifier-free guidance, mask and per-sample weight fused into one elementwise pass each way.",
    reference=f"{REF}:dds_loss",
    reference_grad=f"{REF}:dds_loss_grad",
    accelerated=f"{ACC}:dds_loss",
    baseline=f"{BASE}:dds_loss",
    samples=_samples,
    examples=_examples,
    grad_inputs=("z_tgt",),
    tolerance=TOLERANCE,
    reduction_length=_length,
    bad_inputs=BAD_INPUTS,
    bench_cases=(_bench(4, 4, 64, 64),),
    bytes_moved=_bytes,
    properties=("the gradient in z_tgt is exactly the DDS direction g / (h w), whatever z_tgt holds",),
    wrong_ports={
        "mean over channels too": _mean_over_channels,
        "no guidance on the source prediction": wrong_ports.replaces_argument(
            "eps_src_uncond", lambda e, kw: kw["eps_src_cond"]),
        "mask ignored": wrong_ports.replaces_argument("mask", lambda m, kw: None),
    },
)

register(DDS)
