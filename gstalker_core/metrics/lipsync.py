"""Lip metrics that need no downloaded weights, from MediaPipe FaceMesh landmarks (478 points).

Used by evaluation (rendered vs ground-truth frames) and by tests that check that the
mouth follows the audio.
"""

from __future__ import annotations

import numpy as np

# FaceMesh topology (the 40 points of FACEMESH_LIPS; inner-lip midpoints and mouth corners).
MOUTH_POINTS = np.array([0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191,
                         267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415])
UPPER_INNER_LIP, LOWER_INNER_LIP = 13, 14
LEFT_MOUTH_CORNER, RIGHT_MOUTH_CORNER = 61, 291


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap over mouth width, per frame: (N, 478, 2+) -> (N,). Scale-free."""
    gap = np.linalg.norm(landmarks[:, UPPER_INNER_LIP, :2] - landmarks[:, LOWER_INNER_LIP, :2], axis=-1)
    width = np.linalg.norm(landmarks[:, LEFT_MOUTH_CORNER, :2] - landmarks[:, RIGHT_MOUTH_CORNER, :2], axis=-1)
    return gap / np.maximum(width, 1e-6)


def mouth_landmark_distance(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance of the mouth points after centring each frame's mouth, in pixels of the
    frames the landmarks were found on: a landmarker's error at a smaller resolution is not
    a smaller one at 512 px, so no rescaling."""
    def centred(lm: np.ndarray) -> np.ndarray:
        mouth = lm[:, MOUTH_POINTS, :2]
        return mouth - mouth.mean(axis=1, keepdims=True)

    return float(np.linalg.norm(centred(predicted) - centred(truth), axis=-1).mean())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two series; 0 when either is constant (no information, not a match)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 1e-12 else 0.0


def audio_energy_per_frame(samples: np.ndarray, sample_rate: int, n_frames: int, fps: int = 25) -> np.ndarray:
    """RMS loudness (dB) of the audio under each video frame."""
    per_frame = sample_rate // fps
    padded = np.zeros(n_frames * per_frame, np.float64)
    take = min(len(samples), len(padded))
    padded[:take] = samples[:take]
    rms = np.sqrt((padded.reshape(n_frames, per_frame) ** 2).mean(axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-5))


def landmark_jitter(landmarks: np.ndarray) -> float:
    """Mean magnitude of frame-to-frame acceleration of the landmarks (pixels/frame^2)."""
    if len(landmarks) < 3:
        return 0.0
    accel = landmarks[2:, :, :2] - 2 * landmarks[1:-1, :, :2] + landmarks[:-2, :, :2]
    return float(np.linalg.norm(accel, axis=-1).mean())
