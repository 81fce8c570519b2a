"""A trained speaker's Gaussians as standard 3DGS .ply files, for splat viewers and 3D tools.

- ``head.ply``: the head Gaussians, undeformed, in the head's canonical frame;
- ``torso.ply``: the torso Gaussians, undeformed, in camera space;
- with an audio file and a time: ``head_at_<t>s.ply``, the head deformed as the dub of that
  audio shows it at that time (the frame under the time, with the blink of the pose track
  the dub would use there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from . import media
from .config import PipelineConfig
from .dub import dub_audio, dub_frames, dub_source, lip_motion
from .dub_motion import pose_track_indices
from .errors import InputError
from .model.bundle import Bundle
from .runtime import configure
from .speakers import load_speaker
from .storage import ArtifactStore
from .storage.uploads import fetch_media, resolve_media

HEAD, TORSO = "head.ply", "torso.ply"


class ExportResult(BaseModel):
    speaker: str
    files: list[Path]
    frame: int | None = None  # the dub frame of the deformed head, when one was asked for


def deformed_head_name(at_s: float) -> str:
    return f"head_at_{at_s:g}s.ply"


def export_speaker(store: ArtifactStore, speaker: str, out_dir: Path, cfg: PipelineConfig,
                   at_s: float | None = None, audio: str | None = None) -> ExportResult:
    """Write ``speaker``'s head and torso .ply into ``out_dir``, and with ``audio`` (a local
    path, s3:// URL or store key) and ``at_s`` (seconds into it) the head deformed there.
    Every input is checked before a file is written."""
    if (at_s is None) != (audio is None):
        raise InputError("a time needs an audio file and an audio file a time: --at and --audio go together",
                         "give both (also the head deformed at that time of the audio) or neither")
    if at_s is not None and at_s < 0:
        raise InputError(f"--at {at_s:g} is before the audio's start", "give seconds from the audio's start, 0 or more")
    bundle = load_speaker(store, speaker, cfg.cache_dir)
    deformed = _deformed_head(bundle, store, audio, at_s, cfg) if audio is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [bundle.model.head.export_ply(out_dir / HEAD), bundle.model.torso.export_ply(out_dir / TORSO)]
    if deformed is None:
        return ExportResult(speaker=speaker, files=files)
    frame, head = deformed
    files.append(head.export_ply(out_dir / deformed_head_name(at_s)))
    return ExportResult(speaker=speaker, files=files, frame=frame)


@torch.no_grad()
def _deformed_head(bundle: Bundle, store: ArtifactStore, audio: str, at_s: float, cfg: PipelineConfig):
    """(dub frame, head Gaussians deformed there as a dub shows them) of ``audio`` at ``at_s`` seconds."""
    path = fetch_media(resolve_media(store, audio, cfg), cfg)
    media.probe(path)  # empty / missing / not media: a clear message
    scratch = cfg.cache_dir / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    heard = dub_audio(bundle, path, cfg.dub, scratch, cfg.audio.model_dir)
    if at_s > heard.duration_s:
        raise InputError(f"--at {at_s:g} s is past the end of {path.name} ({heard.duration_s:.2f} s)",
                         f"give a time from 0 to {heard.duration_s:.2f} s")
    frame = min(int(at_s * bundle.manifest.fps), heard.n_frames - 1)  # the frame shown at that time
    model = bundle.model.to(configure(cfg.runtime))
    source = dub_source(bundle, heard)
    pose = pose_track_indices(heard.n_frames, len(bundle.viewmats), cfg.dub.pose_stretch)[[frame]]
    head, _ = dub_frames(model, source, np.array([frame]), pose, lip=lip_motion(bundle, source, cfg.dub))
    return frame, model.head.with_geometry(head.means[0], head.quats[0], head.log_scales[0])
