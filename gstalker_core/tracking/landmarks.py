"""Face landmarks behind a small backend interface, and the FaceMesh index sets we use.

Every backend returns, per frame, ``None`` (no face) or a float32 (478, 3) array in the
FaceMesh topology: x, y in pixels (pixel centres at integer + 0.5, the image's top-left
corner at 0, 0) and z a relative depth in the same pixel units, larger = farther from the
camera, zero near the head centre. Downstream code (pose, blink, parsing) indexes this
topology, so an alternative detector must map its points onto it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ConfigError
from ..mediapipe_models import solutions
from ..config import TrackConfig

N_LANDMARKS = 478

# Rigid points: nose bridge and tip, eye corners, forehead, cheekbones, temples. Not the
# lips or jaw (speech), not the eyelids (blinks), not the brows (expression), not irises.
STABLE = np.array(sorted({
    1, 4, 5, 6, 168, 197, 195, 98, 327,                       # nose
    33, 133, 362, 263,                                        # eye corners
    10, 151, 9, 8, 108, 337, 67, 297, 109, 338, 103, 332,     # forehead
    116, 345, 117, 346, 123, 352, 50, 280, 101, 330,          # cheekbones
    118, 347, 119, 348, 47, 277, 100, 329, 126, 355,          # under the eyes
    127, 356, 234, 454, 21, 251, 162, 389, 139, 368,          # temples
}))
# Face oval, in order around the face (mediapipe FACEMESH_FACE_OVAL as a loop from the top).
FACE_OVAL = np.array([10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
                      152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109])
# Jaw line from the (image-)left jaw angle to the right one, through the chin. It stops at
# the angles (not at the ears): the head/neck boundary continues flat from there, so the
# ears, which hang below the top of the jaw, stay head.
JAW = np.array([58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288])
CHIN, FOREHEAD = 152, 10
# Outer lip contour, in order around the mouth (mediapipe FACEMESH_LIPS, outer loop).
OUTER_LIPS = np.array([61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185])
# Cheekbones and the skin under the eyes: bare skin that a hand over the mouth rarely reaches.
CHEEK_SKIN = np.array([50, 280, 118, 347, 101, 330])
# Eye-aspect-ratio points: corner, upper, upper, corner, lower, lower (both eyes).
EYES = (np.array([33, 160, 158, 133, 153, 144]), np.array([362, 385, 387, 263, 373, 380]))
OUTER_EYE_CORNERS = (33, 263)


class LandmarkBackend(Protocol):
    """Stateful per-clip detector: call ``detect`` on consecutive frames, then ``close``."""

    def detect(self, frame: np.ndarray) -> np.ndarray | None: ...

    def close(self) -> None: ...


class MediapipeFaceMesh:
    """mediapipe FaceMesh, video mode (tracks between frames), irises refined: 478 points."""

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

    def close(self) -> None:
        self._mesh.close()


def make_backend(cfg: TrackConfig) -> LandmarkBackend:
    """The configured detector. Optional backends only read weights from ``cfg.model_dir``."""
    if cfg.landmark_backend == "mediapipe":
        return MediapipeFaceMesh(cfg)
    if not cfg.model_dir or not Path(cfg.model_dir).expanduser().is_dir():
        raise ConfigError(
            f"track.landmark_backend={cfg.landmark_backend} needs its weights in a local folder, "
            f"but track.model_dir={cfg.model_dir!r} is not a directory",
            "set track.model_dir to the folder holding the model files (they are never downloaded), "
            "or use track.landmark_backend=mediapipe")
    raise ConfigError(
        f"track.landmark_backend={cfg.landmark_backend}: mapping its landmarks onto the 478-point FaceMesh "
        "topology that pose, blink and parsing need is not available in this version",
        "use track.landmark_backend=mediapipe")
