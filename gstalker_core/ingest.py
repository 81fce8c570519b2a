"""Ingest: a speaker video (local path or s3:// URL) -> validated 25 fps face-centred crop
frames at the profile's resolution + 16 kHz mono audio, stored as the ``ingest`` stage.

Two streaming passes over the source, so memory is bounded whatever its length and size:
1. face detection (mediapipe) on every ``detect_every``-th frame at ``detect_width`` px
   picks one square crop for the whole clip (a moving crop would move the camera);
2. the crop is decoded at 25 fps, scaled to ``resolution`` and written in chunks.

Stage parts: ``frames_<chunk>.mkv`` (H.264-in-RGB or FFV1 video chunks, see
``gstalker_core.data.frames``) and ``audio.wav`` (16 kHz mono PCM s16). Stage meta:
``IngestManifest``. Stages stored before video chunks (``frames_<chunk>.npz``) are still
read; their key differs (the codec settings are part of the ingest config), so a new run
builds the new form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import soundfile
from pydantic import BaseModel

from . import media
from .config import IngestConfig, PipelineConfig
from .errors import InputError
from .data.frames import ChunkReader, ChunkWriter, VideoCodec
from .mediapipe_models import solutions
from .storage.uploads import fetch_media
from .storage import ArtifactStore, StageManifest, StageRun, StageWork, fetch_part, fetch_stage, run_stage, sha256_file

STAGE = "ingest"
CODE_VERSION = "1"
FRAMES = "frames"
AUDIO = "audio.wav"

Progress = Callable[[int, Optional[int]], None]


class CropBox(BaseModel):
    """One square crop for the whole clip, in source display pixels (top-left corner and side)."""

    x: int
    y: int
    size: int


class IngestManifest(BaseModel):
    source_name: str
    source_sha256: str
    source_width: int
    source_height: int
    source_fps: float
    source_variable_frame_rate: bool
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


# -- source ------------------------------------------------------------------------------

def work(source_sha256: str, cfg: PipelineConfig) -> StageWork:
    """The ingest of a source with these bytes' hash: the ingest config and code version."""
    return StageWork(STAGE, CODE_VERSION, cfg.ingest, {"source": source_sha256})


def stage_key(source: str, cfg: PipelineConfig) -> str:
    """Content key of the ingest of ``source`` (local path or s3:// URL)."""
    return work(sha256_file(_checked_file(fetch_media(source, cfg))), cfg).key


def _checked_file(path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file", "check the path of the speaker video")
    return path


# -- validation and crop -------------------------------------------------------------------

def validate(info: media.MediaInfo, cfg: IngestConfig) -> list[str]:
    """Refuse unusable sources; return warnings for usable but unusual ones."""
    name = info.path.name
    if not info.has_video:
        raise InputError(f"{name} has no video stream", "ingest needs the speaker's video, not an audio file")
    if not info.has_audio:
        raise InputError(f"{name} has no audio stream",
                         "the model learns lip motion from the speech: provide the video with its sound track")
    if info.duration_s < cfg.min_duration_s:
        raise InputError(f"{name} is {info.duration_s:.2f} s long; this profile needs at least {cfg.min_duration_s:g} s",
                         "provide a longer clip (3-5 minutes of speech is ideal) or lower ingest.min_duration_s")
    if info.duration_s > cfg.max_duration_s:
        raise InputError(f"{name} is {info.duration_s:.0f} s long; the limit is {cfg.max_duration_s:g} s",
                         "trim the clip (3-5 minutes of speech is enough) or raise ingest.max_duration_s")
    warnings = []
    if info.variable_frame_rate:
        warnings.append(f"variable frame rate (average {info.fps:.2f} fps): resampled to a constant {cfg.fps} fps")
    elif abs(info.fps - cfg.fps) > 0.01:
        warnings.append(f"source is {info.fps:.2f} fps: resampled to {cfg.fps} fps")
    return warnings


def _ranges(frames: list[int], step: int = 1) -> str:
    """'3-7, 12' style summary of sorted frame indices sampled every ``step`` frames."""
    spans: list[list[int]] = []
    for f in frames:
        if spans and f - spans[-1][1] <= step:
            spans[-1][1] = f
        else:
            spans.append([f, f])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans[:12])
    return text + (f" and {len(spans) - 12} more" if len(spans) > 12 else "")


