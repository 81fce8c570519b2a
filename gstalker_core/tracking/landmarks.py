"""Face landmarks behind a small backend interface.

A backend finds one face per frame and returns, per frame, ``None`` (no face) or a float32
(P, 3) array in its model's own topology (``topology.py``): x, y in pixels (pixel centres at
integer + 0.5, the image's top-left corner at 0, 0) and z a relative depth in the same pixel
units, larger = farther from the camera, zero near the head centre (zero everywhere for a 2D
model). Downstream code reads the points through the backend's ``topology`` groups.

Backends: mediapipe FaceMesh (the default; its model ships inside the mediapipe wheel),
face-alignment's 3D-FAN and insightface's 2d106det. The last two read their weights from
``track.model_dir`` (never downloaded) and live in their own modules, which import their
packages only when chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ..config import TrackConfig
from ..mediapipe_models import solutions
from ..model_files import model_folder
from .topology import FACEMESH, Topology

MODEL_DIR_SETTING = "track.model_dir"


class LandmarkBackend(Protocol):
    """Stateful per-clip detector: ``detect_batch`` on consecutive frames, then ``close``."""

    name: str  # the track.landmark_backend value
    topology: Topology
    batch_frames: int  # frames per detect_batch call: 1 for a tracker that follows the face frame to frame

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[np.ndarray | None]: ...

    def close(self) -> None: ...


class MediapipeFaceMesh:
    """mediapipe FaceMesh, video mode (tracks between frames), irises refined: 478 points."""

    name = "mediapipe"
    topology = FACEMESH
    batch_frames = 1

    def __init__(self, cfg: TrackConfig):
        self._mesh = solutions().face_mesh.FaceMesh(
            static_image_mode=False, max_num_faces=1, refine_landmarks=True,
            min_detection_confidence=cfg.min_detection_confidence, min_tracking_confidence=0.5)

    def detect(self, frame: np.ndarray) -> np.ndarray | None:
        found = self._mesh.process(np.ascontiguousarray(frame)).multi_face_landmarks
        if not found:
            return None
        h, w = frame.shape[:2]
        pts = np.array([(p.x, p.y, p.z) for p in found[0].landmark], dtype=np.float32)
        # mediapipe's x, y are fractions of the image side measured from its corner, so x*w
        # is already the corner-origin pixel coordinate; z is scaled like x.
        return pts * np.array([w, h, w], dtype=np.float32)

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        return [self.detect(frame) for frame in frames]

    def close(self) -> None:
        self._mesh.close()


def _backend_user(cfg: TrackConfig) -> str:
    return f"track.landmark_backend={cfg.landmark_backend}"


def weight_files(cfg: TrackConfig) -> list[Path]:
    """The optional backend's weight files in ``cfg.model_dir`` (none for mediapipe, whose model
    is part of its package); a ConfigError when the folder or a file is missing."""
    if cfg.landmark_backend == "mediapipe":
        return []
    folder = model_folder(cfg.model_dir, MODEL_DIR_SETTING, _backend_user(cfg))
    if cfg.landmark_backend == "face_alignment":
        from . import face_alignment_backend

        return face_alignment_backend.weight_files(folder, MODEL_DIR_SETTING)
    from . import insightface_backend

    return insightface_backend.weight_files(folder, MODEL_DIR_SETTING)


def make_backend(cfg: TrackConfig, device: str = "cpu") -> LandmarkBackend:
    """The configured detector; ``device``: where a torch or ONNX backend runs (``cpu``, ``cuda[:N]``)."""
    if cfg.landmark_backend == "mediapipe":
        return MediapipeFaceMesh(cfg)
    files = weight_files(cfg)
    if cfg.landmark_backend == "face_alignment":
        from .face_alignment_backend import FaceAlignment3D

        return FaceAlignment3D(files, device, MODEL_DIR_SETTING)
    from .insightface_backend import InsightFace106

    return InsightFace106(files, device, cfg.min_detection_confidence, MODEL_DIR_SETTING)
