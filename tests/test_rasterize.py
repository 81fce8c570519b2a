"""The PyTorch reference rasteriser against a brute-force per-pixel evaluation, autograd, invariances."""

from __future__ import annotations

import math

import pytest
import torch

from gstalker_core.render.rasterize import (ALPHA_THRESHOLD, MAX_ALPHA, MIN_TRANSMITTANCE, project, quat_to_rotmat,
                                            rasterization, sh_colors)
from tests.fixtures.scenes import random_scene

W = H = 24


def _scene(n=12, seed=0, dtype=torch.float64):
    return random_scene(n, seed, dtype)


def _camera(dtype=torch.float64):
    f = 0.5 * W / math.tan(math.radians(25))
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=dtype)
    return torch.eye(4, dtype=dtype)[None], K[None]


def brute_force(means, quats, scales, opacities, colors, viewmat, K, background=None):
    """Every valid Gaussian at every pixel centre, in depth order, with gsplat's cut-offs."""
    R = quat_to_rotmat(quats)
    covars = (R * scales[:, None]) @ (R * scales[:, None]).transpose(-1, -2)
    means2d, conics, depths, radii, opac, valid = project(means, covars, opacities, viewmat, K, W, H, 0.3, 0.01, 1e10,
                                                          False)
    image = torch.zeros(H, W, 3, dtype=means.dtype)
    alpha_img = torch.zeros(H, W, 1, dtype=means.dtype)
    order = [int(i) for i in torch.argsort(depths) if valid[i]]
    for y in range(H):
        for x in range(W):
            T = 1.0
            for i in order:
                dx, dy = means2d[i, 0] - (x + 0.5), means2d[i, 1] - (y + 0.5)
                a, b, c = conics[i]
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                alpha = min(MAX_ALPHA, float(opac[i] * torch.exp(-sigma)))
                if sigma < 0 or alpha < ALPHA_THRESHOLD:
                    continue
                if T * (1 - alpha) <= MIN_TRANSMITTANCE:
                    break
                image[y, x] += alpha * T * colors[i]
                T *= 1 - alpha
            alpha_img[y, x] = 1 - T
            if background is not None:
                image[y, x] += T * background
    return image, alpha_img


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_equals_brute_force(seed):
    scene = _scene(seed=seed)
    viewmats, Ks = _camera()
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    image, alpha, _ = rasterization(*scene, viewmats, Ks, W, H, backgrounds=bg[None], backend="torch")
    want_image, want_alpha = brute_force(*scene, viewmats[0], Ks[0], background=bg)
    assert alpha.max() > 0.5  # the scene covers pixels: not an empty comparison
    assert torch.allclose(image[0], want_image, atol=1e-10)
    assert torch.allclose(alpha[0], want_alpha, atol=1e-10)


def test_dense_opaque_stack_stops_like_gsplat():
    """Many opaque layers: compositing must stop before transmittance falls to 1e-4."""
    means, quats, scales, opacities, colors = _scene(n=40, seed=3)
    means[:, :2] *= 0.05  # all on top of each other
    opacities = torch.full_like(opacities, 0.95)
    viewmats, Ks = _camera()
    image, alpha, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, W, H, backend="torch")
    want_image, want_alpha = brute_force(means, quats, scales, opacities, colors, viewmats[0], Ks[0])
    assert torch.allclose(image[0], want_image, atol=1e-10) and torch.allclose(alpha[0], want_alpha, atol=1e-10)


def test_gradients_match_finite_differences():
    means, quats, scales, opacities, colors = _scene(n=4, seed=4)
    viewmats, Ks = _camera()
    inputs = [t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors)]

    def render(*params):
        image, alpha, _ = rasterization(*params, viewmats, Ks, 10, 10, backend="torch")
        return image.sum() * 0.3 + (image ** 2).sum() + alpha.sum()

    f = 0.5 * 10 / math.tan(math.radians(25))
    Ks = torch.tensor([[[f, 0, 5.0], [0, f, 5.0], [0, 0, 1]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_moving_the_camera_equals_moving_the_scene_inversely():
    means, quats, scales, opacities, colors = _scene(seed=5)
    viewmats, Ks = _camera()
    angle = 0.2
    R = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]],
                     dtype=torch.float64)
    t = torch.tensor([0.05, -0.03, 0.1], dtype=torch.float64)
    view = torch.eye(4, dtype=torch.float64)
    view[:3, :3], view[:3, 3] = R, t
    moved_camera, _, _ = rasterization(means, quats, scales, opacities, colors, view[None], Ks, W, H, backend="torch")
    # the same relative geometry: transform the scene by the view, render with the identity camera
    q_r = torch.tensor([math.cos(angle / 2), 0, math.sin(angle / 2), 0], dtype=torch.float64)
    w1, x1, y1, z1 = q_r
    w2, x2, y2, z2 = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rotated = torch.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                           w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2], -1)
    moved_scene, _, _ = rasterization(means @ R.T + t, rotated, scales, opacities, colors, viewmats, Ks, W, H,
                                      backend="torch")
    assert moved_camera.abs().sum() > 1
    assert torch.allclose(moved_camera, moved_scene, atol=1e-9)


