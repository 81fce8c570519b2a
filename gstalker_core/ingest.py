"""Ingest: a speaker video (local path or s3:// URL) -> validated 25 fps face-centred crop
frames at the profile's resolution + 16 kHz mono audio, stored as the ``ingest`` stage.

Stage parts: ``frames_<chunk>.npz`` (see ``gstalker_core.frames``), ``audio.wav``
(16 kHz mono PCM s16). Stage meta: ``IngestManifest``.
"""

from __future__ import annotations

from pydantic import BaseModel

STAGE = "ingest"
CODE_VERSION = "1"


class CropBox(BaseModel):
    """One square crop for the whole clip, in source pixels (top-left corner and side)."""

    x: int
    y: int
    size: int


class IngestManifest(BaseModel):
    source_name: str
    source_sha256: str
    source_width: int
    source_height: int
    source_fps: float
    source_duration_s: float
    source_pix_fmt: str
    fps: int
    n_frames: int
    resolution: int
    crop: CropBox
    audio_sample_rate: int
    audio_duration_s: float
    chunk_frames: int
    face_detected_fraction: float
    warnings: list[str]
