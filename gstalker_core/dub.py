"""Dubbing: a trained speaker says any audio -> an H.264 + AAC mp4, streamed.

1. The audio (any file ffmpeg reads, or a video's sound track) is decoded at the model's
   feature sample rate to a temporary wav and turned into features with the model's own
   extractor spec, reading that wav in blocks: only the features are ever whole in memory.
2. The training pose and blink track is extended to the audio's length by ping-pong.
3. Frames are rendered ``chunk_frames`` at a time and piped to ffmpeg as they come, with
   the audio muxed: memory does not grow with the audio's length; the output has
   ceil(duration x 25) frames.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
from pydantic import BaseModel

from . import media
from .audio import SPEECH_MODEL, AudioFeatureSpec, Signal, check_spec, compute_features, speaking, spec_for
from .model.avatar import GaussianState
from .model.bundle import Bundle
from .data.conditions import FrameSource
from .config import AudioConfig, DubConfig, PipelineConfig
from .errors import InputError
from .dub_motion import pose_track_indices
from .speakers import load_speaker, lookup
from .storage import ArtifactStore, content_key, sha256_file
from .storage.uploads import fetch_media, resolve_media
from .runtime import configure
from .model.lip_gain import utterance_motion
from .model.talking_head import CanonicalCodes, LipMotion, TalkingHead

Progress = Callable[[int, Optional[int]], None]
SILENCE_DBFS = -60.0
CODE_BLOCK = 1000  # frames of audio codes computed at once (lip_motion)


class DubManifest(BaseModel):
    audio_name: str
    audio_duration_s: float
    n_frames: int
    fps: int
    resolution: int
    render_s: float  # deformation + rasterisation + compositing + encoding
    wall_s: float
    lip_gain: float  # the utterance's gain on the audio-driven motion (model.lip_gain)


def load_audio(path: Path, sample_rate: int, cfg: DubConfig, workdir: Path) -> Signal:
    """The audio decoded into ``workdir``, after the checks that give a clear message for unusable audio."""
    info = media.probe(path)
    if not info.has_audio:
        raise InputError(f"{path.name} has no audio track", "give an audio file (wav, mp3, m4a, ...) or a video with sound")
    if info.duration_s > cfg.max_duration_s:
        raise InputError(f"{path.name} lasts {info.duration_s / 60:.1f} min; the limit is {cfg.max_duration_s / 60:g} min",
                         "split the audio into parts, or raise dub.max_duration_s")
    # float samples, as ffmpeg decodes them: features read the file twice (loudness, then log-mel)
    signal = Signal.of_wav(media.extract_audio(path, workdir / "audio.wav", sample_rate, codec="pcm_f32le"))
    duration = signal.duration_s
    if duration < cfg.min_duration_s:
        raise InputError(f"{path.name} lasts {duration:.2f} s; dubbing needs at least {cfg.min_duration_s:g} s",
                         "give a longer audio clip")
    peak = 20 * np.log10(max(signal.peak(), 1e-10))
    if peak < SILENCE_DBFS:
        raise InputError(f"{path.name} is silent (peak {peak:.0f} dBFS)",
                         "check the file and the channel that holds the speech")
    return signal


class DubAudio(NamedTuple):
    features: np.ndarray  # (2 * n_frames, spec width), the model's extractor spec
    duration_s: float
    n_frames: int  # ceil(duration x fps)
    speaking: np.ndarray  # (n_frames,) 1 where the voice speaks, 0 in its pauses (audio.speaking)


def installed_spec(spec: AudioFeatureSpec, speech_model_dir: str = "") -> AudioFeatureSpec:
    """The spec this install's extractor gives for ``spec``'s parameters: librosa's version, or
    the speech model now in ``speech_model_dir`` (its type and files digest)."""
    if spec.kind == SPEECH_MODEL:
        return spec_for(AudioConfig(kind=spec.kind, model_dir=speech_model_dir), spec.sample_rate)
    return spec_for(AudioConfig(kind=spec.kind, n_features=spec.n_features, n_fft=spec.n_fft, fmin=spec.fmin,
                                fmax=spec.fmax, normalise=spec.normalise, loudness=spec.loudness),
                    spec.sample_rate)


def dub_audio(bundle: Bundle, audio_path: Path, cfg: DubConfig, scratch: Path, speech_model_dir: str = ""
              ) -> DubAudio:
    """``audio_path`` as the model hears it: checked, decoded in a temporary folder under
    ``scratch`` (gone once featurised) and turned into features with the model's own spec.
    ``speech_model_dir``: the local speech model, for a model trained on speech-model features."""
    spec = bundle.manifest.audio_spec
    # the installed extractor must produce what the model was trained on
    check_spec(installed_spec(spec, speech_model_dir), spec,
               what="the model's audio features (this install's extractor)")
    device = str(next(bundle.model.parameters()).device)
    with tempfile.TemporaryDirectory(dir=scratch) as workdir:
        signal = load_audio(audio_path, spec.sample_rate, cfg, Path(workdir))
        n_frames = math.ceil(signal.duration_s * bundle.manifest.fps)
        features = compute_features(signal, spec, n_frames=n_frames, model_dir=speech_model_dir, device=device)
        return DubAudio(features, signal.duration_s, n_frames, speaking(signal, n_frames, bundle.manifest.fps))


def dub_source(bundle: Bundle, heard: DubAudio) -> FrameSource:
    """The per-frame inputs of a dub of ``heard`` on the model's device: the training pose
    track and torso shifts, the new audio's features and pauses."""
    return FrameSource.build(bundle.viewmats, bundle.blink, bundle.K, bundle.plate,
                             next(bundle.model.parameters()).device, heard.features,
                             torso_shift=bundle.torso_shift, speaking=heard.speaking)


