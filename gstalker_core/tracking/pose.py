"""3DMM-free head pose: a rigid face template learned from the clip, one focal length for
the clip, a per-frame rigid fit, and zero-lag temporal smoothing.

Conventions (those of gsplat and OpenCV):
- camera: +x right, +y down, +z forward; ``K = [[f, 0, W/2], [0, f, H/2], [0, 0, 1]]``;
  a camera point (x, y, z) lands at pixel coordinate u = f x / z + W/2, whose pixel grid
  has pixel centres at integer + 0.5 (gsplat evaluates pixel j at j + 0.5; mediapipe's
  normalised coordinates times the image side give the same continuous coordinate).
- world = the template frame: origin at the centroid of the stable points, +x towards the
  speaker's left eye (image right in a frontal view), +y from forehead towards chin, +z into
  the face (the nose points to -z). The head is static in world space; the camera moves.
  ``viewmat`` is world-to-camera: x_cam = R x_world + t; a frontal camera has R = I.
- units: the template's outer eye corners are ``EYE_SPAN`` apart, about metres for an adult.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from .topology import Topology

EYE_SPAN = 0.09
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class PoseFit:
    """Per-frame rigid fits: world-to-camera rotation vectors and translations, mean residual (px)."""

    rvecs: np.ndarray  # (N, 3)
    tvecs: np.ndarray  # (N, 3)
    residual: np.ndarray  # (N,), NaN where not fitted


def intrinsics(focal: float, width: int, height: int) -> np.ndarray:
    return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)


def focal_from_fov(fov_deg: float, size: int) -> float:
    return size / 2 / math.tan(math.radians(fov_deg) / 2)


def _umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising |s R src + t - dst|^2 (rows are points)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a)
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ d @ vt
    scale = float((sig * np.diag(d)).sum() / (a ** 2).sum())
    return scale, rot, mu_d - scale * rot @ mu_s


def learn_template(landmarks: np.ndarray, topology: Topology, iterations: int = 3) -> np.ndarray:
    """The speaker's rigid face (P, 3) in world units from per-frame 3D points (F, P, 3)
    (camera-space points from ``lift_landmarks``) of ``topology``.

    Each frame's mesh is similarity-aligned on the stable points to the running mean, and
    the mean is the per-point median (robust to frames with a bad mesh). The result is
    rotated into the canonical frontal frame and scaled so the eye corners are EYE_SPAN apart.
    """
    stable, (left_eye, right_eye) = topology.stable, topology.outer_eye_corners
    shapes = landmarks.astype(np.float64)
    mean = shapes[len(shapes) // 2]
    for _ in range(iterations):
        aligned = np.empty_like(shapes)
        for i, shape in enumerate(shapes):
            s, rot, t = _umeyama(shape[stable], mean[stable])
            aligned[i] = s * shape @ rot.T + t
        mean = np.median(aligned, axis=0)
    x_axis = mean[right_eye] - mean[left_eye]
    x_axis /= np.linalg.norm(x_axis)
    down = mean[topology.chin] - mean[topology.top]
    y_axis = down - x_axis * (down @ x_axis)
    y_axis /= np.linalg.norm(y_axis)
    basis = np.stack([x_axis, y_axis, np.cross(x_axis, y_axis)])  # rows: world axes in mesh coordinates
    centred = (mean - mean[stable].mean(0)) @ basis.T
    span = np.linalg.norm(centred[right_eye] - centred[left_eye])
    return (centred * (EYE_SPAN / span)).astype(np.float32)


def fit_poses(template: np.ndarray, points_2d: np.ndarray, fitted: np.ndarray, K: np.ndarray, topology: Topology
              ) -> PoseFit:
    """Rigid fit of the template's stable points to each frame's 2D landmarks (perspective PnP).

    ``fitted`` (N,) bool selects frames with landmarks. Each fit starts from the previous
    frame's pose (Levenberg-Marquardt), falling back to SQPnP after a gap.
    """
    obj = template[topology.stable].astype(np.float64)
    n = len(points_2d)
    rvecs, tvecs = np.zeros((n, 3)), np.zeros((n, 3))
    residual = np.full(n, np.nan)
    prev: tuple[np.ndarray, np.ndarray] | None = None
    for i in np.flatnonzero(fitted):
        img = points_2d[i][topology.stable].astype(np.float64)
        if prev is None:
            _, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_SQPNP)
        else:
            rvec, tvec = prev[0].copy(), prev[1].copy()
        _, rvec, tvec = cv2.solvePnP(obj, img, K, None, rvec, tvec, useExtrinsicGuess=True,
                                     flags=cv2.SOLVEPNP_ITERATIVE)
        proj, _ = cv2.projectPoints(obj, rvec, tvec, K, None)
        residual[i] = np.linalg.norm(proj[:, 0] - img, axis=1).mean()
        rvecs[i], tvecs[i] = rvec[:, 0], tvec[:, 0]
        prev = (rvec, tvec)
        if i + 1 < n and not fitted[i + 1]:
            prev = None
    return PoseFit(rvecs, tvecs, residual)


def lift_landmarks(landmarks: np.ndarray, focal: float, cx: float, cy: float, topology: Topology) -> np.ndarray:
    """Camera-space 3D points (F, P, 3) of (F, P, 3) detector landmarks under a pinhole of ``focal``.

    The detector's x, y carry the perspective of the shot while its z is a weak-perspective
    depth; a template averaged from them as they are is already foreshortened and would
    make any perspective camera look worse than an orthographic one. Lifting undoes the
    projection: the head's distance follows from the eye span (EYE_SPAN world units),
    each point's depth adds the detector's relative z at that distance, and x, y are
    back-projected through the pinhole.
    """
    a, b = topology.outer_eye_corners
    span_px = np.linalg.norm(landmarks[:, b, :2] - landmarks[:, a, :2], axis=1)
    distance = focal * EYE_SPAN / np.maximum(span_px, 1e-6)
    depth = distance[:, None] + landmarks[..., 2] * (distance / focal)[:, None]
    x = (landmarks[..., 0] - cx) * depth / focal
    y = (landmarks[..., 1] - cy) * depth / focal
    return np.stack([x, y, depth], axis=-1)


@dataclass
class FocalChoice:
    focal: float  # px
    residual: float  # mean reprojection error at the chosen focal, px
    spread: float  # worst minus best residual seen during the search, px: small = weakly determined


def choose_focal(landmarks: np.ndarray, fitted: np.ndarray, size: int, fov_range: tuple[float, float],
                 n_frames: int, topology: Topology) -> FocalChoice:
    """One focal length for the clip: golden-section search over the field of view for the
    smallest mean reprojection error of the template lifted at that focal, on up to
    ``n_frames`` frames spread over the clip."""
    idx = np.flatnonzero(fitted)
    idx = idx[np.linspace(0, len(idx) - 1, min(n_frames, len(idx))).round().astype(int)]
    sample, ok = landmarks[idx], np.ones(len(idx), bool)
    seen: list[float] = []

    def cost(fov: float) -> float:
        f = focal_from_fov(fov, size)
        template = learn_template(lift_landmarks(sample, f, size / 2, size / 2, topology), topology)
        fit = fit_poses(template, sample[..., :2], ok, intrinsics(f, size, size), topology)
        seen.append(float(np.mean(fit.residual)))
        return seen[-1]

    lo, hi = fov_range
    a, b = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    ca, cb = cost(a), cost(b)
    while hi - lo > 0.5:
        if ca < cb:
            hi, b, cb = b, a, ca
            a = hi - GOLDEN * (hi - lo)
            ca = cost(a)
        else:
            lo, a, ca = a, b, cb
            b = lo + GOLDEN * (hi - lo)
            cb = cost(b)
    fov = (lo + hi) / 2
    best = cost(fov)
    return FocalChoice(focal_from_fov(fov, size), best, max(seen) - min(seen))


def one_euro(signal: np.ndarray, fps: float, min_cutoff: float, beta: float, d_cutoff: float = 1.0) -> np.ndarray:
    """Causal one-euro filter (Casiez et al. 2012) of an (N, D) signal; the cutoff rises with
    the speed (norm over D) so slow drift is smoothed hard and fast motion barely."""
    def alpha(cutoff: float) -> float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau * fps)

    out = np.empty_like(signal, dtype=np.float64)
    out[0] = signal[0]
    speed = np.zeros(signal.shape[1])
    a_d = alpha(d_cutoff)
    for i in range(1, len(signal)):
        speed = a_d * (signal[i] - out[i - 1]) * fps + (1 - a_d) * speed
        a = alpha(min_cutoff + beta * float(np.linalg.norm(speed)))
        out[i] = a * signal[i] + (1 - a) * out[i - 1]
    return out


def zero_lag_one_euro(signal: np.ndarray, fps: float, min_cutoff: float, beta: float) -> np.ndarray:
    """Mean of a forward and a backward one-euro pass: the two passes lag by the same amount
    in opposite directions, so a head turn keeps its timing while rest jitter is averaged out."""
    forward = one_euro(signal, fps, min_cutoff, beta)
    backward = one_euro(signal[::-1], fps, min_cutoff, beta)[::-1]
    return (forward + backward) / 2


def smooth_poses(rvecs: np.ndarray, tvecs: np.ndarray, fps: float, min_cutoff: float, beta: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Smooth rotations (as degrees about the clip's mean rotation, small for a talking head,
    so the vector space is nearly flat) and translations (in centimetres, so one ``beta``
    suits both: both move a few units per second)."""
    rots = Rotation.from_rotvec(rvecs)
    mean = rots.mean()
    rel_deg = np.degrees((mean.inv() * rots).as_rotvec())
    rel_deg = zero_lag_one_euro(rel_deg, fps, min_cutoff, beta)
    t_cm = zero_lag_one_euro(tvecs * 100, fps, min_cutoff, beta)
    return (mean * Rotation.from_rotvec(np.radians(rel_deg))).as_rotvec(), t_cm / 100


