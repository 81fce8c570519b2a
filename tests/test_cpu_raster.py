"""The numba tile backend against the PyTorch reference: images, alphas, gradients, finite differences.

Images of 40 x 36 px leave partial tiles at the right and bottom edges (16 px tiles).
"""

from __future__ import annotations

import math

import pytest
import torch

from gstalker_core.render.rasterize import means2d_grads, rasterization
from tests.fixtures.scenes import random_scene

W, H = 40, 36
IMAGE_ATOL = 1e-5
# gradients (float32): |numba - torch| <= GRAD_RTOL |torch| + GRAD_ATOL max |torch|
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-4
NAMES = ("means", "quats", "scales", "opacities", "colors")


def _scene(n=24, seed=0, sh_coeffs=None, dtype=torch.float32):
    return random_scene(n, seed, dtype, sh_coeffs)


def _cameras(n=1, dtype=torch.float32, width=W, height=H):
    """``n`` cameras looking down +z, the later ones shifted and turned a little."""
    f = 0.5 * width / math.tan(math.radians(25))
    K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=dtype)
    views = []
    for i in range(n):
        angle = 0.15 * i
        view = torch.eye(4, dtype=dtype)
        view[:3, :3] = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0],
                                     [-math.sin(angle), 0, math.cos(angle)]], dtype=dtype)
        view[:3, 3] = torch.tensor([0.08 * i, -0.04 * i, 0.0], dtype=dtype)
        views.append(view)
    return torch.stack(views), K.expand(n, 3, 3)


def _render(backend, params, viewmats, Ks, **kwargs):
    """Image, alpha, meta and the gradients of a fixed random weighting of image and alpha."""
    leaves = [p.detach().clone().requires_grad_() for p in params]
    image, alpha, meta = rasterization(*leaves, viewmats, Ks, W, H, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(123)
    loss = (torch.rand(image.shape, generator=g) * image).sum() + (torch.rand(alpha.shape, generator=g) * alpha).sum()
    loss.backward()
    return image.detach(), alpha.detach(), meta, {name: p.grad for name, p in zip(NAMES, leaves)}


def assert_numba_matches_reference(params, viewmats, Ks, **kwargs):
    """Numba and torch agree on images, alphas, pairs and all gradients; returns the numba results."""
    want_image, want_alpha, want_meta, want_grads = _render("torch", params, viewmats, Ks, **kwargs)
    image, alpha, meta, grads = _render("numba", params, viewmats, Ks, **kwargs)
    assert meta["backend"] == "numba" and image.shape == want_image.shape and alpha.shape == want_alpha.shape
    assert want_alpha.max() > 0.5  # the scene covers pixels: not an empty comparison
    assert (image - want_image).abs().max() <= IMAGE_ATOL
    assert (alpha - want_alpha).abs().max() <= IMAGE_ATOL
    assert meta["n_pairs"] == want_meta["n_pairs"] > 0
    assert torch.equal(meta["radii"], want_meta["radii"])
    for name in NAMES:
        want, got = want_grads[name], grads[name]
        assert want.abs().max() > 0, name  # a gradient that could be wrong
        assert torch.allclose(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL * float(want.abs().max())), name
    return image, alpha, meta, grads


def test_overlaps_behind_the_camera_and_off_screen():
    params = _scene(n=40, seed=1)
    params[0][:5, 2] = -params[0][:5, 2]  # behind the camera
    params[0][5:8, 0] += 3.0  # far right of the image
    params[0][8:10, 1] -= 1.2  # partly above the top edge
    params[0][12] = params[0][11] + torch.tensor([0.02, 0.01, 0.0])  # the same depth: index order decides
    viewmats, Ks = _cameras()
    _, _, meta, grads = assert_numba_matches_reference(params, viewmats, Ks)
    culled = (meta["radii"][0] == 0).all(-1)
    assert culled[:8].all() and not culled[10:].all()
    assert (grads["means"][:8] == 0).all()  # culled Gaussians get no gradient


def test_tiny_and_huge_scales():
    params = _scene(n=30, seed=2)
    params[2][:4] = 1e-7  # points: only the 0.3 px blur is left
    params[2][4:6, 2] = 1e-9  # flat discs
    params[2][6] = torch.tensor([1.5, 1.0, 0.5])  # larger than the view: a box clipped on every side
    params[3][6] = 1.0  # alpha clamped at 0.999 near its centre
    viewmats, Ks = _cameras()
    image, _, meta, grads = assert_numba_matches_reference(params, viewmats, Ks)
    assert (meta["radii"][0, 6] > max(W, H)).all()
    assert torch.isfinite(image).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_opaque_stack_stops_early():
    """40 opaque layers on top of each other: compositing stops before T falls to 1e-4."""
    params = _scene(n=40, seed=3)
    params[0][:, :2] *= 0.05
    params[3] = torch.full_like(params[3], 0.95)
    viewmats, Ks = _cameras()
    _, alpha, _, _ = assert_numba_matches_reference(params, viewmats, Ks)
    assert alpha.max() > 1 - 1e-3
    # the centre pixel alone: only the layers in front of the stop get a colour gradient
    leaves = [p.detach().clone().requires_grad_() for p in params]
    image, _, _ = rasterization(*leaves, viewmats, Ks, W, H, backend="numba")
    image[0, H // 2, W // 2].sum().backward()
    n_contributing = int((leaves[4].grad.abs().sum(-1) > 0).sum())
    assert 0 < n_contributing < 20


def test_batch_of_cameras_with_backgrounds():
    params = _scene(n=30, seed=4)
    viewmats, Ks = _cameras(3)
    backgrounds = torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0], [0.0, 0.5, 0.0]])
    image, _, meta, _ = assert_numba_matches_reference(params, viewmats, Ks, backgrounds=backgrounds)
    assert image.shape == (3, H, W, 3) and meta["radii"].shape == (3, 30, 2)
    assert not torch.allclose(image[0], image[2], atol=1e-2)  # three different views