def test_empty_scene_and_gaussians_behind_the_camera_give_the_background():
    viewmats, Ks = _camera()
    bg = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    empty = [torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 3)]
    image, alpha, _ = rasterization(*[t.double() for t in empty], viewmats, Ks, W, H, backgrounds=bg, backend="torch")
    assert torch.equal(alpha, torch.zeros_like(alpha)) and torch.allclose(image, bg.expand(1, H, W, 3))
    means, quats, scales, opacities, colors = _scene(seed=6)
    means[:, 2] = -means[:, 2]  # all behind the camera
    image, alpha, meta = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, W, H, backgrounds=bg,
                                       backend="torch")
    assert torch.equal(alpha, torch.zeros_like(alpha)) and (meta["radii"] == 0).all()


def test_degenerate_scales_stay_finite():
    means, quats, scales, opacities, colors = _scene(seed=7)
    scales[:4] = 0.0  # points: the 0.3 px blur keeps them finite
    scales[4:8, 2] = 1e-12  # flat discs
    params = [t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors)]
    viewmats, Ks = _camera()
    image, alpha, _ = rasterization(*params, viewmats, Ks, W, H, backend="torch")
    (image.sum() + alpha.sum()).backward()
    assert torch.isfinite(image).all() and all(torch.isfinite(p.grad).all() for p in params)


def test_batch_of_cameras_equals_single_calls_and_depth_output():
    scene = _scene(seed=8)
    viewmats, Ks = _camera()
    second = viewmats.clone()
    second[0, 0, 3] = 0.1
    both, alphas, _ = rasterization(*scene, torch.cat([viewmats, second]), Ks.expand(2, 3, 3), W, H,
                                    render_mode="RGB+ED", backend="torch")
    one, _, _ = rasterization(*scene, second, Ks, W, H, render_mode="RGB+ED", backend="torch")
    assert torch.allclose(both[1], one[0])
    depth = both[0, ..., 3][alphas[0, ..., 0] > 0.5]
    assert depth.min() > 1.0 and depth.max() < 3.0  # expected depth lies within the scene


def test_sh_degree_zero_is_the_dc_colour():
    means, quats, scales, opacities, colors = _scene(seed=9)
    sh = torch.zeros(len(means), 4, 3, dtype=torch.float64)
    sh[:, 0] = (colors - 0.5) / 0.28209479177387814
    viewmats, Ks = _camera()
    direct, _, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, W, H, backend="torch")
    via_sh, _, _ = rasterization(means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=1, backend="torch")
    assert torch.allclose(direct, via_sh, atol=1e-10)
    # a degree-1 term makes the colour depend on the view direction
    sh[:, 3, 0] = 1.0
    dirs = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]], dtype=torch.float64)
    lit = sh_colors(1, dirs, sh[:2])
    assert not torch.allclose(lit[0], lit[1])


def test_gsplat_backend_refuses_cpu_tensors():
    scene = _scene(seed=10)
    viewmats, Ks = _camera()
    with pytest.raises(ValueError, match="CUDA"):
        rasterization(*scene, viewmats, Ks, W, H, backend="gsplat")


def test_projection_of_a_known_gaussian():
    """Pinhole maths by hand: centre at f x / z + c, footprint variance (f s / z)^2 + 0.3 px^2."""
    viewmats, Ks = _camera()
    f = float(Ks[0, 0, 0])
    mean = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)
    off = torch.tensor([[0.1, -0.05, 2.0]], dtype=torch.float64)
    s = 0.05
    cov = torch.eye(3, dtype=torch.float64)[None] * s * s
    one = torch.ones(1, dtype=torch.float64)
    m2d, conics, depths, radii, _, valid = project(mean, cov, one, viewmats[0], Ks[0], W, H, 0.3, 0.01, 1e10, False)
    var = (f * s / 2.0) ** 2 + 0.3
    assert valid.all() and torch.allclose(m2d, torch.tensor([[W / 2, H / 2]], dtype=torch.float64))
    assert torch.allclose(conics, torch.tensor([[1 / var, 0.0, 1 / var]], dtype=torch.float64))
    assert int(radii[0, 0]) == math.ceil(3.33 * math.sqrt(var)) and float(depths[0]) == 2.0
    m2d, *_ = project(off, cov, one, viewmats[0], Ks[0], W, H, 0.3, 0.01, 1e10, False)
    assert torch.allclose(m2d, torch.tensor([[W / 2 + f * 0.05, H / 2 - f * 0.025]], dtype=torch.float64))
