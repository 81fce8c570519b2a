"""Tracking and parsing: landmarks, 3DMM-free head pose, blink, labels, background plate.

Core: ``track_clip(frames, TrackConfig, workdir)`` on any sequence of square RGB uint8
frames. Stage: ``run(store, ingest_run, cfg)``. Training data: ``open_dataset``.

Names resolve lazily, so importing the package (e.g. for ``stage_key`` in the Prefect
tasks) does not load mediapipe and torch. ``TrackConfig`` lives in ``gstalker_core.config``.
"""

from importlib import import_module

_EXPORTS = {
    "TrackConfig": "..config",
    "TrackManifest": ".track", "FrameRange": ".track", "track_clip": ".track", "QA_VIDEO": ".track", "PLATE": ".track",
    "SpeakerDataset": "..data.dataset", "Sample": "..data.dataset", "TrackArrays": "..data.dataset",
    "compose_targets": ".parsing", "BACKGROUND": ".parsing", "HEAD": ".parsing", "NECK": ".parsing",
    "TORSO": ".parsing",
    "write_qa_video": ".qa",
    "STAGE": ".stage", "CODE_VERSION": ".stage", "stage_key": ".stage", "run": ".stage", "manifest_of": ".stage",
    "open_dataset": ".stage",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
