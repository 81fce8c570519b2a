"""Torso shift: where the torso sits in each frame, a 2D translation in pixels, tracked like the head's pose.

The torso layer is one set of camera-space Gaussians, and the speaker's shoulders move on
their own: on cnn_anchor_71s by up to 13 px at 256 px over a stretch of the training frames,
and by 2-4 px in the held-out frames. A torso fitted without knowing this is the blur of all
its positions, and on held-out frames it stands beside the real one (a band of plate along
the shoulders and the collar: the torso region's worst error). So the tracker measures the
shift, and the renderer draws the torso layer shifted by it (``model.avatar.render_avatar``).

Measure: template matching (OpenCV ``matchTemplate``, squared differences under a mask) of
each frame's grey image below the chin against a reference, over +-``SEARCH`` of the width,
refined to sub-pixel by a parabola through the best score and its neighbours. The mask is the
torso's label grown by a few pixels (so the shoulders' edge against the background counts)
minus the grown head and neck, whose motion is the head's. The reference is the median of
``REFERENCE_FRAMES`` frames spread over the clip, each first aligned to the first frame: no
single frame's pose sets the gauge. Shifts are relative to their median over the clip: the
torso is fitted where it usually is. A clip whose first frame shows too little torso to
measure (a face-only crop) gets no shift at all.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .parsing import HEAD, NECK, TORSO

SEARCH = 0.0625  # search range, x width (16 px at 256)
GROW = 0.035  # mask growth, x width (9 px at 256)
BELOW_CHIN = 0.016  # the band starts this far (x width) below the lowest chin of the clip
REFERENCE_FRAMES = 48
MIN_MASK_SHARE = 0.02  # of the template: less torso than this and the clip's shift is not measured


def _grey(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.asarray(frame), cv2.COLOR_RGB2GRAY).astype(np.float32)


def _mask(labels: np.ndarray, grow: int) -> np.ndarray:
    kernel = np.ones((grow, grow), np.uint8)
    torso = cv2.dilate((labels == TORSO).astype(np.uint8), kernel)
    head_and_neck = cv2.dilate(((labels == HEAD) | (labels == NECK)).astype(np.uint8), kernel)
    return (torso & (1 - head_and_neck)).astype(np.float32)


def _parabola_peak(scores: np.ndarray, at: int) -> float:
    """Sub-pixel position of the minimum at ``at`` of a 1D score line."""
    if 0 < at < len(scores) - 1:
        curvature = scores[at - 1] - 2 * scores[at] + scores[at + 1]
        if curvature > 0:
            return at + 0.5 * (scores[at - 1] - scores[at + 1]) / curvature
    return float(at)


class _Matcher:
    """Aligns frames' bands to one template: (dx, dy) that moves the template onto the frame."""

    def __init__(self, grey: np.ndarray, mask: np.ndarray, top: int, margin: int):
        h, w = grey.shape
        self.top, self.margin = top, margin
        self.template = np.ascontiguousarray(grey[top + margin: h - margin, margin: w - margin])
        self.mask = np.ascontiguousarray(mask[top + margin: h - margin, margin: w - margin])

    def usable(self) -> bool:
        return self.mask.mean() >= MIN_MASK_SHARE

    def shift(self, grey: np.ndarray) -> tuple[float, float]:
        scores = cv2.matchTemplate(grey[self.top:], self.template, cv2.TM_SQDIFF, mask=self.mask)
        y, x = np.unravel_index(int(np.argmin(scores)), scores.shape)
        return _parabola_peak(scores[y, :], x) - self.margin, _parabola_peak(scores[:, x], y) - self.margin


def _shifted(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``image`` moved back by (dx, dy): what it shows where the reference shows it."""
    h, w = image.shape
    return cv2.warpAffine(image, np.float32([[1, 0, -dx], [0, 1, -dy]]), (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def torso_shifts(frames: Sequence[np.ndarray], labels: Sequence[np.ndarray], lowest_chin: float) -> np.ndarray:
    """(N, 2) float32 torso shift (dx, dy) of each frame in pixels, relative to the clip's median;
    zeros when the clip shows too little torso. ``frames``/``labels``: indexable and iterable
    (RGB uint8, parsing labels); ``lowest_chin``: the chin's largest y over the clip, pixels."""
    n = len(frames)
    first = np.asarray(frames[0])
    h, w = first.shape[:2]
    margin, grow = max(2, round(SEARCH * w)), max(3, round(GROW * w) | 1)
    top = int(min(lowest_chin + BELOW_CHIN * w, h - 3 * margin))
    if top < 0:
        return np.zeros((n, 2), np.float32)
    matcher = _Matcher(_grey(first), _mask(np.asarray(labels[0]), grow), top, margin)
    if not matcher.usable():
        return np.zeros((n, 2), np.float32)
    picked = np.linspace(0, n - 1, min(REFERENCE_FRAMES, n)).round().astype(int)
    greys, masks = [], []
    for i in picked:
        grey = _grey(frames[int(i)])
        dx_dy = matcher.shift(grey)
        greys.append(_shifted(grey, *dx_dy))
        masks.append(_shifted(_mask(np.asarray(labels[int(i)]), grow), *dx_dy))
    reference = _Matcher(np.median(np.stack(greys), axis=0), (np.median(np.stack(masks), axis=0) > 0.5)
                         .astype(np.float32), top, margin)
    if not reference.usable():
        return np.zeros((n, 2), np.float32)
    shifts = np.array([reference.shift(_grey(frame)) for frame in frames], np.float64)
    return (shifts - np.median(shifts, axis=0)).astype(np.float32)
