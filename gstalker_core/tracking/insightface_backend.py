"""insightface as a landmark backend: the SCRFD face detector and the 2d106det landmark model,
106 points in 2D (``topology.INSIGHTFACE106``; z is zero).

The two ONNX files come from an insightface model pack (``buffalo_l``: ``det_10g.onnx`` and
``2d106det.onnx``; ``buffalo_s``/``buffalo_sc`` hold ``det_500m.onnx``) that the user copied
into ``track.model_dir``. insightface's ``model_zoo.get_model`` loads each by path with
onnxruntime (downloads stay off), on the CUDA provider when the device is a GPU and the
installed onnxruntime has it, else on the CPU: the points do not depend on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..model_files import import_optional, require_files
from .topology import INSIGHTFACE106

LANDMARKS_FILE = "2d106det.onnx"
DETECTOR_PATTERN = "det_*.onnx"
DETECT_SIZE = (320, 320)  # the detector's input: the ingest crop is centred on one large face
USER = "track.landmark_backend=insightface"


def weight_files(folder: Path, setting: str) -> list[Path]:
    """[detector, landmark model] in ``folder``."""
    detectors = sorted(folder.glob(DETECTOR_PATTERN))
    if len(detectors) > 1:
        raise ConfigError(f"{setting}={str(folder)!r} holds {len(detectors)} face detectors "
                          f"({', '.join(p.name for p in detectors)}); {USER} reads one",
                          f"keep one {DETECTOR_PATTERN} file (buffalo_l's det_10g.onnx, for instance) in {folder}")
    names = [detectors[0].name if detectors else "det_10g.onnx", LANDMARKS_FILE]
    return require_files(folder, names, setting, USER)


def _providers(device: str) -> list:
    import onnxruntime

    if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _wrong_model(path: Path, what: str, found: str) -> ConfigError:
    return ConfigError(f"{path} is not {what}: {found}",
                       f"put the model pack's own {path.name} in {path.parent} (see the README, 'Optional backends')")


class InsightFace106:
    name = "insightface"
    topology = INSIGHTFACE106
    batch_frames = 1  # the ONNX sessions take one image at a time

    def __init__(self, files: list[Path], device: str, min_confidence: float, setting: str):
        import_optional("onnxruntime", "onnxruntime", USER)
        model_zoo = import_optional("insightface.model_zoo", "insightface", USER)
        from insightface.app.common import Face
        from insightface.model_zoo.landmark import Landmark
        from insightface.model_zoo.scrfd import SCRFD

        detector_file, landmarks_file = files
        providers = _providers(str(device))
        self._face = Face
        self._detector = model_zoo.get_model(str(detector_file), providers=providers)
        if not isinstance(self._detector, SCRFD):
            raise _wrong_model(detector_file, "an SCRFD face detector (5 or more outputs)",
                               f"insightface reads it as {type(self._detector).__name__}")
        self._landmarks = model_zoo.get_model(str(landmarks_file), providers=providers)
        if not isinstance(self._landmarks, Landmark):
            raise _wrong_model(landmarks_file, "a landmark model with a 192x192 input",
                               f"insightface reads it as {type(self._landmarks).__name__}")
        if (self._landmarks.lmk_num, self._landmarks.lmk_dim) != (INSIGHTFACE106.n_points, 2):
            raise _wrong_model(landmarks_file, "the 106-point 2D model",
                               f"it gives {self._landmarks.lmk_num} points in {self._landmarks.lmk_dim}D")
        self._min_confidence = min_confidence

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        return [self._detect(np.ascontiguousarray(frame[..., ::-1])) for frame in frames]  # insightface reads BGR

    def _detect(self, bgr: np.ndarray) -> np.ndarray | None:
        boxes, keypoints = self._detector.detect(bgr, input_size=DETECT_SIZE, max_num=1,
                                                 det_thresh=self._min_confidence)
        if len(boxes) == 0:
            return None
        face = self._face(bbox=boxes[0, :4], det_score=boxes[0, 4],
                          kps=None if keypoints is None else keypoints[0])
        points = self._landmarks.get(bgr, face) + 0.5  # cv2's pixel centres sit at integers, ours at +0.5
        return np.concatenate([points, np.zeros((len(points), 1))], axis=1).astype(np.float32)

    def close(self) -> None:
        self._detector = self._landmarks = None
