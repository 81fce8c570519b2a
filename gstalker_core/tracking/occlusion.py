"""A covered mouth (a hand, a skin-coloured object) from the colours under the landmarks.

FaceMesh keeps returning a full mesh when a hand covers the mouth: the pose (from rigid
points) stays right, but the mouth points are a guess (typically a closed mouth). What
does change is the picture inside the lip contour: lips, teeth and the mouth's inside
differ in colour from the cheeks, a hand over them does not. So the distance (CIE Lab)
between the median colour inside the outer lip contour and the median cheek colour,
compared with the clip's own median, marks the frames whose mouth is hidden.

Limits: an occluder whose colour is far from the skin's (a black microphone) keeps the
contrast up and is not detected; a clip covered in more than half of its frames moves
the median itself.
"""

from __future__ import annotations

import cv2
import numpy as np

from .topology import Topology

CHEEK_RADIUS = 0.05  # of the face width: small skin patches that stay on the cheek as the head turns


def mouth_skin_contrast(frame: np.ndarray, points: np.ndarray, topology: Topology) -> float:
    """Lab distance between the median colours inside the outer lip contour and on the cheeks
    of one RGB uint8 frame with its (P, >=2) landmarks; NaN when either region is off the frame."""
    lips = np.zeros(frame.shape[:2], np.uint8)
    cv2.fillPoly(lips, [np.round(points[topology.outer_lips, :2] - 0.5).astype(np.int32)], 1)
    cheeks = np.zeros_like(lips)
    radius = max(1, round(CHEEK_RADIUS * float(np.ptp(points[topology.face_oval, 0]))))
    for x, y in np.round(topology.cheek_points(points)[:, :2] - 0.5).astype(int):
        cv2.circle(cheeks, (int(x), int(y)), radius, 1, -1)
    if not lips.any() or not cheeks.any():
        return float("nan")
    medians = np.stack([np.median(frame[region > 0], axis=0) for region in (lips, cheeks)])
    lab = cv2.cvtColor((medians / 255.0).astype(np.float32)[None], cv2.COLOR_RGB2LAB)[0]
    return float(np.linalg.norm(lab[0] - lab[1]))


def covered_mouth(contrast: np.ndarray, valid: np.ndarray, ratio: float) -> np.ndarray:
    """(N,) bool: valid frames whose mouth/skin contrast is below ``ratio`` x the clip's median.

    Relative to the clip, because lip colour varies between people and lighting; the median
    over valid frames, because detection failures and interpolated frames say nothing."""
    usable = valid & np.isfinite(contrast)
    if not usable.any():
        return np.zeros(len(contrast), bool)
    threshold = ratio * float(np.median(contrast[usable]))
    return usable & (contrast < threshold)
