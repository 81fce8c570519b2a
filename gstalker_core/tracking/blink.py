"""Eye blink from landmarks: eye aspect ratio, normalised per clip (no OpenFace)."""

from __future__ import annotations

import numpy as np

from .topology import Topology


def eye_aspect_ratio(landmarks: np.ndarray, topology: Topology) -> np.ndarray:
    """(N,) mean over both eyes of (|p2-p6| + |p3-p5|) / (2 |p1-p4|) from (N, P, >=2) landmarks."""
    ratios = []
    for eye in topology.eyes:
        p = landmarks[:, eye, :2]
        vertical = np.linalg.norm(p[:, 1] - p[:, 5], axis=-1) + np.linalg.norm(p[:, 2] - p[:, 4], axis=-1)
        ratios.append(vertical / np.maximum(2 * np.linalg.norm(p[:, 0] - p[:, 3], axis=-1), 1e-6))
    return np.mean(ratios, axis=0)


def normalise_blink(ear: np.ndarray, valid: np.ndarray, open_pct: float = 90.0, closed_pct: float = 2.0
                    ) -> tuple[np.ndarray, float, float]:
    """Eye closure in [0, 1] (0 = eyes as open as usual, 1 = as closed as the clip gets).

    Percentiles, not min/max: a mis-tracked frame must not define the scale. People blink
    in a few % of frames, so the 2nd percentile is a closed eye and the 90th an open one.
    Returns (closure, open EAR, closed EAR).
    """
    ref = ear[valid] if valid.any() else ear
    open_ear, closed_ear = (float(np.percentile(ref, open_pct)), float(np.percentile(ref, closed_pct)))
    span = max(open_ear - closed_ear, 1e-6)
    return np.clip((open_ear - ear) / span, 0.0, 1.0).astype(np.float32), open_ear, closed_ear
