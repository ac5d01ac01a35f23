r"""Low-frequency crop: keep the centred low-frequency band of an image's 2-D spectrum.

Paper P8 — *EfficientTrain: Exploring Generalized Curriculum Learning for Training Visual Backbones*
(Wang, Yue, Lu, Liu, Zhong, Song, Huang, ICCV 2023).

For an image plane $x \in \mathbb{R}^{H \times W}$ and a band $(B_h, B_w)$ with
$b_h = \lfloor B_h/2 \rfloor$, $b_w = \lfloor B_w/2 \rfloor$, let $X = \mathrm{FFT2}(x)$
(unnormalised, as ``numpy.fft.fft2``). The $2b_h \times 2b_w$ spectrum $Y$ keeps the four
low-frequency corners of $X$ (signed frequencies $-b \le f \le b - 1$ along each axis):

$$
Y[0{:}b_h, 0{:}b_w] = X[0{:}b_h, 0{:}b_w], \quad
Y[-b_h{:}, 0{:}b_w] = X[-b_h{:}, 0{:}b_w], \quad
Y[0{:}b_h, -b_w{:}] = X[0{:}b_h, -b_w{:}], \quad
Y[-b_h{:}, -b_w{:}] = X[-b_h{:}, -b_w{:}],
$$

$$
y = \frac{2b_h \cdot 2b_w}{H W}\, \operatorname{Re}\bigl(\mathrm{IFFT2}(Y)\bigr)
\in \mathbb{R}^{2b_h \times 2b_w}.
$$

The scale keeps the image mean. The operator is real-linear and separable:
$y = \operatorname{Re}(A_H\, x\, A_W^\top)$ with the $2b \times S$ complex matrix
$A_{mn} = \frac{1}{S} \sum_{f=-b}^{b-1} e^{2\pi i f m / 2b}\, e^{-2\pi i f n / S}$, whose imaginary
part is rank one (it comes only from the unpaired frequency $-b$). Its adjoint, the gradient, is the
spectral zero-pad with unit scale:

$$
\frac{\partial L}{\partial x} = \operatorname{Re}\Bigl(\mathrm{IFFT2}_{H \times W}\bigl(
\mathrm{Pad}(\mathrm{FFT2}_{2b_h \times 2b_w}(g))\bigr)\Bigr),
$$

where Pad puts the four $b_h \times b_w$ corner blocks of the small spectrum into the corners of an
$H \times W$ zero array.

Semantics
---------
- ``x``: (N, C, H, W) real. Every (n, c) plane is cropped independently. The output has shape
  (N, C, 2b_h, 2b_w) and the dtype of ``x``. N = 0 or C = 0 gives an empty output.
- ``band``: an int $B$ (square images only, as in the authors' code, which reads the size from the
  last axis) or a pair ``(band_h, band_w)`` for any image. Default 160, the first stages of the
  EfficientTrain schedule at 224 pixels. $b = \lfloor B/2 \rfloor$, so an odd band gives an output
  of size $B - 1$ (as in the authors' code). Requires $2 \le B \le$ the image size along that axis
  (``ValueError`` naming ``band`` otherwise). An even $B = S$ ($2b = S$) is the identity.
- The kept Nyquist row/column (frequency $-b$) has no Hermitian partner, so the complex result is
  not real: the real part is taken, as in the authors' code. This is part of the semantics: the
  $\operatorname{Re}$ of the cross term at $(-b_h, -b_w)$ is what the rank-one correction computes.
- The scale is $(2b_h \cdot 2b_w)/(HW)$, matching the authors' $(2b/S)^2$ for square images
  (the authors' code assumes square images; non-square images are the library's generalisation).
- NaN or $\pm\infty$ anywhere in a plane makes that whole output plane NaN (every output of the
  spectral crop depends on every input of its plane; an infinite input has no finite spectrum).
  Likewise a non-finite upstream gradient makes that whole plane of the input gradient NaN.
- The augmentation schedule of the paper (which band at which epoch) is not part of this operator.
"""

