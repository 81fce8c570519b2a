"""Landmark motion in the head's canonical frame: a direct teacher for the face field.

At 128-256 px the lips move by a pixel or two, so the photometric loss alone barely tells
the face field where the mouth went (the first preview models learned to ignore the audio).
The tracker already knows: every frame's landmarks, the head pose and the speaker's
rigid template. Taking each observed landmark back into the head frame gives how far that
point of the face moved away from the template in that frame; the face field, evaluated at
the template points, is trained to predict exactly that offset from the frame's audio and
blink (``guide_loss``). It is cheap (no rendering: a few hundred points a frame), so it runs
on large batches of frames, and the photometric loss then refines what the pixels show.

Lifting: the observed pixel (u, v) of landmark j is back-projected at the depth the
template point has in that frame's camera (x_cam = R x + t, OpenCV, +z forward), then moved
into the head frame by the inverse pose. Depth changes the 2D detector cannot see are
therefore not taught; the lips open and close mostly across the view, which it does see.
"""

from __future__ import annotations

import numpy as np
import torch


def canonical_offsets(landmarks: np.ndarray, viewmats: np.ndarray, K: np.ndarray, template: np.ndarray
                      ) -> np.ndarray:
    """(N, P, 3) head-frame offsets of each frame's landmarks from the template.

    ``landmarks`` (N, P, 2+) pixels; ``viewmats`` (N, 4, 4) head-to-camera; ``K`` (3, 3);
    ``template`` (P, 3) head-frame points.
    """
    rotations, translations = viewmats[:, :3, :3].astype(np.float64), viewmats[:, :3, 3].astype(np.float64)
    depth = (np.einsum("nij,pj->npi", rotations, template) + translations[:, None])[..., 2]
    pixels = np.concatenate([landmarks[..., :2], np.ones_like(landmarks[..., :1])], axis=-1).astype(np.float64)
    in_camera = (pixels @ np.linalg.inv(K.astype(np.float64)).T) * depth[..., None]
    in_head = np.einsum("nji,npj->npi", rotations, in_camera - translations[:, None])
    return (in_head - template).astype(np.float32)


def guide_loss(predicted: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean squared error of predicted vs observed offsets (B, P, 3), relative to ``scale``
    (the clip's mean squared offset): 1 for a field that predicts no motion at all, so the
    weight of this loss means the same for every speaker and scene unit."""
    return (predicted - target).square().mean() / scale
