"""CPU EWA projection in numba: ``rasterize.project`` fused per Gaussian, with its analytic backward.

The numba backend's compositing costs tens of milliseconds; projecting 50k Gaussians with
PyTorch ops (3x3 batched matmuls and ~100 elementwise kernels, each a pass over memory,
then their autograd twins) cost as much again. Here one loop over (camera, Gaussian) does
quaternion -> rotation -> covariance -> camera -> 2D covariance -> conic, footprint and
antialiasing compensation in registers, and the backward recomputes that chain and applies
the chain rule in reverse.

Conventions are the reference's (``rasterize.project`` and ``_project_camera``), which the
tests hold it to: the Jacobian clamped to 1.3x the field of view (a clamped coordinate
passes no gradient, as torch.clamp), ``eps2d`` blur, ``antialiased`` compensation
o sqrt(det / det_blurred), footprint 3.33 sigma or less for faint Gaussians. Culled
Gaussians (radius 0) never reach a pixel, so their gradients are zero and the backward
skips them. Arithmetic runs in float64 locals; outputs keep the caller's dtype.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from .cpu_numba import jit, jit_inline, jit_parallel, numpy_of
from .rasterize import ALPHA_THRESHOLD, FOOTPRINT_SIGMAS

_QUAT_EPS = 1e-12  # F.normalize's


# Small matrices are tuples of float64 scalars, row-major (a 3x3 is 9 values, a 2x3 is 6): numba
# keeps them in registers, where numpy arrays would cost a heap allocation and a BLAS call each.


@jit
def _rotation(q):
    """Quaternion (w, x, y, z), normalised here as F.normalize -> rotation (9), the unit quaternion and the norm."""
    q0, q1, q2, q3 = np.float64(q[0]), np.float64(q[1]), np.float64(q[2]), np.float64(q[3])
    norm = max(math.sqrt(q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3), _QUAT_EPS)
    w, x, y, z = q0 / norm, q1 / norm, q2 / norm, q3 / norm
    rot = (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
           2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
           2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y))
    return rot, (w, x, y, z), norm


@jit
def _row_times(row, m):
    """A 3-vector times a 3x3 (9): the row vector row @ m."""
    return (row[0] * m[0] + row[1] * m[3] + row[2] * m[6], row[0] * m[1] + row[1] * m[4] + row[2] * m[7],
            row[0] * m[2] + row[1] * m[5] + row[2] * m[8])


@jit
def _dot(u, v):
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


@jit
def _camera_frame(means, viewmats, Ks, width, height, near, far, c, g):
    """Camera rotation (9), camera-space mean, in-depth flag, the depth used for division,
    intrinsics, the projection Jacobian's entries (J00, J02, J11, J12; J01 = J10 = 0) and
    whether x, y lie inside the 1.3x field-of-view clamp (outside it, tx = z * limit)."""
    v = viewmats[c]
    R = (np.float64(v[0, 0]), np.float64(v[0, 1]), np.float64(v[0, 2]), np.float64(v[1, 0]), np.float64(v[1, 1]),
         np.float64(v[1, 2]), np.float64(v[2, 0]), np.float64(v[2, 1]), np.float64(v[2, 2]))
    p = (np.float64(means[c, g, 0]), np.float64(means[c, g, 1]), np.float64(means[c, g, 2]))
    mc = (_dot(R[0:3], p) + v[0, 3], _dot(R[3:6], p) + v[1, 3], _dot(R[6:9], p) + v[2, 3])
    fx, fy, cx, cy = np.float64(Ks[c, 0, 0]), np.float64(Ks[c, 1, 1]), np.float64(Ks[c, 0, 2]), np.float64(Ks[c, 1, 2])
    in_depth = near <= mc[2] <= far
    zs = mc[2] if in_depth else 1.0
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    ux, uy = mc[0] / zs, mc[1] / zs
    lo_x, hi_x = -(cx / fx + 0.3 * tan_x), (width - cx) / fx + 0.3 * tan_x
    lo_y, hi_y = -(cy / fy + 0.3 * tan_y), (height - cy) / fy + 0.3 * tan_y
    free_x, free_y = lo_x <= ux <= hi_x, lo_y <= uy <= hi_y  # torch.clamp passes gradient on [lo, hi]
    tx = zs * min(max(ux, lo_x), hi_x)
    ty = zs * min(max(uy, lo_y), hi_y)
    jac = (fx / zs, -fx * tx / zs ** 2, fy / zs, -fy * ty / zs ** 2)
    return R, mc, in_depth, zs, (fx, fy, cx, cy), jac, (free_x, free_y)


@jit
def _cov2d_factor(R, jac, rot, s):
    """W = J R (2x3, as two rows), M = rot diag(s) (9) and V = W M (two rows): cov2d = V V^T."""
    W0 = (jac[0] * R[0] + jac[1] * R[6], jac[0] * R[1] + jac[1] * R[7], jac[0] * R[2] + jac[1] * R[8])
    W1 = (jac[2] * R[3] + jac[3] * R[6], jac[2] * R[4] + jac[3] * R[7], jac[2] * R[5] + jac[3] * R[8])
    M = (rot[0] * s[0], rot[1] * s[1], rot[2] * s[2], rot[3] * s[0], rot[4] * s[1], rot[5] * s[2],
         rot[6] * s[0], rot[7] * s[1], rot[8] * s[2])
    return W0, W1, M, _row_times(W0, M), _row_times(W1, M)


@jit
def _scales(scales, c, g):
    return np.float64(scales[c, g, 0]), np.float64(scales[c, g, 1]), np.float64(scales[c, g, 2])


@jit_inline
def _forward_one(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d, antialiased, c, g,
                 means2d, conics, depths, radii, opac_out):
    R, mc, in_depth, zs, (fx, fy, cx, cy), jac, _ = _camera_frame(means, viewmats, Ks, width, height, near, far, c, g)
    rot, _, _ = _rotation(quats[c, g])
    _, _, _, V0, V1 = _cov2d_factor(R, jac, rot, _scales(scales, c, g))
    a, b, cc = _dot(V0, V0), _dot(V0, V1), _dot(V1, V1)
    det_orig = a * cc - b * b
    a, cc = a + eps2d, cc + eps2d
    det = a * cc - b * b
    opacity = np.float64(opacities[c, g])
    if antialiased:
        opacity *= math.sqrt(max(det_orig / (det if det > 0 else 1.0), 0.0))
    mx, my = fx * mc[0] / zs + cx, fy * mc[1] / zs + cy
    safe_det = det if (in_depth and det > 0) else 1.0
    means2d[c, g, 0], means2d[c, g, 1] = mx, my
    conics[c, g, 0], conics[c, g, 1], conics[c, g, 2] = cc / safe_det, -b / safe_det, a / safe_det
    depths[c, g] = mc[2]
    opac_out[c, g] = opacity
    radii[c, g, 0] = radii[c, g, 1] = 0
    if not (in_depth and det > 0 and opacity >= ALPHA_THRESHOLD):
        return
    # footprint: 3.33 sigma, less for faint Gaussians (where o exp(-r^2/2) reaches 1/255)
    extend = min(math.sqrt(2 * math.log(max(opacity / ALPHA_THRESHOLD, 1.0))), FOOTPRINT_SIGMAS)
    rx, ry = math.ceil(extend * math.sqrt(max(a, 0.0))), math.ceil(extend * math.sqrt(max(cc, 0.0)))
    on_screen = mx + rx > 0 and mx - rx < width and my + ry > 0 and my - ry < height
    if on_screen and rx > 0 and ry > 0:
        radii[c, g, 0], radii[c, g, 1] = rx, ry


@jit_parallel
def _project_forward(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d, antialiased,
                     means2d, conics, depths, radii, opac_out):
    n_gaussians = means.shape[1]
    for job in numba.prange(means.shape[0] * n_gaussians):
        c, g = divmod(np.int64(job), n_gaussians)
        _forward_one(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d, antialiased, c, g,
                     means2d, conics, depths, radii, opac_out)


@jit_inline
def _backward_one(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d, antialiased, c, g,
                  grad_means2d, grad_conics, grad_depths, grad_opac, grad_means, grad_quats, grad_scales,
                  grad_opacities):
    """Gradients of one visible Gaussian in one camera: the forward's chain, recomputed, in reverse."""
    R, mc, _, zs, (fx, fy, _, _), jac, (free_x, free_y) = _camera_frame(
        means, viewmats, Ks, width, height, near, far, c, g)
    rot, (w, x, y, z), norm = _rotation(quats[c, g])
    s = _scales(scales, c, g)
    W0, W1, M, V0, V1 = _cov2d_factor(R, jac, rot, s)
    a0, b, c0 = _dot(V0, V0), _dot(V0, V1), _dot(V1, V1)
    a, cc = a0 + eps2d, c0 + eps2d
    det = a * cc - b * b
    det_orig = a0 * c0 - b * b
    opacity = np.float64(opacities[c, g])
    # conic = (cc, -b, a) / det
    gA, gB, gC = np.float64(grad_conics[c, g, 0]), np.float64(grad_conics[c, g, 1]), np.float64(grad_conics[c, g, 2])
    inv, inv2 = 1.0 / det, 1.0 / (det * det)
    ga = -gA * cc * cc * inv2 + gB * b * cc * inv2 + gC * (inv - a * cc * inv2)
    gc = gA * (inv - a * cc * inv2) + gB * b * a * inv2 - gC * a * a * inv2
    gb = 2 * b * (gA * cc + gC * a) * inv2 - gB * (inv + 2 * b * b * inv2)
    go = np.float64(grad_opac[c, g])
    if antialiased:  # o' = o sqrt(r), r = det_orig / det > 0 for every visible Gaussian
        ratio = det_orig / det
        grad_opacities[c, g] = go * math.sqrt(ratio)
        gr = go * opacity / (2 * math.sqrt(ratio))
        ga += gr * (c0 * inv - det_orig * cc * inv2)
        gc += gr * (a0 * inv - det_orig * a * inv2)
        gb += gr * (-2 * b * inv + 2 * b * det_orig * inv2)
    else:
        grad_opacities[c, g] = go
    # cov2d = V V^T with V = W M, W = J R: dL/dV = (G + G^T) V for G = [[ga, gb], [0, gc]]
    gV0 = (2 * ga * V0[0] + gb * V1[0], 2 * ga * V0[1] + gb * V1[1], 2 * ga * V0[2] + gb * V1[2])
    gV1 = (gb * V0[0] + 2 * gc * V1[0], gb * V0[1] + 2 * gc * V1[1], gb * V0[2] + 2 * gc * V1[2])
    gW0 = (_dot(gV0, M[0:3]), _dot(gV0, M[3:6]), _dot(gV0, M[6:9]))  # dL/dW = dL/dV M^T
    gW1 = (_dot(gV1, M[0:3]), _dot(gV1, M[3:6]), _dot(gV1, M[6:9]))
    # dL/dJ = dL/dW R^T; J's free entries are J00, J02 (row 0) and J11, J12 (row 1)
    gJ00, gJ02 = _dot(gW0, R[0:3]), _dot(gW0, R[6:9])
    gJ11, gJ12 = _dot(gW1, R[3:6]), _dot(gW1, R[6:9])
    # J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]; tx = x unless clamped (then z * limit)
    gmx, gmy = np.float64(grad_means2d[c, g, 0]), np.float64(grad_means2d[c, g, 1])
    tx, ty = -jac[1] * zs ** 2 / fx, -jac[3] * zs ** 2 / fy
    g_x, g_y = gmx * fx / zs, gmy * fy / zs
    g_z = (np.float64(grad_depths[c, g]) - gmx * fx * mc[0] / zs ** 2 - gmy * fy * mc[1] / zs ** 2
           - gJ00 * fx / zs ** 2 - gJ11 * fy / zs ** 2)
    if free_x:
        g_x -= gJ02 * fx / zs ** 2
        g_z += gJ02 * 2 * fx * tx / zs ** 3
    else:
        g_z += gJ02 * fx * tx / zs ** 3
    if free_y:
        g_y -= gJ12 * fy / zs ** 2
        g_z += gJ12 * 2 * fy * ty / zs ** 3
    else:
        g_z += gJ12 * fy * ty / zs ** 3
    for i in range(3):  # mean_c = R mean + t
        grad_means[c, g, i] = R[i] * g_x + R[3 + i] * g_y + R[6 + i] * g_z
    # dL/dM = W^T dL/dV; M = rot diag(s)
    gM = (W0[0] * gV0[0] + W1[0] * gV1[0], W0[0] * gV0[1] + W1[0] * gV1[1], W0[0] * gV0[2] + W1[0] * gV1[2],
          W0[1] * gV0[0] + W1[1] * gV1[0], W0[1] * gV0[1] + W1[1] * gV1[1], W0[1] * gV0[2] + W1[1] * gV1[2],
          W0[2] * gV0[0] + W1[2] * gV1[0], W0[2] * gV0[1] + W1[2] * gV1[1], W0[2] * gV0[2] + W1[2] * gV1[2])
    for j in range(3):
        grad_scales[c, g, j] = gM[j] * rot[j] + gM[3 + j] * rot[3 + j] + gM[6 + j] * rot[6 + j]
    G = (gM[0] * s[0], gM[1] * s[1], gM[2] * s[2], gM[3] * s[0], gM[4] * s[1], gM[5] * s[2],
         gM[6] * s[0], gM[7] * s[1], gM[8] * s[2])  # dL/drot
    gw = 2 * (-z * G[1] + y * G[2] + z * G[3] - x * G[5] - y * G[6] + x * G[7])
    gx = 2 * (y * G[1] + z * G[2] + y * G[3] - 2 * x * G[4] - w * G[5] + z * G[6] + w * G[7] - 2 * x * G[8])
    gy = 2 * (-2 * y * G[0] + x * G[1] + w * G[2] + x * G[3] + z * G[5] - w * G[6] + z * G[7] - 2 * y * G[8])
    gz = 2 * (-2 * z * G[0] - w * G[1] + x * G[2] + w * G[3] - 2 * z * G[4] + y * G[5] + x * G[6] + y * G[7])
    # q / max(|q|, eps): project out the radial part
    radial = w * gw + x * gx + y * gy + z * gz if norm > _QUAT_EPS else 0.0
    grad_quats[c, g, 0], grad_quats[c, g, 1] = (gw - w * radial) / norm, (gx - x * radial) / norm
    grad_quats[c, g, 2], grad_quats[c, g, 3] = (gy - y * radial) / norm, (gz - z * radial) / norm


