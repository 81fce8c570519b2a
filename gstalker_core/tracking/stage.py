"""The ``track`` stage: ingest frames -> landmarks, poses, intrinsics, blink, labels, plate, QA video.

Stage parts: ``labels_<chunk>.npz`` (chunked like the frames), the arrays named in
``track`` (viewmats.npy, K.npy, landmarks.npy, blink.npy, valid.npy, mouth_covered.npy, template.npy),
plate.png, qa.mp4. Stage meta: ``TrackManifest``.

An optional landmark backend's weights are an input of the stage: their digest enters the
key, so new weights in the same ``track.model_dir`` rerun tracking (mediapipe's model is part
of its pinned package and adds nothing, which keeps the default keys as they were).
"""

from __future__ import annotations

from pathlib import Path

from .. import ingest
from ..config import PipelineConfig
from ..data.frames import ChunkReader
from ..storage import ArtifactStore, StageManifest, StageRun, StageWork, fetch_stage, run_stage
from ..data.dataset import SpeakerDataset, TrackArrays
from ..model_files import files_digest
from ..runtime import select_device
from .landmarks import weight_files
from .track import LABELS, Progress, TrackManifest, track_clip

STAGE = "track"
CODE_VERSION = "3"  # 2: mouth_covered.npy; 3: torso_shift.npy


def work(ingest_run: StageManifest, cfg: PipelineConfig) -> StageWork:
    inputs = {"ingest": ingest_run.key}
    weights = weight_files(cfg.track)
    if weights:
        inputs["landmark_model"] = files_digest(weights)
    return StageWork(STAGE, CODE_VERSION, cfg.track, inputs)


def stage_key(ingest_run: StageManifest, cfg: PipelineConfig) -> str:
    return work(ingest_run, cfg).key


def run(store: ArtifactStore, ingest_run: StageManifest, cfg: PipelineConfig, progress: Progress | None = None
        ) -> StageRun:
    """The ``track`` stage of an ingested clip, built unless already stored."""
    meta = ingest.manifest_of(ingest_run)

    def build(workdir: Path) -> dict:
        frames = ingest.open_frames(store, ingest_run, cfg.cache_dir)
        # mediapipe runs on the CPU whatever runtime.device says
        device = "cpu" if cfg.track.landmark_backend == "mediapipe" else str(select_device(cfg.runtime))
        manifest = track_clip(frames, cfg.track, workdir, progress, fps=meta.fps, chunk_frames=meta.chunk_frames,
                              device=device)
        return manifest.model_dump(mode="json")

    return run_stage(store, work(ingest_run, cfg), build, cfg.cache_dir)


def manifest_of(track_run: StageManifest) -> TrackManifest:
    return TrackManifest.model_validate(track_run.meta)


def open_dataset(store: ArtifactStore, track_run: StageManifest, ingest_run: StageManifest, cache_dir: Path,
                 **dataset_options) -> SpeakerDataset:
    """A ``SpeakerDataset`` over the stored frames and tracks (options: see ``SpeakerDataset``)."""
    meta = manifest_of(track_run)
    parts = fetch_stage(store, track_run, cache_dir)
    labels = ChunkReader.from_parts(parts, LABELS, meta.chunk_frames, meta.n_frames)
    return SpeakerDataset(ingest.open_frames(store, ingest_run, cache_dir), labels, meta, TrackArrays.load(parts),
                          **dataset_options)
