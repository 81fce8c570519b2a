"""Differentiable 3D Gaussian rasterisation with three backends behind one function.

``rasterization`` follows gsplat's ``rasterization()`` signature and conventions, so the
backends are interchangeable:

- ``gsplat``: gsplat's CUDA kernels (tensors on a CUDA device, gsplat installed);
- ``numba``: the CPU default; projection (``cpu_project``), SH colours (``cpu_sh``) and the
  2D tile compositing (``cpu_tiles``) in numba, each with its analytic backward;
- ``torch``: our pure-PyTorch reference, on any device, differentiable by autograd; the
  oracle the other two are tested against.

Conventions (gsplat's): ``viewmats`` are world-to-camera (OpenCV axes: +x right, +y down,
+z forward); ``Ks`` are pixel intrinsics; a pixel (i, j) is evaluated at its centre
(j + 0.5, i + 0.5); quaternions are (w, x, y, z) and normalised here; colours are either
(N, 3) or SH coefficients (N, K, 3) with ``sh_degree`` (evaluated from the camera centre
to each mean, + 0.5, clamped at 0). Per-camera Gaussians (a deformed head per frame) come
with a leading camera dimension on every per-Gaussian tensor, as gsplat's batch dimensions.

The reference reproduces gsplat's maths exactly: EWA projection with the Jacobian clamped
to 1.3x the field of view, ``eps2d`` blur (with opacity compensation in ``antialiased``
mode), a 3.33-sigma (or opacity-limited) footprint, alpha = min(0.999, o exp(-sigma))
skipped below 1/255, and front-to-back compositing in depth order that stops before
transmittance falls to 1e-4. Instead of tiles it builds the sparse list of (pixel,
Gaussian) pairs inside each Gaussian's footprint, sorts it by (pixel, depth) and
composites with a segmented cumulative product (a cumulative sum of log(1 - alpha)).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
MIN_TRANSMITTANCE = 1e-4
FOOTPRINT_SIGMAS = 3.33
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)

RenderMode = Literal["RGB", "RGB+D", "RGB+ED"]


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z), any norm -> (..., 3, 3) rotation matrices."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*quats.shape[:-1], 3, 3)


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """Real SH basis up to ``degree`` (0-3) at unit directions (..., 3) -> (..., (degree+1)^2)."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [SH_C2[0] * x * y, SH_C2[1] * y * z, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * x * z,
                SH_C2[4] * (xx - yy)]
    if degree >= 3:
        out += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * x * y * z, SH_C3[2] * y * (4 * zz - xx - yy),
                SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(out, dim=-1)


