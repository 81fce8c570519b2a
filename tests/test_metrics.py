"""Losses and metrics against independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gstalker_core.metrics import person_coverage, photometric_loss, psnr, silhouette_interior, ssim, ssim_map


def _pair(seed=0):
    import skimage.data

    rng = np.random.default_rng(seed)
    a = skimage.data.astronaut()[100:164, 150:214].astype(np.float64) / 255
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    return a, b


def test_ssim_matches_scikit_image():
    a, b = _pair()
    ours = ssim(torch.from_numpy(a)[None], torch.from_numpy(b)[None]).item()
    theirs = structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False)
    assert ours == pytest.approx(theirs, abs=2e-3)
    assert ssim(torch.from_numpy(a)[None], torch.from_numpy(a)[None]).item() == pytest.approx(1.0)


def test_ssim_map_sums_the_whole_gaussian_window():
    """The one depthwise call over the five stacked maps gives the 11x11 window's weighted sums:
    against a direct sum over every window offset, in float64, on random images."""
    rng = np.random.default_rng(4)
    a, b = rng.random((2, 2, 19, 23, 3))
    x = np.arange(11) - 5
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    window = np.outer(g, g) / g.sum() ** 2
    height, width = 19 - 10, 23 - 10

    def blur(img):  # (N, H, W, C) -> (N, C, H', W')
        out = sum(window[i, j] * img[:, i:i + height, j:j + width] for i in range(11) for j in range(11))
        return out.transpose(0, 3, 1, 2)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    want = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    got = ssim_map(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-12


@pytest.mark.parametrize("height, width, window", [(10, 40, 9), (8, 9, 7), (6, 6, 5)])
def test_ssim_of_a_box_under_the_window_uses_a_smaller_window(height, width, window):
    """A small face box gets a real SSIM (skimage's with the same, smaller Gaussian window),
    never a stand-in value."""
    a, b = (x[:height, :width] for x in _pair(3))
    ours = ssim(torch.from_numpy(a)[None], torch.from_numpy(b)[None]).item()
    # skimage sizes its Gaussian window from sigma (truncated at 3.5 sigma): this sigma gives ``window``
    theirs = structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True,
                                   sigma=1.5 * window / 11, use_sample_covariance=False)
    assert ours == pytest.approx(theirs, abs=2e-3) and 0.0 < ours < 1.0
    assert ssim(torch.from_numpy(a)[None], torch.from_numpy(a)[None]).item() == pytest.approx(1.0)


def test_psnr_matches_scikit_image():
    a, b = _pair(1)
    assert psnr(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-6)


def test_photometric_loss_is_zero_only_for_equal_images_and_differentiable():
    a, b = _pair(2)
    ta, tb = torch.from_numpy(a)[None], torch.from_numpy(b)[None].requires_grad_()
    assert photometric_loss(ta, ta).item() == pytest.approx(0.0, abs=1e-9)
    loss = photometric_loss(tb, ta)
    loss.backward()
    assert loss.item() > 0 and tb.grad.abs().sum() > 0


def test_person_coverage_counts_only_opaque_person_pixels():
    alpha = torch.tensor([[0.99, 0.98, 0.97, 0.2]]).reshape(1, 4, 1)
    person = torch.tensor([[True, True, True, False]])
    assert person_coverage(alpha, person) == pytest.approx(2 / 3)  # the 0.2 pixel is background
    assert person_coverage(alpha, torch.zeros_like(person)) == 1.0  # no person: nothing to cover


def test_silhouette_interior_leaves_out_the_edge_ring_only():
    person = torch.zeros(7, 8, dtype=torch.bool)
    person[2:7, 1:6] = True  # a body cut by the bottom edge of the frame
    interior = silhouette_interior(person)
    want = torch.zeros_like(person)
    want[3:7, 2:5] = True  # the ring's left, right and top pixels go; the bottom edge is no silhouette
    assert torch.equal(interior, want)
    assert torch.equal(silhouette_interior(person[None])[0], want)  # leading dimensions


def test_best_lag_correlation_finds_a_mouth_that_follows_the_sound():
    """An opening that repeats the loudness two frames later, with faces missing here and there."""
    from gstalker_core.metrics import lipsync

    rng = np.random.default_rng(0)
    energy = np.convolve(rng.normal(size=600), np.ones(5) / 5, mode="same")
    opening = np.roll(energy, 2) + rng.normal(0, 0.05, 600)
    opening[[10, 200, 201, 450]] = np.nan
    r, lag = lipsync.best_lag_correlation(opening, energy)
    assert lag == 2 and r > 0.9
    follows, sound = lipsync.lagged(opening, energy, 2)
    assert len(follows) == 598 - 4 and not np.isnan(follows).any()


def test_correlation_standard_error_grows_with_the_series_memory():
    """Independent frames: about 1/sqrt(n). Series that move slowly (one-second smoothing, as a
    mouth and speech do) hold fewer independent samples, and the block bootstrap says so."""
    from gstalker_core.metrics import lipsync

    rng = np.random.default_rng(1)
    n = 1500
    independent = lipsync.correlation_standard_error(rng.normal(size=n), rng.normal(size=n))
    assert 0.7 / np.sqrt(n) < independent < 1.3 / np.sqrt(n)
    smooth = np.ones(25) / 25
    slow = lipsync.correlation_standard_error(np.convolve(rng.normal(size=n), smooth, mode="same"),
                                              np.convolve(rng.normal(size=n), smooth, mode="same"))
    assert slow > 2 * independent
    assert np.isnan(lipsync.correlation_standard_error(np.arange(10.0), np.arange(10.0)))
