"""Lip metrics that need no downloaded weights, from face landmarks of any topology
(``tracking.topology``: evaluation's own landmarker is FaceMesh's).

Used by evaluation (rendered vs ground-truth frames) and by tests that check that the
mouth follows the audio.
"""

from __future__ import annotations

import numpy as np

from ..tracking.topology import Topology


def mouth_opening(landmarks: np.ndarray, topology: Topology) -> np.ndarray:
    """Inner-lip gap over mouth width, per frame: (N, P, 2+) -> (N,). Scale-free."""
    (upper, lower), (left, right) = topology.lip_gap, topology.mouth_corners
    gap = np.linalg.norm(landmarks[:, upper, :2] - landmarks[:, lower, :2], axis=-1)
    width = np.linalg.norm(landmarks[:, left, :2] - landmarks[:, right, :2], axis=-1)
    return gap / np.maximum(width, 1e-6)


def mouth_landmark_distance(predicted: np.ndarray, truth: np.ndarray, topology: Topology) -> float:
    """Mean distance of the mouth points after centring each frame's mouth, in pixels of the
    frames the landmarks were found on: a landmarker's error at a smaller resolution is not
    a smaller one at 512 px, so no rescaling."""
    points = topology.mouth

    def centred(lm: np.ndarray) -> np.ndarray:
        mouth = lm[:, points, :2]
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


def lagged(opening: np.ndarray, energy: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (opening at frame t + lag, energy at t) where a face was found (opening not NaN);
    positive lags: the mouth follows the sound that many frames later."""
    n = min(len(opening), len(energy))
    idx = np.arange(max(0, -lag), min(n, n - lag))
    a, b = np.asarray(opening, np.float64)[idx + lag], np.asarray(energy, np.float64)[idx]
    keep = ~np.isnan(a)
    return a[keep], b[keep]


def best_lag_correlation(opening: np.ndarray, energy: np.ndarray, lags: tuple[int, ...] = (-2, -1, 0, 1, 2)
                         ) -> tuple[float, int]:
    """The mouth opening's correlation with loudness at the lag (of ``lags``) where it is highest, and
    that lag (the first of ``lags`` on a tie: with no face found every r is 0)."""
    by_lag = {lag: pearson(*lagged(opening, energy, lag)) for lag in lags}
    best = max(lags, key=by_lag.__getitem__)
    return by_lag[best], best


def correlation_standard_error(a: np.ndarray, b: np.ndarray, block: int = 25, rounds: int = 1000,
                               seed: int = 0) -> float:
    """Standard error of ``pearson(a, b)`` by a moving-block bootstrap: resampled series made of
    random runs of ``block`` consecutive pairs (25 frames: one second). Neighbouring frames of a
    mouth and of speech are far from independent, so a pair-by-pair bootstrap (or 1/sqrt(n))
    would claim a precision that a 20 s dub does not have."""
    n = len(a)
    if n < 2 * block:
        return float("nan")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - block + 1, size=(rounds, -(-n // block)))
    picks = (starts[:, :, None] + np.arange(block)).reshape(rounds, -1)[:, :n]
    return float(np.std([pearson(a[p], b[p]) for p in picks]))


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