def find_crop(path: Path, info: media.MediaInfo, cfg: IngestConfig, progress: Progress | None = None
              ) -> tuple[CropBox, float, list[str]]:
    """One square crop centred on the dominant face; (box, fraction of samples with a face, warnings)."""
    det_w = cfg.detect_width
    det_h = max(2, int(round(det_w * info.height / info.width / 2)) * 2)
    expected = max(1, int(info.duration_s * cfg.fps))
    faces: dict[int, np.ndarray] = {}  # sampled frame -> (k, 5) [cx, cy, w, h, score] in source px
    sampled: list[int] = []
    with solutions().face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5) as detector:
        for i, frame in enumerate(media.stream_frames(path, cfg.fps, det_w, det_h)):
            if progress:
                progress(i + 1, expected)
            if i % cfg.detect_every:
                continue
            sampled.append(i)
            found = detector.process(frame).detections or []
            boxes = []
            for d in found:
                b = d.location_data.relative_bounding_box
                boxes.append([(b.xmin + b.width / 2) * info.width, (b.ymin + b.height / 2) * info.height,
                              b.width * info.width, b.height * info.height, d.score[0]])
            if boxes:
                faces[i] = np.asarray(boxes)
    if not sampled:
        raise InputError(f"{path.name}: no frame could be decoded", "the file is corrupt: re-export or re-upload it")
    missing = [i for i in sampled if i not in faces]
    fraction = 1 - len(missing) / len(sampled)
    if not faces:
        raise InputError(f"{path.name}: no face found in any of {len(sampled)} sampled frames",
                         "provide a video of one speaker facing the camera, face clearly visible")
    if len(missing) / len(sampled) > cfg.max_missing_face_fraction:
        raise InputError(f"{path.name}: no face found in {len(missing)} of {len(sampled)} sampled frames "
                         f"(frames {_ranges(missing, cfg.detect_every)} at {cfg.fps} fps)",
                         "trim those stretches from the clip, or raise ingest.max_missing_face_fraction")
    # Dominant face: the largest face of each frame votes for a centre; in every frame we
    # then keep the face nearest that centre, so a second person never steals the crop.
    largest = np.stack([b[np.argmax(b[:, 2] * b[:, 3])] for b in faces.values()])
    centre = np.median(largest[:, :2], axis=0)
    chosen = np.stack([b[np.argmin(np.linalg.norm(b[:, :2] - centre, axis=1))] for b in faces.values()])
    warnings = []
    crowded = [i for i, b in faces.items() if len(b) > 1]  # sorted: dict keeps frame order
    if crowded:
        warnings.append(f"more than one face in frames {_ranges(crowded, cfg.detect_every)}: cropping the dominant speaker "
                        f"(face centred near x={centre[0]:.0f}, y={centre[1]:.0f})")
    if missing:
        warnings.append(f"no face detected in sampled frames {_ranges(missing, cfg.detect_every)}")
    cx, cy = np.median(chosen[:, 0]), np.median(chosen[:, 1])
    face = float(np.median(np.maximum(chosen[:, 2], chosen[:, 3])))
    side = cfg.crop_scale * face
    cy += cfg.crop_center_y * face
    limit = min(info.width, info.height)
    if side > limit:
        warnings.append(f"the face fills the frame: crop reduced from {side:.0f} to {limit} px (less shoulder room)")
        side = limit
    side = int(side) // 2 * 2
    x = int(np.clip(round(cx - side / 2), 0, info.width - side)) // 2 * 2
    y = int(np.clip(round(cy - side / 2), 0, info.height - side)) // 2 * 2
    if side < cfg.resolution:
        warnings.append(f"the face crop is only {side} px, upscaled to {cfg.resolution} px: the model will look soft; "
                        "film closer or use a higher-resolution source")
    return CropBox(x=x, y=y, size=side), fraction, warnings


