"""Import mediapipe quietly: its bundled models (FaceDetection, FaceMesh, SelfieSegmentation)
run offline, but its TFLite/absl/protobuf start-up chatter would bury our own messages."""

from __future__ import annotations

import os
import warnings
from types import ModuleType


def solutions() -> ModuleType:
    """``mediapipe.solutions`` with log noise silenced."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mediapipe as mp
    warnings.filterwarnings("ignore", message=r"SymbolDatabase\.GetPrototype\(\) is deprecated")
    return mp.solutions
