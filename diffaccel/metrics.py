"""Fidelity and timing helpers shared by the CLI, the benchmarks, the reference training and the tests.

The image metrics are torchmetrics' (PSNR, SSIM, MS-SSIM); this module only fixes the conventions:
images are (N, C, H, W) in [0, data_range], every figure is per image, and identical images score
PSNR = inf, SSIM = MS-SSIM = 1.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

# MS-SSIM's five scales with torchmetrics' weights; small images use the first scales only (each
# scale halves the image, and the 11-pixel window must still fit into the coarsest one)
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW = 11


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over all elements."""
    ref, out = ref.double(), out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def _images(out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if out.shape != ref.shape:
        raise ValueError(f"images to compare differ in shape: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if out.dim() == 3:
        out, ref = out[None], ref[None]
    if out.dim() == 5:  # video: (N, C, F, H, W) or (N, F, C, H, W) -> frames as images
        out, ref = out.flatten(0, 1), ref.flatten(0, 1)
    if out.dim() != 4:
        raise ValueError(f"images must be (C, H, W), (N, C, H, W) or video (N, F, C, H, W); got {tuple(out.shape)}")
    # float32: torchmetrics' SSIM convolutions run ~40x slower in float64 on a CPU, and images are
    # float32 (or narrower) to begin with
    return out.float(), ref.float()


def psnr_per_image(out: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> list[float]:
    """PSNR in dB of each image of `out` against the same image of `ref` (inf where identical)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    out, ref = _images(out, ref)
    values = peak_signal_noise_ratio(out, ref, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return [float(v) for v in values.reshape(-1)]


def psnr(out: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean PSNR in dB over the images (inf when all are identical; an identical image among different
    ones counts as the others' mean would not: it is left out, the mean of the finite ones returned)."""
    values = psnr_per_image(out, ref, data_range)
    finite = [v for v in values if math.isfinite(v)]
    return statistics.mean(finite) if finite else math.inf


def ssim_per_image(out: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> list[float]:
    """SSIM (Gaussian window 11, sigma 1.5) of each image against the same image of `ref`."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    out, ref = _images(out, ref)
    values = structural_similarity_index_measure(out, ref, data_range=data_range, reduction="none")
    return _exact_at_identity(values, out, ref)


def _exact_at_identity(values: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """The values, with 1 exactly for identical images (float32 rounding gives 0.99999994)."""
    same = (out == ref).flatten(1).all(1)
    return [1.0 if s else float(v) for v, s in zip(values.reshape(-1), same)]


def ms_ssim_scales(size: int) -> int:
    """How many of MS-SSIM's five scales an image of side `size` supports (0: too small for one)."""
    scales = 0
    while scales < len(MS_SSIM_BETAS) and size // 2**scales >= WINDOW and size // 2 ** (scales + 1) > 0:
        scales += 1
    # torchmetrics requires the side to exceed (window - 1) * 2^(scales - 1)
    while scales and size <= (WINDOW - 1) * 2 ** (scales - 1):
        scales -= 1
    return scales


def ms_ssim_per_image(out: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> list[float] | None:
    """MS-SSIM of each image (the five scales of Wang et al. 2003 where the image is large enough,
    fewer, with their weights renormalised, where it is not; None below 11 pixels)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    out, ref = _images(out, ref)
    scales = ms_ssim_scales(min(out.shape[-2:]))
    if not scales:
        return None
    betas = MS_SSIM_BETAS[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    values = multiscale_structural_similarity_index_measure(out, ref, data_range=data_range, betas=betas,
                                                            reduction="none", normalize="relu")
    return _exact_at_identity(values, out, ref)


def fidelity(out: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> dict:
    """PSNR (dB), SSIM, MS-SSIM (means over the images) and the relative error of `out` against `ref`."""
    ms = ms_ssim_per_image(out, ref, data_range)
    return {"psnr": psnr(out, ref, data_range), "ssim": statistics.mean(ssim_per_image(out, ref, data_range)),
            "ms_ssim": None if ms is None else statistics.mean(ms), "rel_error": relative_error(out, ref)}


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Median wall time of fn() over `repeats` runs after `warmup` runs, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