def interpolate_poses(rvecs: np.ndarray, tvecs: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill frames where ``good`` is False: slerp rotations, lerp translations between the
    nearest good frames; before the first / after the last good frame the pose is held."""
    idx = np.flatnonzero(good)
    if len(idx) == 0:
        raise ValueError("no good frame to interpolate from")
    frames = np.arange(len(good))
    clamped = np.clip(frames, idx[0], idx[-1])
    if len(idx) == 1:
        rots = Rotation.from_rotvec(np.repeat(rvecs[idx], len(good), axis=0))
    else:
        rots = Slerp(idx, Rotation.from_rotvec(rvecs[idx]))(clamped)
    t = np.stack([np.interp(frames, idx, tvecs[idx, k]) for k in range(3)], axis=1)
    rv = np.where(good[:, None], rvecs, rots.as_rotvec())
    return rv, np.where(good[:, None], tvecs, t)


def interpolate_landmarks(points: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Linear interpolation of (N, P, D) landmarks over frames where ``good`` is False
    (held constant before the first and after the last good frame)."""
    idx, bad = np.flatnonzero(good), np.flatnonzero(~good)
    flat = points.reshape(len(points), -1).copy()
    if len(bad):
        pos = np.searchsorted(idx, bad)
        left = idx[np.clip(pos - 1, 0, len(idx) - 1)]
        right = idx[np.clip(pos, 0, len(idx) - 1)]
        w = np.where(right > left, (bad - left) / np.maximum(right - left, 1), 0.0)[:, None]
        flat[bad] = (1 - w) * flat[left] + w * flat[right]
    return flat.reshape(points.shape)


def viewmats(rvecs: np.ndarray, tvecs: np.ndarray) -> np.ndarray:
    """(N, 4, 4) float32 world-to-camera matrices."""
    out = np.tile(np.eye(4, dtype=np.float32), (len(rvecs), 1, 1))
    out[:, :3, :3] = Rotation.from_rotvec(rvecs).as_matrix()
    out[:, :3, 3] = tvecs
    return out


def project(points: np.ndarray, view: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixel coordinates (N, P, 2) of world points (P, 3) under viewmats (N, 4, 4)."""
    cam = np.einsum("nij,pj->npi", view[:, :3, :3], points) + view[:, None, :3, 3]
    uv = cam[..., :2] / cam[..., 2:3]
    return uv * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])


def jitter(points_2d: np.ndarray) -> float:
    """Mean frame-to-frame acceleration magnitude (px/frame^2) of (N, P, 2) tracks."""
    if len(points_2d) < 3:
        return 0.0
    acc = points_2d[2:] - 2 * points_2d[1:-1] + points_2d[:-2]
    return float(np.linalg.norm(acc, axis=-1).mean())


def yaw_pitch_roll_deg(rvecs: np.ndarray) -> np.ndarray:
    """(N, 3) head angles relative to a frontal view: yaw about camera y, pitch about x, roll about z."""
    return Rotation.from_rotvec(rvecs).as_euler("YXZ", degrees=True)