def test_per_camera_gaussians():
    """Gaussians with a leading camera dimension: camera c renders its own set, as alone."""
    n, cameras = 20, 3
    per_camera = [_scene(n=n, seed=10 + c, sh_coeffs=4) for c in range(cameras)]
    params = [torch.stack(parts) for parts in zip(*per_camera)]
    viewmats, Ks = _cameras(cameras)
    image, alpha, _, _ = assert_numba_matches_reference(params, viewmats, Ks, sh_degree=1)
    for c in range(cameras):
        alone, alone_alpha, _ = rasterization(*per_camera[c], viewmats[c:c + 1], Ks[c:c + 1], W, H, sh_degree=1,
                                              backend="numba")
        assert torch.equal(image[c], alone[0]) and torch.equal(alpha[c], alone_alpha[0])


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
@pytest.mark.parametrize("coefficients", ["shared", "per camera", "expanded"])
def test_numba_sh_colours_match_the_reference(sh_degree, coefficients):
    """Colours and gradients (coefficients and directions) of ``cpu_sh`` against ``rasterize.sh_colors``,
    with channels clamped at 0, coefficients beyond the degree, and coefficients shared, per camera,
    or one set expanded to the cameras (as a batched avatar passes them)."""
    from gstalker_core.render import cpu_sh
    from gstalker_core.render.rasterize import sh_colors

    g = torch.Generator().manual_seed(sh_degree)
    dirs = torch.randn(3, 50, 3, generator=g, dtype=torch.float64)
    coeffs = torch.randn(*((3,) if coefficients == "per camera" else ()), 50, 16, 3, generator=g, dtype=torch.float64)

    def numba_colours(d, c):
        return cpu_sh.sh_colors(sh_degree, d, c.expand(3, 50, 16, 3) if coefficients == "expanded" else c)

    want = sh_colors(sh_degree, dirs, coeffs).expand(3, 50, 3)
    assert (want == 0).any() and (want > 0).any()  # some channels clamped, some not
    assert torch.allclose(numba_colours(dirs, coeffs), want, atol=1e-12)
    leaves = (dirs.requires_grad_(), coeffs.requires_grad_())
    torch.autograd.gradcheck(numba_colours, leaves)
    weights = torch.rand(3, 50, 3, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad((numba_colours(*leaves) * weights).sum(), leaves)
    want_grads = torch.autograd.grad((sh_colors(sh_degree, *leaves).expand(3, 50, 3) * weights).sum(), leaves,
                                     allow_unused=True, materialize_grads=True)  # degree 0 ignores the directions
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert torch.allclose(got_grad, want_grad, atol=1e-12)
    assert (got_grads[1][..., (sh_degree + 1) ** 2:, :] == 0).all()


@pytest.mark.parametrize("sh_degree", [1, 3])
def test_sh_colours(sh_degree):
    params = _scene(n=30, seed=5, sh_coeffs=(sh_degree + 1) ** 2)
    viewmats, Ks = _cameras(2)
    _, _, _, grads = assert_numba_matches_reference(params, viewmats, Ks, sh_degree=sh_degree)
    assert grads["colors"][:, -1].abs().max() > 0  # the highest band is differentiated too


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_plain_feature_widths(channels):
    """Plain features of 1 to 4 channels (the compositing's fixed four, zero-padded) match the reference."""
    params = _scene(n=24, seed=9)
    params[4] = torch.rand(24, channels, generator=torch.Generator().manual_seed(9))
    viewmats, Ks = _cameras(2)
    image, _, _, _ = assert_numba_matches_reference(params, viewmats, Ks, sh_degree=None)
    assert image.shape[-1] == channels


def test_more_than_four_channels_are_refused():
    params = _scene(n=8)
    params[4] = torch.rand(8, 5)
    viewmats, Ks = _cameras(1)
    with pytest.raises(ValueError, match="1 to 4 channels"):
        rasterization(*params, viewmats, Ks, W, H, sh_degree=None, backend="numba")


@pytest.mark.parametrize("render_mode", ["RGB+D", "RGB+ED"])
def test_depth_render_modes(render_mode):
    params = _scene(n=30, seed=6)
    viewmats, Ks = _cameras()
    image, alpha, _, _ = assert_numba_matches_reference(params, viewmats, Ks, render_mode=render_mode,
                                                        backgrounds=torch.tensor([[0.2, 0.4, 0.6]]))
    expected_depth = image[0, ..., 3] if render_mode == "RGB+ED" else image[0, ..., 3] / alpha[0, ..., 0]
    depth = expected_depth[alpha[0, ..., 0] > 0.5]
    assert image.shape[-1] == 4 and depth.min() > 1.0 and depth.max() < 3.0  # within the scene


def test_antialiased_mode():
    params = _scene(n=30, seed=7)
    params[2][:10] *= 0.05  # small Gaussians: the compensation matters
    viewmats, Ks = _cameras()
    classic, _, _, _ = _render("numba", params, viewmats, Ks)
    image, _, _, _ = assert_numba_matches_reference(params, viewmats, Ks, rasterize_mode="antialiased")
    assert not torch.allclose(image, classic, atol=1e-3)


def test_means2d_grads_and_auto_backend():
    params = _scene(n=20, seed=8)
    viewmats, Ks = _cameras(2)
    _, _, want_meta, _ = _render("torch", params, viewmats, Ks)
    _, _, meta, _ = _render("auto", params, viewmats, Ks)  # CPU tensors: numba
    want, got = means2d_grads(want_meta), means2d_grads(meta)
    assert meta["backend"] == "numba" and got.shape == want.shape == (2, 20, 2) and want.abs().max() > 0
    assert torch.allclose(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL * float(want.abs().max()))


def test_gradients_match_finite_differences():
    """float64 end to end: the analytic tile backward under torch's projection against central differences."""
    size = 12
    params = [p.detach().clone().requires_grad_() for p in _scene(n=5, seed=9, sh_coeffs=4, dtype=torch.float64)]
    viewmats, Ks = _cameras(2, dtype=torch.float64, width=size, height=size)
    weights = torch.rand(2, size, size, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(*gaussians):
        image, alpha, _ = rasterization(*gaussians, viewmats, Ks, size, size, sh_degree=1, backend="numba")
        return (weights[..., :3] * image).sum() + (image ** 2).sum() + (weights[..., 3:] * alpha).sum()

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_depth_order_is_a_stable_sort():
    """The radix sort of float32 depths equals a stable argsort, ties by index, negative depths,
    -0.0 and infinities included; float64 too."""
    from gstalker_core.render.cpu_tiles import depth_order

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        depths = (torch.rand(3, 5000, generator=g, dtype=dtype) * 50).round() / 10 - 1.0  # many equal depths
        depths[0, :20] = -0.0
        depths[0, 20:40] = 0.0
        depths[1, :2] = torch.tensor([float("inf"), -float("inf")], dtype=dtype)
        assert torch.equal(torch.from_numpy(depth_order(depths)), torch.argsort(depths, dim=-1, stable=True))


def test_footprint_boxes_match_the_reference():
    """The numba boxes equal ``footprint_boxes`` in float32 and float64, centres on and beside the
    pixel-centre boundaries and radii past 2^24 included; culled Gaussians get an empty box."""
    from gstalker_core.render.cpu_tiles import _footprint_boxes
    from gstalker_core.render.rasterize import footprint_boxes

    g = torch.Generator().manual_seed(0)
    width, height = 37, 29
    for dtype in (torch.float32, torch.float64):
        on_boundaries = torch.randint(-20, 60, (2, 3000, 2), generator=g).to(dtype) / 2  # x.0 and x.5
        beside = on_boundaries + torch.randn(2, 3000, 2, generator=g, dtype=dtype) * 1e-6
        means2d = torch.cat([on_boundaries, beside, torch.rand(2, 3000, 2, generator=g, dtype=dtype) * 80 - 20], 1)
        radii = torch.randint(0, 12, means2d.shape, generator=g)
        # radii beyond float32's integers, centres as far off screen, so the boxes' far edges land
        # inside: the radii must be converted in the means' dtype, as torch does
        radii[:, :500] += 2 ** 24 + 1
        means2d[:, :500] -= 2 ** 24
        boxes = torch.from_numpy(_footprint_boxes(means2d.numpy(), radii.numpy(), width, height))
        x0, x1, y0, y1 = footprint_boxes(means2d, radii, width, height)
        listed = (radii > 0).all(-1)
        assert torch.equal(boxes[listed], torch.stack([x0, x1, y0, y1], -1)[listed].int())
        assert not boxes[~listed].any()


def test_numba_sh_colours_refuse_mismatched_inputs():
    """Too few coefficients for the degree, or per-camera coefficients for another number of cameras."""
    from gstalker_core.render import cpu_sh

    dirs = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match="SH degree 2 needs 9 coefficients, got 4"):
        cpu_sh.sh_colors(2, dirs, torch.randn(10, 4, 3))
    with pytest.raises(ValueError, match="SH coefficients for 3 cameras, directions for 2"):
        cpu_sh.sh_colors(1, dirs, torch.randn(3, 10, 4, 3))
