"""Spherical-harmonics colours in numba, with their analytic backward.

``rasterize.sh_colors`` evaluated by PyTorch costs more than the whole projection on the
CPU (15 ms forward + backward for 50k Gaussians at degree 1, 37 ms at degree 3: about 40
small kernels and their autograd twins, each a pass over memory). Here one loop over the
Gaussians evaluates the basis of degree 0-3 in registers, and the backward recomputes it
and returns the gradients w.r.t. the coefficients and the view directions.

Conventions are the reference's: directions normalised as ``F.normalize`` (norm clamped
at 1e-12), colour = basis . coefficients + 0.5, clamped at 0 (a clamped channel passes no
gradient, as ``torch.clamp_min``: strictly below 0). Coefficients beyond the degree's
(degree + 1)^2 are ignored and get zero gradient. Arithmetic runs in float64 locals.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from .cpu_numba import jit, jit_parallel, numpy_of
from .rasterize import SH_C0, SH_C1, SH_C2, SH_C3

_NORM_EPS = 1e-12  # F.normalize's
_ZEROS_12 = (0.0,) * 12


@jit
def _unit(dirs, c, g):
    """Direction (c, g) normalised as F.normalize, and the norm it was divided by."""
    x, y, z = np.float64(dirs[c, g, 0]), np.float64(dirs[c, g, 1]), np.float64(dirs[c, g, 2])
    norm = max(math.sqrt(x * x + y * y + z * z), _NORM_EPS)
    return x / norm, y / norm, z / norm, norm


@jit
def _basis(x, y, z, n_basis):
    """The 16 real SH basis values of degrees 0-3 at the unit direction (x, y, z); those past
    ``n_basis`` are 0 at degrees 0 and 1 (the default), whose Gaussians skip degrees 2 and 3' terms."""
    if n_basis <= 4:
        return (SH_C0, -SH_C1 * y, SH_C1 * z, -SH_C1 * x) + _ZEROS_12
    xx, yy, zz = x * x, y * y, z * z
    return (SH_C0, -SH_C1 * y, SH_C1 * z, -SH_C1 * x,
            SH_C2[0] * x * y, SH_C2[1] * y * z, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * x * z, SH_C2[4] * (xx - yy),
            SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * x * y * z, SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy), SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3 * yy))


@jit
def _basis_gradients(x, y, z, n_basis):
    """d basis / dx, d basis / dy, d basis / dz of ``_basis``'s 16 polynomials (as ``_basis``, those
    past ``n_basis`` 0 at degrees 0 and 1)."""
    if n_basis <= 4:
        return (0.0, 0.0, 0.0, -SH_C1) + _ZEROS_12, (0.0, -SH_C1, 0.0, 0.0) + _ZEROS_12, \
            (0.0, 0.0, SH_C1, 0.0) + _ZEROS_12
    xx, yy, zz = x * x, y * y, z * z
    by_x = (0.0, 0.0, 0.0, -SH_C1,
            SH_C2[0] * y, 0.0, -2 * SH_C2[2] * x, SH_C2[3] * z, 2 * SH_C2[4] * x,
            6 * SH_C3[0] * x * y, SH_C3[1] * y * z, -2 * SH_C3[2] * x * y, -6 * SH_C3[3] * x * z,
            SH_C3[4] * (4 * zz - 3 * xx - yy), 2 * SH_C3[5] * x * z, 3 * SH_C3[6] * (xx - yy))
    by_y = (0.0, -SH_C1, 0.0, 0.0,
            SH_C2[0] * x, SH_C2[1] * z, -2 * SH_C2[2] * y, 0.0, -2 * SH_C2[4] * y,
            3 * SH_C3[0] * (xx - yy), SH_C3[1] * x * z, SH_C3[2] * (4 * zz - xx - 3 * yy), -6 * SH_C3[3] * y * z,
            -2 * SH_C3[4] * x * y, -2 * SH_C3[5] * y * z, -6 * SH_C3[6] * x * y)
    by_z = (0.0, 0.0, SH_C1, 0.0,
            0.0, SH_C2[1] * y, 4 * SH_C2[2] * z, SH_C2[3] * x, 0.0,
            0.0, SH_C3[1] * x * y, 8 * SH_C3[2] * y * z, SH_C3[3] * (6 * zz - 3 * xx - 3 * yy),
            8 * SH_C3[4] * x * z, SH_C3[5] * (xx - yy), 0.0)
    return by_x, by_y, by_z


@jit
def _colour(basis, coeffs, cc, g, n_basis, channel):
    """basis . coefficients + 0.5 of one channel, before the clamp at 0."""
    value = 0.5
    for k in range(n_basis):
        value += basis[k] * np.float64(coeffs[cc, g, k, channel])
    return value