@torch.no_grad()
def dub(bundle: Bundle, audio_path: Path, out: Path, cfg: DubConfig, progress: Progress | None = None,
        pose_track: np.ndarray | None = None, speech_model_dir: str = "") -> DubManifest:
    """Render ``bundle`` saying ``audio_path`` into ``out`` (written only when complete);
    ``speech_model_dir``: see ``dub_audio``."""
    start = time.perf_counter()
    fps = bundle.manifest.fps
    heard = dub_audio(bundle, audio_path, cfg, Path(out).parent, speech_model_dir)
    n_frames = heard.n_frames
    n_train = len(bundle.viewmats)
    track = pose_track if pose_track is not None else pose_track_indices(n_frames, n_train, cfg.pose_stretch)
    if len(track) < n_frames:
        raise InputError(f"the pose track has {len(track)} frames, the audio needs {n_frames}",
                         "give a pose track at least as long as the audio")
    model, size = bundle.model, bundle.manifest.resolution
    source = dub_source(bundle, heard)
    render_start = time.perf_counter()
    lip = lip_motion(bundle, source, cfg)
    with media.VideoWriter(out, size, size, fps, audio=audio_path) as writer:
        for images, done in video_frames(model, source, track, n_frames, cfg.chunk_frames, lip):
            for image in images:
                writer.write(image)
            if progress:
                progress(done, n_frames)
    return DubManifest(audio_name=Path(audio_path).name, audio_duration_s=heard.duration_s, n_frames=n_frames,
                       fps=fps, resolution=size, render_s=time.perf_counter() - render_start,
                       wall_s=time.perf_counter() - start, lip_gain=lip.gain)


@torch.no_grad()
def lip_motion(bundle: Bundle, source: FrameSource, cfg: DubConfig) -> LipMotion:
    """The lip motion of the whole utterance in ``source.features``: ``cfg.lip_gain`` when set,
    else the speaker's calibrated gain x this utterance's factor (``model.lip_gain``). The
    audio codes are computed in blocks of ``CODE_BLOCK`` frames: memory stays flat for any length."""
    encoder, n_frames = bundle.model.audio_encoder, len(source.features) // 2
    codes = torch.cat([encoder.conditions(source.features, first, min(first + CODE_BLOCK, n_frames))
                       for first in range(0, n_frames, CODE_BLOCK)])
    return utterance_motion(bundle.model, codes, bundle.manifest.lip_gain, cfg.lip_gain)


