"""Image losses and quality metrics shared by training and evaluation.

Images are float tensors in [0, 1] shaped (..., H, W, C), the rasteriser's layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_C1, _C2 = 0.01 ** 2, 0.03 ** 2


def ssim_window(height: int, width: int) -> int:
    """The SSIM window side for an image: 11 px, or the largest odd side that fits a smaller
    image (a small face box), so that its SSIM is measured rather than left undefined."""
    side = min(SSIM_WINDOW, height, width)
    return side - 1 + side % 2


def _gaussian_window(channels: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # a smaller window keeps the standard one's shape: sigma shrinks with the side
    sigma = SSIM_SIGMA * size / SSIM_WINDOW
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size)


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5; ``ssim_window``'s
    smaller one, sigma scaled alike, for an image under 11 px a side), shape (N, C, H', W').

    The five blurred maps (a, b, a², b², ab) go through one depthwise convolution: one kernel
    launch each way instead of five, the same sums to the bit, and on the CPU 1.7x faster
    forward and backward for four 256 px frames. (Two 1-D passes of the separable window were
    tried: on an H200 cuDNN ran them as implicit GEMMs with layout transforms, 22 ms of a
    512 px rendering step's device time against 9 for the 11x11 kernels.)"""
    a = a.reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2)
    b = b.reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2)
    channels = a.shape[1]
    window = _gaussian_window(5 * channels, ssim_window(*a.shape[-2:]), a.dtype, a.device)
    stacked = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    # a valid convolution: no padding artefacts
    mu_a, mu_b, a2, b2, ab = F.conv2d(stacked, window, groups=5 * channels).split(channels, dim=1)
    var_a = a2 - mu_a ** 2
    var_b = b2 - mu_b ** 2
    cov = ab - mu_a * mu_b
    return ((2 * mu_a * mu_b + _C1) * (2 * cov + _C2)) / ((mu_a ** 2 + mu_b ** 2 + _C1) * (var_a + var_b + _C2))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM over the batch."""
    return ssim_map(a, b).mean()


def photometric_loss(rendered: torch.Tensor, target: torch.Tensor, ssim_weight: float = 0.2) -> torch.Tensor:
    """The 3DGS loss: (1 - w) L1 + w (1 - SSIM)."""
    return (1 - ssim_weight) * (rendered - target).abs().mean() + ssim_weight * (1 - ssim(rendered, target))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (over the whole batch)."""
    return psnr_of_mse(F.mse_loss(a.float(), b.float()).item())


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error of images in [0, 1]."""
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


# a person pixel at least this opaque in the composite shows (almost) none of the plate
COVERED_ALPHA = 0.98


def person_coverage(alpha: torch.Tensor, person: torch.Tensor) -> float:
    """Share of the person's pixels that a render covers: ``alpha`` (..., H, W, 1) the
    composite's opacity (head over torso, ``Layers.alpha``), ``person`` (..., H, W) bool the
    person mask (head, neck and torso labels). A person pixel under ``COVERED_ALPHA`` shows
    the background plate through the person, as between chin and collar when the head rises
    off the torso. 1.0 when the mask is empty (nothing to cover)."""
    person = person.to(device=alpha.device, dtype=torch.bool)
    total = int(person.sum())
    return int(((alpha[..., 0] >= COVERED_ALPHA) & person).sum()) / total if total else 1.0


def silhouette_interior(person: torch.Tensor) -> torch.Tensor:
    """The person mask (..., H, W) bool less its one-pixel silhouette ring: the pixels whose
    eight neighbours are person too (outside the frame counts as person: a body cut by the
    frame's edge has no silhouette there). A ring pixel mixes person and background in the
    video itself, and the labels' edge falls inside that mix; the coverage inside the ring
    counts holes only (background between chin and collar lies inside), apart from how the
    render draws the person's edge."""
    background = (~person.bool()).float().reshape(-1, 1, *person.shape[-2:])
    return (F.max_pool2d(background, 3, stride=1, padding=1) == 0).reshape(person.shape)
