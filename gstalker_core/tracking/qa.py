"""QA video: what the tracker saw, frame by frame, for a human to check in seconds.

Left: the frame with the landmarks (stable points red, the rest green) and the head's
axes projected from the smoothed pose (x red, y green, z blue; a frame drawn with a red
border was interpolated). Right: the labels over the frame (head yellow, neck cyan,
torso magenta, background dimmed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..media import VideoWriter
from .pose import EYE_SPAN, project
from .topology import Topology

LABEL_COLOURS = np.array([[0, 0, 0], [255, 220, 0], [0, 220, 255], [255, 0, 200]], np.uint8)
_COLOUR_LUT = np.zeros((256, 1, 3), np.uint8)  # cv2.LUT form: label value -> colour, per channel
_COLOUR_LUT[:len(LABEL_COLOURS), 0] = LABEL_COLOURS
AXIS_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 80, 255))


def draw_qa_frame(frame: np.ndarray, labels: np.ndarray, landmarks: np.ndarray, view: np.ndarray, K: np.ndarray,
                  valid: bool, topology: Topology) -> np.ndarray:
    """(H, 2W, 3) uint8 side-by-side panel for one frame."""
    left = np.ascontiguousarray(frame).copy()
    h, w = left.shape[:2]
    pts = np.clip(landmarks[:, :2].astype(int), 0, [w - 1, h - 1])  # floor: the pixel holding the point
    left[pts[:, 1], pts[:, 0]] = (0, 255, 0)
    left[pts[topology.stable, 1], pts[topology.stable, 0]] = (255, 0, 0)
    axes = np.vstack([np.zeros(3), np.eye(3) * EYE_SPAN])
    ends = project(axes, view[None], K)[0]
    thickness = max(1, w // 128)
    for k in range(3):
        cv2.line(left, tuple(int(v) for v in ends[0]), tuple(int(v) for v in ends[k + 1]), AXIS_COLOURS[k],
                 thickness, cv2.LINE_AA)
    if not valid:
        cv2.rectangle(left, (0, 0), (w - 1, h - 1), (255, 0, 0), 2 * thickness)
    # cv2 throughout: numpy fancy indexing / np.where cost ~3 ms each per 512 px frame
    colour = cv2.LUT(cv2.merge([labels, labels, labels]), _COLOUR_LUT)
    blend = cv2.addWeighted(np.ascontiguousarray(frame), 0.5, colour, 0.5, 0)
    right = cv2.convertScaleAbs(frame, alpha=0.35)
    right = cv2.copyTo(blend, (labels > 0).view(np.uint8), right)
    return np.concatenate([left, right], axis=1)


def write_qa_video(dest: Path, frames: Sequence[np.ndarray], labels: Sequence[np.ndarray], landmarks: np.ndarray,
                   viewmats: np.ndarray, K: np.ndarray, valid: np.ndarray, topology: Topology, fps: int = 25) -> Path:
    """Stream the QA panels into an H.264 (yuv420p) mp4 at ``dest``; memory is one frame."""
    h, w = np.asarray(frames[0]).shape[:2]
    with VideoWriter(Path(dest), 2 * w + (2 * w) % 2, h + h % 2, fps) as writer:
        for i, frame in enumerate(frames):
            panel = draw_qa_frame(frame, labels[i], landmarks[i], viewmats[i], K, bool(valid[i]), topology)
            writer.write(np.pad(panel, ((0, h % 2), (0, (2 * w) % 2), (0, 0))))
    return Path(dest)