@torch.no_grad()
def video_frames(model: TalkingHead, source: FrameSource, track: np.ndarray, n_frames: int, chunk_frames: int,
                 lip: LipMotion | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """The dub's frames as (B, H, W, 3) uint8 chunks of ``chunk_frames``, each with the number of
    frames done: frame i says audio step i at training pose ``track[i]``, with ``lip``'s gain.
    The canonical Gaussians' codes are computed once: only the audio and eye conditions change
    per frame."""
    codes = model.canonical_codes()
    for first in range(0, n_frames, chunk_frames):
        frames = np.arange(first, min(first + chunk_frames, n_frames))
        yield (render_chunk(model, source, frames, track[frames], codes, lip) * 255).round().byte().cpu().numpy(), \
            int(frames[-1]) + 1


def dub_frames(model: TalkingHead, source: FrameSource, frames: np.ndarray, poses: np.ndarray,
               codes: CanonicalCodes | None = None, lip: LipMotion | None = None
               ) -> tuple[GaussianState, GaussianState]:
    """Deformed head and torso states of dub frames ``frames``: their audio at the training
    poses (and torso latents) ``poses``; ``codes``: the model's ``canonical_codes()``,
    computed once per dub; ``lip``: the utterance's ``lip_motion``."""
    return model.frames(source.conditions(model, frames, poses=poses, track=poses), codes=codes, lip=lip)


def render_chunk(model: TalkingHead, source: FrameSource, frames: np.ndarray, poses: np.ndarray,
                 codes: CanonicalCodes | None = None, lip: LipMotion | None = None) -> torch.Tensor:
    """(B, H, W, 3) frames in [0, 1] of ``dub_frames``, one rasteriser call per layer."""
    head, torso = dub_frames(model, source, frames, poses, codes, lip)
    return source.render(head, torso, poses).rgb.clamp(0, 1)


class DubResult(BaseModel):
    key: str  # the mp4 in the store
    cache_hit: bool
    manifest: DubManifest | None


# 2: the lip gain around the utterance's mean motion (model.lip_gain); 3: the mouth rests in pauses;
# 4: an utterance's last frame, too short for an RMS frame of its own, no longer reads as a pause
DUB_VERSION = "4"


def output_key(speaker: str, bundle_key: str, audio_sha256: str, cfg: DubConfig) -> str:
    key = content_key("dub", DUB_VERSION, cfg, {"bundle": bundle_key, "audio": audio_sha256})
    return f"renders/{speaker}/{key}.mp4"


def run(store: ArtifactStore, speaker: str, audio_source: str, cfg: PipelineConfig, progress: Progress | None = None
        ) -> DubResult:
    """Dub ``audio_source`` (local path, s3:// URL or a key in the store) with ``speaker``'s model into the store, unless already there."""
    entry = lookup(store, speaker)
    path = fetch_media(resolve_media(store, audio_source, cfg), cfg)
    media.probe(path)  # empty / missing / not media: a clear message before hashing
    key = output_key(speaker, entry.bundle_key, sha256_file(path), cfg.dub)
    if store.exists(key):
        return DubResult(key=key, cache_hit=True, manifest=None)
    bundle = load_speaker(store, speaker, cfg.cache_dir)
    bundle.model.to(configure(cfg.runtime))
    work = cfg.cache_dir / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    local = work / Path(key).name
    try:
        manifest = dub(bundle, path, local, cfg.dub, progress, speech_model_dir=cfg.audio.model_dir)
        store.put_file(key, local)  # visible only once complete
    finally:
        local.unlink(missing_ok=True)
    return DubResult(key=key, cache_hit=False, manifest=manifest)