@jit_parallel
def _forward(n_basis, dirs, coeffs, colours):
    n_cameras, n_gaussians = colours.shape[:2]
    shared = coeffs.shape[0] == 1
    for g in numba.prange(n_gaussians):
        for c in range(n_cameras):
            x, y, z, _ = _unit(dirs, c, g)
            basis = _basis(x, y, z, n_basis)
            for channel in range(3):
                colours[c, g, channel] = max(_colour(basis, coeffs, 0 if shared else c, g, n_basis, channel), 0.0)


@jit_parallel
def _backward(n_basis, dirs, coeffs, grad_colours, grad_dirs, grad_coeffs):
    """One thread per Gaussian, over all cameras: shared coefficients' gradients sum without races."""
    n_cameras, n_gaussians = grad_colours.shape[:2]
    shared = coeffs.shape[0] == 1
    for g in numba.prange(n_gaussians):
        for c in range(n_cameras):
            cc = 0 if shared else c
            if grad_colours[c, g, 0] == 0 and grad_colours[c, g, 1] == 0 and grad_colours[c, g, 2] == 0:
                grad_dirs[c, g, 0] = grad_dirs[c, g, 1] = grad_dirs[c, g, 2] = 0.0  # hidden Gaussian
                continue
            x, y, z, norm = _unit(dirs, c, g)
            basis = _basis(x, y, z, n_basis)
            by_x, by_y, by_z = _basis_gradients(x, y, z, n_basis)
            gx = gy = gz = 0.0
            for channel in range(3):
                if _colour(basis, coeffs, cc, g, n_basis, channel) < 0.0:  # clamped: no gradient
                    continue
                grad = np.float64(grad_colours[c, g, channel])
                for k in range(n_basis):
                    grad_coeffs[cc, g, k, channel] += basis[k] * grad
                    weight = grad * np.float64(coeffs[cc, g, k, channel])
                    gx += weight * by_x[k]
                    gy += weight * by_y[k]
                    gz += weight * by_z[k]
            if norm > _NORM_EPS:  # through v / |v|: project out the radial part
                radial = x * gx + y * gy + z * gz
                gx, gy, gz = gx - x * radial, gy - y * radial, gz - z * radial
            grad_dirs[c, g, 0], grad_dirs[c, g, 1], grad_dirs[c, g, 2] = gx / norm, gy / norm, gz / norm


class _ShColours(torch.autograd.Function):
    @staticmethod
    def forward(ctx, degree, dirs, coeffs):
        n_basis = (degree + 1) ** 2
        coeff_array = numpy_of(coeffs)
        colours = np.empty((*dirs.shape[:2], 3), coeff_array.dtype)
        _forward(n_basis, numpy_of(dirs), coeff_array, colours)
        ctx.save_for_backward(dirs, coeffs)
        ctx.n_basis = n_basis
        return torch.from_numpy(colours)

    @staticmethod
    def backward(ctx, grad_colours):
        dirs, coeffs = ctx.saved_tensors
        dir_array, coeff_array = numpy_of(dirs), numpy_of(coeffs)
        grad_dirs = np.empty(dir_array.shape, dir_array.dtype)
        grad_coeffs = np.zeros(coeff_array.shape, coeff_array.dtype)
        _backward(ctx.n_basis, dir_array, coeff_array, numpy_of(grad_colours), grad_dirs, grad_coeffs)
        return None, torch.from_numpy(grad_dirs), torch.from_numpy(grad_coeffs)


def sh_colors(degree: int, dirs: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``rasterize.sh_colors`` for C cameras: ``dirs`` (C, N, 3), ``coeffs`` (N, K, 3) shared by
    the cameras or (C, N, K, 3) per camera -> colours (C, N, 3), differentiable w.r.t. both."""
    n_cameras, n_gaussians = dirs.shape[:2]
    if (degree + 1) ** 2 > coeffs.shape[-2]:
        raise ValueError(f"SH degree {degree} needs {(degree + 1) ** 2} coefficients, got {coeffs.shape[-2]}")
    coeffs = coeffs.reshape(-1, n_gaussians, *coeffs.shape[-2:])  # shared: a leading 1, not C copies
    if len(coeffs) > 1 and coeffs.stride(0) == 0:  # one set expanded to C cameras: keep it one
        coeffs = coeffs[:1]
    if len(coeffs) not in (1, n_cameras):
        raise ValueError(f"SH coefficients for {len(coeffs)} cameras, directions for {n_cameras}")
    return _ShColours.apply(degree, dirs, coeffs.to(dirs.dtype))