def sh_colors(degree: int, dirs: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Colours from SH coefficients (..., K, 3) seen along ``dirs`` (..., 3), as gsplat: +0.5, >= 0."""
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))
    return torch.clamp_min((basis[..., None] * coeffs[..., : basis.shape[-1], :]).sum(-2) + 0.5, 0.0)


def project(means: torch.Tensor, covars: torch.Tensor, opacities: torch.Tensor, viewmat: torch.Tensor,
            K: torch.Tensor, width: int, height: int, eps2d: float, near: float, far: float, antialiased: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EWA projection of N Gaussians into one camera (``viewmat`` (4, 4), ``K`` (3, 3)), or into
    C cameras at once (``viewmat`` (C, 4, 4), ``K`` (C, 3, 3); Gaussians shared (N, ...) or per
    camera (C, N, ...)): one vectorised pass instead of a Python loop over cameras.

    Returns means2d (..., N, 2), conics (..., N, 3) [a, b, c] of the blurred inverse
    covariance, depths (..., N), radii (..., N, 2) int (0 = culled), the opacities used for
    compositing (times the antialiasing compensation) and the valid mask (..., N).
    """
    R, t = viewmat[..., :3, :3], viewmat[..., :3, 3]
    mean_c = means @ R.transpose(-1, -2) + t[..., None, :]
    R_each = R[..., None, :, :]  # one rotation per camera, broadcast over its Gaussians
    cov_c = R_each @ covars @ R_each.transpose(-1, -2)
    x, y, z = mean_c.unbind(-1)
    fx, fy, cx, cy = (K[..., i, j, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    in_depth = (z >= near) & (z <= far)
    zs = torch.where(in_depth, z, torch.ones_like(z))  # keep culled rows finite for autograd
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = zs * torch.clamp(x / zs, -(cx / fx + 0.3 * tan_x), (width - cx) / fx + 0.3 * tan_x)
    ty = zs * torch.clamp(y / zs, -(cy / fy + 0.3 * tan_y), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(zs)
    J = torch.stack([torch.stack([fx / zs, zero, -fx * tx / zs ** 2], -1),
                     torch.stack([zero, fy / zs, -fy * ty / zs ** 2], -1)], dim=-2)  # (..., N, 2, 3)
    cov2d = J @ cov_c @ J.transpose(-1, -2)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)
    a, b, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    if antialiased:
        opacities = opacities * torch.sqrt(torch.clamp_min(det_orig / torch.where(det > 0, det, torch.ones_like(det)), 0.0))
    valid = in_depth & (det > 0)
    safe_det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], -1)
    with torch.no_grad():
        # footprint: 3.33 sigma, less for faint Gaussians (where o exp(-r^2/2) reaches 1/255)
        o = opacities.detach()
        valid = valid & (o >= ALPHA_THRESHOLD)
        extend = torch.clamp(torch.sqrt(2 * torch.log(torch.clamp_min(o / ALPHA_THRESHOLD, 1.0))), max=FOOTPRINT_SIGMAS)
        radii = torch.ceil(extend[..., None] * torch.sqrt(torch.stack([a, c], -1).detach().clamp_min(0)))
        on_screen = ((means2d[..., 0] + radii[..., 0] > 0) & (means2d[..., 0] - radii[..., 0] < width)
                     & (means2d[..., 1] + radii[..., 1] > 0) & (means2d[..., 1] - radii[..., 1] < height))
        valid = valid & on_screen & (radii > 0).all(-1)
        radii = torch.where(valid[..., None], radii, torch.zeros_like(radii)).long()
    return means2d, conics, z, radii, opacities.expand(z.shape), valid


def footprint_boxes(means2d: torch.Tensor, radii: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, ...]:
    """Pixel ranges [x0, x1) x [y0, y1) whose centres (j + 0.5) lie within mean +- radius (any leading dims)."""
    x0 = torch.clamp(torch.ceil(means2d[..., 0] - radii[..., 0] - 0.5), 0, width).long()
    x1 = torch.clamp(torch.floor(means2d[..., 0] + radii[..., 0] - 0.5) + 1, 0, width).long()
    y0 = torch.clamp(torch.ceil(means2d[..., 1] - radii[..., 1] - 0.5), 0, height).long()
    y1 = torch.clamp(torch.floor(means2d[..., 1] + radii[..., 1] - 0.5) + 1, 0, height).long()
    return x0, torch.maximum(x1, x0), y0, torch.maximum(y1, y0)


def _pairs(means2d: torch.Tensor, radii: torch.Tensor, valid: torch.Tensor, width: int, height: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """All (gaussian id, pixel id) pairs with the pixel inside the Gaussian's footprint box."""
    ids = torch.nonzero(valid).squeeze(1)
    if ids.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=means2d.device)
        return empty, empty
    x0, x1, y0, y1 = footprint_boxes(means2d[ids].detach(), radii[ids], width, height)
    w, h = (x1 - x0).clamp_min(0), (y1 - y0).clamp_min(0)
    counts = w * h
    gauss = torch.repeat_interleave(ids, counts)
    local = torch.arange(int(counts.sum()), device=means2d.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    wg = torch.repeat_interleave(w, counts)
    px = torch.repeat_interleave(x0, counts) + local % wg
    py = torch.repeat_interleave(y0, counts) + local // wg
    return gauss, py * width + px


def _pair_alphas(gauss: torch.Tensor, pix: torch.Tensor, means2d: torch.Tensor, conics: torch.Tensor,
                 opac: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, alpha) of each (Gaussian, pixel) pair, evaluated at the pixel centre."""
    d = means2d[gauss] - torch.stack([(pix % width).to(means2d.dtype) + 0.5, (pix // width).to(means2d.dtype) + 0.5], -1)
    con = conics[gauss]
    sigma = 0.5 * (con[:, 0] * d[:, 0] ** 2 + con[:, 2] * d[:, 1] ** 2) + con[:, 1] * d[:, 0] * d[:, 1]
    return sigma, torch.clamp(opac[gauss] * torch.exp(-sigma), max=MAX_ALPHA)


@torch.no_grad()
def _contributing_pairs(means2d: torch.Tensor, conics: torch.Tensor, opac: torch.Tensor, depths: torch.Tensor,
                        radii: torch.Tensor, valid: torch.Tensor, width: int, height: int, chunks: int = 8
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (Gaussian, pixel) pairs that contribute to the image, sorted by (pixel, depth).

    Gaussians are visited front to back in ``chunks`` depth slices. After each slice the
    pixels whose transmittance fell below 1e-4 are finished; a later Gaussian whose whole
    footprint lies on finished pixels is skipped without generating its pairs (a summed-area
    table answers that in O(1)), which removes most of the hidden back of a head.
    """
    order = torch.nonzero(valid).squeeze(1)
    order = order[torch.argsort(depths[order], stable=True)]  # equal depths: by index, as the numba backend
    transmittance = torch.ones(height * width, dtype=torch.float64, device=means2d.device)
    finished = torch.zeros(height * width, dtype=torch.bool, device=means2d.device)  # gsplat's early stop fired
    kept_g, kept_p = [], []
    for ids in torch.tensor_split(order, chunks):
        if ids.numel() == 0:
            continue
        if kept_g:  # skip Gaussians whose footprint is entirely on finished pixels
            open_px = (~finished).reshape(height, width).long()
            table = F.pad(open_px.cumsum(0).cumsum(1), (1, 0, 1, 0))
            x0, x1, y0, y1 = footprint_boxes(means2d[ids], radii[ids], width, height)
            n_open = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
            ids = ids[n_open > 0]
        mask = torch.zeros_like(valid)
        mask[ids] = True
        gauss, pix = _pairs(means2d, radii, mask, width, height)
        sigma, alpha = _pair_alphas(gauss, pix, means2d, conics, opac, width)
        keep = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD) & ~finished[pix]
        gauss, pix, alpha = gauss[keep], pix[keep], alpha[keep]
        rank = torch.empty(len(depths), dtype=torch.long, device=depths.device)
        rank[ids] = torch.arange(len(ids), device=depths.device)  # ids are in depth order
        sort = torch.argsort(pix * len(depths) + rank[gauss])
        gauss, pix, alpha = gauss[sort], pix[sort], alpha[sort]
        log_keep = torch.log1p(-alpha).double()
        T = transmittance[pix] * torch.exp(_segment_exclusive_cumsum(log_keep, pix))
        included = T * (1 - alpha) > MIN_TRANSMITTANCE  # gsplat stops before T reaches 1e-4
        finished[pix[~included]] = True
        gauss, pix = gauss[included], pix[included]
        transmittance *= torch.exp(torch.zeros_like(transmittance).index_add(0, pix, log_keep[included]))
        kept_g.append(gauss)
        kept_p.append(pix)
    if not kept_g:
        empty = torch.zeros(0, dtype=torch.long, device=means2d.device)
        return empty, empty
    gauss, pix = torch.cat(kept_g), torch.cat(kept_p)
    sort = torch.sort(pix, stable=True).indices  # slices are in depth order: a stable sort keeps it
    return gauss[sort], pix[sort]


def torch_projection(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                     viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int, eps2d: float, near: float,
                     far: float, antialiased: bool) -> tuple[torch.Tensor, ...]:
    """Covariances from quaternions and scales, then ``project``: means2d, conics, depths, radii
    and compositing opacities, differentiable by autograd (also w.r.t. the cameras)."""
    Rg = quat_to_rotmat(quats)
    M = Rg * scales[..., None, :]
    covars = M @ M.transpose(-1, -2)
    return project(means, covars, opacities, viewmat, K, width, height, eps2d, near, far, antialiased)[:5]


def _project_camera(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                    colors: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int, near: float,
                    far: float, eps2d: float, sh_degree: int | None, render_mode: RenderMode, antialiased: bool,
                    projection=torch_projection, shading=sh_colors) -> tuple[torch.Tensor, ...]:
    """Everything per Gaussian that one camera (or C cameras at once, as ``project``) needs,
    shared by the torch and numba backends; ``projection`` is ``torch_projection`` or its
    fused CPU twin ``cpu_project.project``, ``shading`` ``sh_colors`` or ``cpu_sh.sh_colors``.

    Returns ``project``'s means2d, conics, depths, radii and opacities, then the features to
    composite (..., N, D): colours, plus the depth channel in the depth render modes.
    """
    means2d, conics, depths, radii, opac = projection(means, quats, scales, opacities, viewmat, K, width, height, eps2d,
                                                      near, far, antialiased)
    if sh_degree is not None:
        campos = -(viewmat[..., :3, :3].transpose(-1, -2) @ viewmat[..., :3, 3, None])[..., 0]
        rgb = shading(sh_degree, means - campos[..., None, :], colors)
    else:
        rgb = colors
    feats = rgb.expand(*depths.shape, rgb.shape[-1])
    if render_mode in ("RGB+D", "RGB+ED"):
        feats = torch.cat([feats, depths[..., None]], -1)
    return means2d, conics, depths, radii, opac, feats


def _finish_image(image: torch.Tensor, alpha: torch.Tensor, render_mode: RenderMode,
                  background: torch.Tensor | None) -> torch.Tensor:
    """Expected depth (RGB+ED) and the background (broadcastable to the image) under the composite."""
    if render_mode == "RGB+ED":
        image = torch.cat([image[..., :-1], image[..., -1:] / alpha.clamp_min(1e-10)], -1)
    if background is not None:
        depth_channels = image.shape[-1] - background.shape[-1]  # the background has no depth
        image = image + (1 - alpha) * torch.cat([background, background.new_zeros(*background.shape[:-1],
                                                                                  depth_channels)], -1)
    return image


def _rasterize_reference(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                         colors: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int,
                         near: float, far: float, eps2d: float, sh_degree: int | None, background: torch.Tensor | None,
                         render_mode: RenderMode, antialiased: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    means2d, conics, depths, radii, opac, feats = _project_camera(
        means, quats, scales, opacities, colors, viewmat, K, width, height, near, far, eps2d, sh_degree, render_mode,
        antialiased)
    valid = (radii > 0).all(-1)
    n_pix = width * height
    gauss, pix = _contributing_pairs(means2d.detach(), conics.detach(), opac.detach(), depths.detach(), radii, valid,
                                     width, height)
    # differentiable alpha and transmittance of the contributing pairs
    _, alpha = _pair_alphas(gauss, pix, means2d, conics, opac, width)
    T = torch.exp(_segment_exclusive_cumsum(torch.log1p(-alpha).double(), pix)).to(alpha.dtype)
    weight = alpha * T
    out = torch.zeros(n_pix, feats.shape[-1], dtype=feats.dtype, device=feats.device)
    out = out.index_add(0, pix, weight[:, None] * feats[gauss])
    acc = torch.zeros(n_pix, dtype=weight.dtype, device=weight.device).index_add(0, pix, weight)
    alpha_img = acc.reshape(height, width, 1)
    image = _finish_image(out.reshape(height, width, -1), alpha_img, render_mode, background)
    meta = {"means2d": means2d, "radii": radii, "depths": depths, "conics": conics, "opacities": opac,
            "n_pairs": int(len(pix))}
    return image, alpha_img, meta


def _segment_exclusive_cumsum(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Per-run exclusive prefix sums of ``values`` (runs = equal consecutive ``segments``)."""
    inclusive = torch.cumsum(values, 0)
    exclusive = inclusive - values
    with torch.no_grad():
        run_start = torch.ones_like(segments, dtype=torch.bool)
        run_start[1:] = segments[1:] != segments[:-1]
        first = torch.cummax(torch.where(run_start, torch.arange(len(segments), device=segments.device), 0), 0).values
    return exclusive - exclusive[first]


def rasterization(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                  colors: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
                  near_plane: float = 0.01, far_plane: float = 1e10, sh_degree: int | None = None,
                  backgrounds: torch.Tensor | None = None, render_mode: RenderMode = "RGB", eps2d: float = 0.3,
                  rasterize_mode: Literal["classic", "antialiased"] = "classic",
                  backend: Literal["auto", "torch", "numba", "gsplat"] = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Render N Gaussians into C cameras.

    Args (gsplat's): means (N, 3); quats (N, 4) w,x,y,z; scales (N, 3) (activated); opacities
    (N,) in [0, 1]; colors (N, D) or SH coefficients (N, K, 3) with ``sh_degree``; viewmats
    (C, 4, 4) world-to-camera; Ks (C, 3, 3); backgrounds (C, D) optional. Per-camera Gaussians:
    every per-Gaussian tensor with a leading C (means (C, N, 3), ..., colors (C, N, K, 3)).
    ``backend="auto"``: gsplat on CUDA tensors when installed, numba on the CPU. The numba
    backend composites at most 4 channels (D plus the depth channel of the depth modes) and
    refuses more with a ValueError; ``backend="torch"`` takes any D.
    Returns render_colors (C, H, W, D[+1 depth]), render_alphas (C, H, W, 1) and meta. In the
    meta: ``means2d`` keeps its gradient (read it with ``means2d_grads``, for densification),
    ``radii`` (C, N, 2), 0 where culled.
    """
    batched = means.dim() == 3
    if batched and means.shape[0] != len(viewmats):
        raise ValueError(f"per-camera Gaussians: {means.shape[0]} sets for {len(viewmats)} cameras")
    if backend == "auto":
        if means.is_cuda:
            backend = "gsplat" if _gsplat_available() else "torch"
        else:
            backend = "numba"
    if backend == "gsplat":
        return _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane,
                                 far_plane, sh_degree, backgrounds, render_mode, eps2d, rasterize_mode)
    gaussians = (means, quats, scales, opacities, colors)
    if backend == "numba":
        return _rasterize_numba(gaussians, viewmats, Ks, width, height, near_plane, far_plane, eps2d,
                                sh_degree, backgrounds, render_mode, rasterize_mode == "antialiased")
    images, alphas, metas = [], [], []
    for c in range(len(viewmats)):
        image, alpha, meta = _rasterize_reference(
            *_camera_gaussians(gaussians, c, batched), viewmats[c], Ks[c], width, height, near_plane, far_plane, eps2d,
            sh_degree, None if backgrounds is None else backgrounds[c], render_mode, rasterize_mode == "antialiased")
        if meta["means2d"].requires_grad:
            meta["means2d"].retain_grad()
        images.append(image)
        alphas.append(alpha)
        metas.append(meta)
    meta = {"means2d": [m["means2d"] for m in metas], "radii": torch.stack([m["radii"] for m in metas]),
            "depths": torch.stack([m["depths"] for m in metas]), "n_pairs": sum(m["n_pairs"] for m in metas),
            "width": width, "height": height, "backend": "torch"}
    return torch.stack(images), torch.stack(alphas), meta


def _camera_gaussians(gaussians: tuple[torch.Tensor, ...], c: int, batched: bool) -> tuple[torch.Tensor, ...]:
    """The Gaussians camera ``c`` sees: its own set when they are per camera, else the shared one."""
    return tuple(t[c] for t in gaussians) if batched else gaussians


def _rasterize_numba(gaussians: tuple[torch.Tensor, ...], viewmats: torch.Tensor, Ks: torch.Tensor,
                     width: int, height: int, near: float, far: float, eps2d: float, sh_degree: int | None,
                     backgrounds: torch.Tensor | None, render_mode: RenderMode, antialiased: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Projection fused per Gaussian in numba (``cpu_project``), SH colours in numba (``cpu_sh``),
    2D compositing in numba tiles (``cpu_tiles``)."""
    if gaussians[0].is_cuda:
        raise ValueError("the numba backend needs CPU tensors; use backend='gsplat' or 'torch' on CUDA")
    from . import cpu_project, cpu_sh, cpu_tiles  # numba is imported only when this backend runs

    # the fused numba projection differentiates w.r.t. the Gaussians only: cameras being optimised take autograd's
    projection = torch_projection if viewmats.requires_grad or Ks.requires_grad else cpu_project.project
    means2d, conics, depths, radii, opac, feats = _project_camera(*gaussians, viewmats, Ks, width, height, near, far,
                                                                  eps2d, sh_degree, render_mode, antialiased,
                                                                  projection, cpu_sh.sh_colors)
    if means2d.requires_grad:
        means2d.retain_grad()
    image, alpha, n_pairs = cpu_tiles.rasterize_to_pixels(means2d, conics, feats, opac, depths, radii, width, height)
    image = _finish_image(image, alpha, render_mode, None if backgrounds is None else backgrounds[:, None, None, :])
    meta = {"means2d": means2d, "radii": radii, "depths": depths, "n_pairs": n_pairs, "width": width,
            "height": height, "backend": "numba"}
    return image, alpha, meta


def _gsplat_available() -> bool:
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
                      sh_degree, backgrounds, render_mode, eps2d, rasterize_mode):
    if not means.is_cuda:
        # on a CPU tensor gsplat tries to JIT-compile CUDA kernels and fails obscurely
        raise ValueError("the gsplat backend needs CUDA tensors; use backend='numba' or 'torch' on the CPU")
    import gsplat

    batched = means.dim() == 3
    if batched:  # per-camera Gaussians: gsplat's batch dimension, each batch entry seen by one camera
        viewmats, Ks = viewmats[:, None], Ks[:, None]
        backgrounds = None if backgrounds is None else backgrounds[:, None]
    images, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
        far_plane=far_plane, sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode, eps2d=eps2d,
        rasterize_mode=rasterize_mode, packed=False)
    if batched:  # means2d stays (C, 1, N, 2): its .grad is filled there, means2d_grads flattens it
        images, alphas = images[:, 0], alphas[:, 0]
        meta["radii"], meta["depths"] = meta["radii"][:, 0], meta["depths"][:, 0]
    meta["backend"] = "gsplat"
    if meta["means2d"].requires_grad:
        meta["means2d"].retain_grad()
    return images, alphas, meta


def means2d_grads(meta: dict) -> torch.Tensor:
    """(C, N, 2) gradient of the loss w.r.t. the projected means (after ``backward``), any backend."""
    m = meta["means2d"]
    if isinstance(m, list):
        return torch.stack([t.grad if t.grad is not None else torch.zeros_like(t) for t in m])
    grad = m.grad if m.grad is not None else torch.zeros_like(m)
    return grad.reshape(-1, *grad.shape[-2:])  # gsplat's per-camera Gaussians: (C, 1, N, 2)