# -- the stage -----------------------------------------------------------------------------

def build_ingest(path: Path, cfg: IngestConfig, workdir: Path, source_sha256: str,
                 progress: Progress | None = None) -> IngestManifest:
    """Write the cropped frames and the audio of ``path`` into ``workdir``."""
    info = media.probe(path)
    warnings = validate(info, cfg)
    crop, fraction, crop_warnings = find_crop(path, info, cfg, progress)
    writer = ChunkWriter(workdir, FRAMES, cfg.chunk_frames, VideoCodec(cfg.frame_codec, cfg.frame_crf))
    expected = max(1, int(round(info.duration_s * cfg.fps)))
    for i, frame in enumerate(media.stream_frames(path, cfg.fps, cfg.resolution, cfg.resolution,
                                                   crop=(crop.x, crop.y, crop.size, crop.size))):
        writer.write(frame)
        if progress:
            progress(i + 1, expected)
    n_frames = writer.close()
    if n_frames < 0.9 * expected - 2:
        raise InputError(f"{path.name}: only {n_frames} of the {expected} frames its header promises could be decoded",
                         "the file is truncated or corrupt: re-export or re-upload it")
    wav = media.extract_audio(path, workdir / AUDIO, cfg.audio_sample_rate)
    audio_duration = soundfile.info(str(wav)).duration
    if audio_duration < 0.5 * n_frames / cfg.fps:
        raise InputError(f"{path.name}: its audio lasts {audio_duration:.2f} s but the video {n_frames / cfg.fps:.2f} s",
                         "re-export the clip with its full sound track")
    return IngestManifest(
        source_name=path.name, source_sha256=source_sha256, source_width=info.width, source_height=info.height,
        source_fps=info.fps, source_variable_frame_rate=info.variable_frame_rate, source_duration_s=info.duration_s,
        source_pix_fmt=info.pix_fmt, fps=cfg.fps, n_frames=n_frames, resolution=cfg.resolution, crop=crop,
        audio_sample_rate=cfg.audio_sample_rate, audio_duration_s=audio_duration, chunk_frames=cfg.chunk_frames,
        face_detected_fraction=fraction, warnings=warnings + crop_warnings)


def run(store: ArtifactStore, source: str, cfg: PipelineConfig, progress: Progress | None = None) -> StageRun:
    """The ``ingest`` stage of ``source`` (local path or s3:// URL), built unless already stored."""
    path = _checked_file(fetch_media(source, cfg))
    media.probe(path)  # fail on an empty or non-media file before hashing it
    digest = sha256_file(path)
    return run_stage(store, work(digest, cfg),
                     lambda workdir: build_ingest(path, cfg.ingest, workdir, digest, progress).model_dump(mode="json"),
                     cfg.cache_dir)


def manifest_of(ingest_run: StageManifest) -> IngestManifest:
    return IngestManifest.model_validate(ingest_run.meta)


def open_frames(store: ArtifactStore, ingest_run: StageManifest, cache_dir: Path) -> ChunkReader:
    """Streaming reader of the clip's RGB uint8 (R, R, 3) frames."""
    meta = manifest_of(ingest_run)
    parts = {name: path for name, path in fetch_stage(store, ingest_run, cache_dir).items() if name != AUDIO}
    return ChunkReader.from_parts(parts, FRAMES, meta.chunk_frames, meta.n_frames, (meta.resolution, meta.resolution))


def audio_path(store: ArtifactStore, ingest_run: StageManifest, cache_dir: Path) -> Path:
    """Local path of the clip's 16 kHz mono WAV."""
    return fetch_part(store, ingest_run, AUDIO, cache_dir)