from __future__ import annotations

import numpy as np

from .._checks import as_float_array, check_int

__all__ = ["low_frequency_crop", "low_frequency_crop_grad"]


def _bands(band, height: int, width: int) -> tuple[int, int]:
    """``band`` as a checked pair (band_h, band_w)."""
    if isinstance(band, (tuple, list)):
        if len(band) != 2:
            raise ValueError(f"band must be an int or a pair (band_h, band_w), got {len(band)} entries")
        bh, bw = check_int(band[0], "band[0]"), check_int(band[1], "band[1]")
    else:
        bh = bw = check_int(band, "band")
        if height != width:
            raise ValueError(f"band must be a pair (band_h, band_w) for a non-square image, got an int for "
                             f"H={height}, W={width}")
    for value, size, axis in ((bh, height, "H"), (bw, width, "W")):
        if value < 2:
            raise ValueError(f"band must be >= 2 (at least one frequency each side), got {value}")
        if value > size:
            raise ValueError(f"band must be <= the image size along {axis} ({size}), got {value}")
    return bh, bw


def _prepare(x, band, name="x"):
    x = as_float_array(x, name, 4, "(N, C, H, W)")
    bh, bw = _bands(band, x.shape[2], x.shape[3])
    return x, bh // 2, bw // 2


def _corners(spectrum: np.ndarray, bh: int, bw: int) -> np.ndarray:
    """The 2bh x 2bw low-frequency corners of an (..., H, W) spectrum."""
    rows = np.concatenate([spectrum[..., :bh, :], spectrum[..., spectrum.shape[-2] - bh:, :]], axis=-2)
    return np.concatenate([rows[..., :bw], rows[..., rows.shape[-1] - bw:]], axis=-1)


def _pad(small: np.ndarray, height: int, width: int) -> np.ndarray:
    """The four corner blocks of a (..., 2bh, 2bw) spectrum placed in an (..., H, W) zero spectrum."""
    bh, bw = small.shape[-2] // 2, small.shape[-1] // 2
    out = np.zeros(small.shape[:-2] + (height, width), dtype=complex)
    for rs, rd in ((slice(0, bh), slice(0, bh)), (slice(bh, 2 * bh), slice(height - bh, height))):
        for cs, cd in ((slice(0, bw), slice(0, bw)), (slice(bw, 2 * bw), slice(width - bw, width))):
            out[..., rd, cd] = small[..., rs, cs]
    return out


def _poison(out: np.ndarray, source: np.ndarray) -> np.ndarray:
    """NaN over every plane of ``out`` whose plane in ``source`` holds a non-finite value."""
    bad = ~np.isfinite(source).all(axis=(-2, -1), keepdims=True)
    return np.where(bad, np.nan, out)


def low_frequency_crop(x, *, band=160):
    """Keep the low-frequency ``band`` of each (n, c) plane's spectrum: (N, C, H, W) -> (N, C, 2b_h, 2b_w)."""
    x, bh, bw = _prepare(x, band)
    height, width = x.shape[2:]
    if x.size == 0:
        return np.zeros(x.shape[:2] + (2 * bh, 2 * bw))
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.fft.ifft2(_corners(np.fft.fft2(x), bh, bw)).real * (4.0 * bh * bw / (height * width))
    return _poison(y, x)


def low_frequency_crop_grad(grad, x, *, band=160):
    """Vector-Jacobian product: the spectral zero-pad of ``grad`` (N, C, 2b_h, 2b_w), an (N, C, H, W) array."""
    x, bh, bw = _prepare(x, band)
    grad = np.asarray(grad, dtype=np.float64)
    want = x.shape[:2] + (2 * bh, 2 * bw)
    if grad.shape != want:
        raise ValueError(f"grad must have the output's shape {want}, got {grad.shape}")
    if x.size == 0:
        return np.zeros(x.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        dx = np.fft.ifft2(_pad(np.fft.fft2(grad), *x.shape[2:])).real
    return _poison(dx, grad)