@jit_parallel
def _project_backward(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d, antialiased, radii,
                      grad_means2d, grad_conics, grad_depths, grad_opac, grad_means, grad_quats, grad_scales,
                      grad_opacities):
    n_gaussians = means.shape[1]
    for job in numba.prange(means.shape[0] * n_gaussians):
        c, g = divmod(np.int64(job), n_gaussians)
        reached = (grad_means2d[c, g, 0] != 0 or grad_means2d[c, g, 1] != 0 or grad_conics[c, g, 0] != 0
                   or grad_conics[c, g, 1] != 0 or grad_conics[c, g, 2] != 0 or grad_opac[c, g] != 0)
        if radii[c, g, 0] > 0 and reached:  # most of a head is hidden: no gradient reached it
            _backward_one(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d, antialiased,
                          c, g, grad_means2d, grad_conics, grad_depths, grad_opac, grad_means, grad_quats, grad_scales,
                          grad_opacities)
        else:  # culled or hidden: only the depths output depends on it, through the mean
            for i in range(3):
                grad_means[c, g, i] = grad_depths[c, g] * viewmats[c, 2, i]
                grad_scales[c, g, i] = 0.0
            grad_quats[c, g, 0] = grad_quats[c, g, 1] = grad_quats[c, g, 2] = grad_quats[c, g, 3] = 0.0
            grad_opacities[c, g] = 0.0


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d, antialiased):
        C, N = means.shape[:2]
        inputs = [numpy_of(t) for t in (means, quats, scales, opacities, viewmats, Ks)]
        dtype = inputs[0].dtype
        means2d, conics = np.empty((C, N, 2), dtype), np.empty((C, N, 3), dtype)
        depths, opac = np.empty((C, N), dtype), np.empty((C, N), dtype)
        radii = np.empty((C, N, 2), np.int64)
        settings = (width, height, float(near), float(far), float(eps2d), bool(antialiased))
        _project_forward(*inputs, *settings, means2d, conics, depths, radii, opac)
        ctx.save_for_backward(means, quats, scales, opacities, viewmats, Ks)
        ctx.settings = settings
        radii_t = torch.from_numpy(radii)
        ctx.radii = radii
        ctx.mark_non_differentiable(radii_t)
        return torch.from_numpy(means2d), torch.from_numpy(conics), torch.from_numpy(depths), radii_t, \
            torch.from_numpy(opac)

    @staticmethod
    def backward(ctx, grad_means2d, grad_conics, grad_depths, _, grad_opac):
        means, quats, scales, opacities, viewmats, Ks = ctx.saved_tensors
        grads = [np.empty(t.shape, numpy_of(means).dtype) for t in (means, quats, scales, opacities)]  # all written
        upstream = [numpy_of(g) for g in (grad_means2d, grad_conics, grad_depths, grad_opac)]
        _project_backward(*(numpy_of(t) for t in (means, quats, scales, opacities, viewmats, Ks)), *ctx.settings,
                          ctx.radii, *upstream, *grads)
        return (*(torch.from_numpy(g) for g in grads), None, None, None, None, None, None, None, None)


def project(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
            viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, eps2d: float, near: float, far: float,
            antialiased: bool) -> tuple[torch.Tensor, ...]:
    """``rasterize._project_camera``'s projection for C cameras, differentiable w.r.t. the Gaussians
    (not the cameras). Gaussians shared (N, ...) or per camera (C, N, ...).

    Returns means2d (C, N, 2), conics (C, N, 3), depths (C, N), radii (C, N, 2) (0 = culled)
    and the compositing opacities (C, N), as ``rasterize.project``.
    """
    C = len(viewmats)
    means, quats, scales = (t.expand(C, *t.shape[-2:]) for t in (means, quats, scales))
    opacities = opacities.expand(C, opacities.shape[-1])
    return _Project.apply(means, quats, scales, opacities, viewmats.detach(), Ks.detach(), width, height, near, far,
                          eps2d, antialiased)
