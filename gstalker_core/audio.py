"""Audio features: librosa log-mel (or MFCC) at 50 Hz, two steps per 25 fps video frame.

Alignment: step j covers [20j, 20j+20) ms and is centred at 20j+10 ms, so video frame i
(covering [40i, 40i+40) ms) owns steps 2i and 2i+1. The temporal-smoothing module sees,
for frame i, a window of ``step_window`` steps centred on the frame's own two steps.

The extractor and every parameter that changes the numbers are kept in
``AudioFeatureSpec``, stored with the features and with every model; features are only
ever fed to a model whose spec is equal (``check_spec``).
"""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import soundfile
from pydantic import BaseModel, ConfigDict

from .config import AudioConfig, PipelineConfig
from .errors import InputError
from .storage import ArtifactStore, StageManifest, StageRun, content_key, fetch_part, run_stage

STAGE = "audio"
CODE_VERSION = "1"
STEPS_PER_SECOND = 50
STEPS_PER_FRAME = 2
# Loudness normalisation target: speakers and microphones differ by tens of dB; the
# model should see speech content, not recording gain.
TARGET_ACTIVE_RMS = 0.1
ACTIVE_DB_BELOW_PEAK = 40.0


class AudioFeatureSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    extractor: str
    extractor_version: str
    kind: str
    n_features: int
    sample_rate: int
    hop_length: int
    n_fft: int
    fmin: float
    fmax: float
    steps_per_frame: int = STEPS_PER_FRAME


class AudioFeaturesMeta(BaseModel):
    spec: AudioFeatureSpec
    n_steps: int
    n_frames: int
    duration_s: float


def spec_for(cfg: AudioConfig, sample_rate: int) -> AudioFeatureSpec:
    return AudioFeatureSpec(
        extractor="librosa", extractor_version=librosa.__version__, kind=cfg.kind, n_features=cfg.n_features,
        sample_rate=sample_rate, hop_length=sample_rate // STEPS_PER_SECOND, n_fft=cfg.n_fft, fmin=cfg.fmin,
        fmax=min(cfg.fmax, sample_rate / 2),
    )


def check_spec(have: AudioFeatureSpec, want: AudioFeatureSpec, what: str = "these features") -> None:
    """Refuse features made differently from what a model was trained on."""
    if have != want:
        diff = {k: (getattr(have, k), getattr(want, k)) for k in type(want).model_fields if getattr(have, k) != getattr(want, k)}
        detail = ", ".join(f"{k}: {a!r} (model expects {b!r})" for k, (a, b) in diff.items())
        raise InputError(f"{what} were extracted differently from the model's audio features: {detail}",
                         "extract features with the model's own spec (the dub command does this) or retrain the model")


def normalise_loudness(samples: np.ndarray) -> np.ndarray:
    """Scale so the RMS of the active (non-silent) part is TARGET_ACTIVE_RMS."""
    frame_rms = librosa.feature.rms(y=samples, frame_length=1024, hop_length=256)[0]
    peak = float(frame_rms.max(initial=0.0))
    if peak <= 1e-6:
        return samples  # digital silence: nothing to normalise (callers decide if that is an error)
    active = frame_rms[frame_rms >= peak * 10 ** (-ACTIVE_DB_BELOW_PEAK / 20)]
    gain = TARGET_ACTIVE_RMS / float(np.sqrt(np.mean(active**2)))
    return (samples * gain).astype(np.float32)


def compute_features(samples: np.ndarray, spec: AudioFeatureSpec, n_frames: int | None = None) -> np.ndarray:
    """[n_steps, n_features] float32 features of mono ``samples`` at ``spec.sample_rate``.

    ``n_steps`` is ``2 * n_frames`` when given (the video's length rules), else
    ``ceil(duration * 25) * 2`` so that every started video frame has its two steps.
    """
    samples = normalise_loudness(np.asarray(samples, dtype=np.float32))
    hop = spec.hop_length
    if n_frames is None:
        n_frames = max(1, int(np.ceil(len(samples) / (hop * STEPS_PER_FRAME))))
    n_steps = n_frames * STEPS_PER_FRAME
    # librosa centres frame j at sample j*hop; dropping hop/2 samples centres it at (j+0.5)*hop.
    shifted = samples[hop // 2:]
    shifted = np.pad(shifted, (0, max(0, n_steps * hop - len(shifted))))
    mel = librosa.feature.melspectrogram(y=shifted, sr=spec.sample_rate, n_fft=spec.n_fft, hop_length=hop,
                                         n_mels=spec.n_features if spec.kind == "logmel" else 80,
                                         fmin=spec.fmin, fmax=spec.fmax, center=True)
    # Fixed reference (not the clip's max) so that loudness-normalised speech maps to the same range
    # in training clips and in dubbing audio.
    logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    feats = logmel if spec.kind == "logmel" else librosa.feature.mfcc(S=logmel, n_mfcc=spec.n_features)
    feats = feats.T[:n_steps]
    if len(feats) < n_steps:  # pad the tail with the last step (only possible by rounding)
        feats = np.concatenate([feats, np.repeat(feats[-1:], n_steps - len(feats), axis=0)])
    return np.ascontiguousarray(feats, dtype=np.float32)


def frame_windows(features: np.ndarray, frame_indices: np.ndarray | list[int], step_window: int) -> np.ndarray:
    """[len(frame_indices), step_window, n_features]: each frame's steps window, edge-padded."""
    frames = np.asarray(frame_indices, dtype=np.int64)
    half = step_window // 2
    # steps 2i-(half-1) .. 2i+1+(half-1): the frame's own steps 2i, 2i+1 sit in the middle
    offsets = np.arange(-(half - 1), half + 1)
    idx = np.clip(frames[:, None] * STEPS_PER_FRAME + offsets[None, :], 0, len(features) - 1)
    return features[idx]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    samples, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return samples.mean(axis=1), sample_rate


def stage_key(ingest_run: StageManifest, cfg: PipelineConfig) -> str:
    return content_key(STAGE, CODE_VERSION, cfg.audio, {"ingest": ingest_run.key})


def run(store: ArtifactStore, ingest_run: StageManifest, cfg: PipelineConfig) -> StageRun:
    """The ``audio`` stage: features of the ingested clip's audio, one row pair per video frame."""
    from . import ingest  # ingest imports mediapipe; only this stage entry needs it

    def build(workdir: Path) -> dict:
        samples, sample_rate = read_wav(ingest.audio_path(store, ingest_run, cfg.cache_dir))
        spec = spec_for(cfg.audio, sample_rate)
        n_frames = ingest_run.meta["n_frames"]
        feats = compute_features(samples, spec, n_frames=n_frames)
        np.save(workdir / "features.npy", feats)
        return AudioFeaturesMeta(spec=spec, n_steps=len(feats), n_frames=n_frames,
                                 duration_s=len(samples) / sample_rate).model_dump(mode="json")

    return run_stage(store, stage=STAGE, code_version=CODE_VERSION, config=cfg.audio,
                     inputs={"ingest": ingest_run.key}, build=build, cache_dir=cfg.cache_dir)


def load_features(store: ArtifactStore, audio_run: StageManifest, cache_dir: Path,
                  expected: AudioFeatureSpec | None = None) -> np.ndarray:
    """The stored features, after checking their spec against ``expected`` (a model's)."""
    meta = AudioFeaturesMeta.model_validate(audio_run.meta)
    if expected is not None:
        check_spec(meta.spec, expected, what=f"stored features {audio_run.key}")
    return np.load(fetch_part(store, audio_run, "features.npy", cache_dir))
