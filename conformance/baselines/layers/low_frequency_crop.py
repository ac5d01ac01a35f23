"""Eager PyTorch low-frequency crop, written the way the EfficientTrain code does it: FFT2, keep the
four low-frequency corners, inverse FFT2, real part, mean-preserving scale (16-bit inputs are
upcast, since ``torch.fft`` does not take them at every size)."""

from __future__ import annotations

import torch


def low_frequency_crop(x, *, band=160):
    bh, bw = (band, band) if isinstance(band, int) else band
    bh, bw = bh // 2, bw // 2
    height, width = x.shape[-2:]
    if x.numel() == 0:  # the MKL FFT rejects empty batches
        return x[..., : 2 * bh, : 2 * bw] * 0
    spectrum = torch.fft.fft2(x.float())
    spectrum = torch.cat([spectrum[..., :bh, :], spectrum[..., height - bh:, :]], dim=-2)
    spectrum = torch.cat([spectrum[..., :bw], spectrum[..., width - bw:]], dim=-1)
    y = torch.fft.ifft2(spectrum).real * (4.0 * bh * bw / (height * width))
    return y.to(x.dtype)
