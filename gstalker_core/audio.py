"""Audio features: librosa log-mel (or MFCC) at 50 Hz, two steps per 25 fps video frame.

Log-mel's columns are the ``n_features`` mel bands, then (``audio.loudness``) the step's
loudness: the dB of the bands' mean power, gated and normalised per utterance as the bands are.
The bands carry a voice's timbre; the loudness is the cue every voice shares, and training's
frequency masks never hide it, so the lips learn to lean on it (``FrameSource.draw_hidden_bands``).

Alignment: step j covers [20j, 20j+20) ms and is centred at 20j+10 ms, so video frame i
(covering [40i, 40i+40) ms) owns steps 2i and 2i+1. The temporal-smoothing module sees,
for frame i, a window of ``step_window`` steps centred on the frame's own two steps.

The extractor and every parameter that changes the numbers are kept in
``AudioFeatureSpec``, stored with the features and with every model; features are only
ever fed to a model whose spec is equal (``check_spec``).

Audio of any length is read as a ``Signal``, block by block, and turned into features
``CHUNK_STEPS`` at a time (with the STFT's overlap carried between chunks), so samples and
spectrogram are never whole in memory; only the features (about 58 MB per hour) are.

``kind=speech_model`` hands both steps to ``speech_features`` (a local HuBERT/wav2vec2 model),
which imports transformers only then.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import librosa
import numpy as np
import soundfile
from pydantic import BaseModel, ConfigDict, Field

from .config import AudioConfig, PipelineConfig
from .errors import InputError
from .storage import ArtifactStore, StageManifest, StageRun, StageWork, fetch_part, run_stage

STAGE = "audio"
CODE_VERSION = "4"  # 2: per-utterance normalisation, pitch-shifted training versions; 3: noise gate; 4: loudness column
AUGMENTED = "augmented.npy"
STEPS_PER_SECOND = 50
STEPS_PER_FRAME = 2
SPEECH_MODEL = "speech_model"  # the kind computed by a local HuBERT/wav2vec2 model (speech_features), not librosa
# Loudness normalisation target: speakers and microphones differ by tens of dB; the
# model should see speech content, not recording gain.
TARGET_ACTIVE_RMS = 0.1
ACTIVE_DB_BELOW_PEAK = 40.0
SILENCE_DB_BELOW_PEAK = 50.0  # normalise_utterance's noise gate
RMS_FRAME, RMS_HOP = 1024, 256  # frames the loudness statistics are taken over
# A pause: RMS frames more than this under the utterance's loudest. Speech's quiet consonants sit
# 20-30 dB under its vowels, a clean recording's pauses 40-60 dB under them, a noisy one's may not
# fall this far at all (then it never pauses, and the mouth moves as the field says)
PAUSE_DB_BELOW_PEAK = 35.0
MIN_PAUSE_FRAMES = 3  # video frames (120 ms at 25 fps): a shorter quiet stretch inside the speech is not a pause
BLOCK_SAMPLES = 1 << 16  # read granularity of a Signal
# Frames per chunk (feature steps: ~41 s at 50 Hz): large enough that per-call overhead is nil, small
# enough that a chunk's samples, spectrogram and librosa's framed copies are a few MB, whatever the length.
CHUNK_STEPS = 2048


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
    normalise: str = "none"  # stores from before normalisation was offered lack it
    loudness: bool = False  # one more column after the bands: the step's loudness (stores from before lack it)
    # a speech model's type and files digest (speech_features); empty, and left out of the dump, for librosa's
    model: str = Field(default="", exclude_if=lambda v: not v)

    @property
    def width(self) -> int:
        """Columns of the features: the bands (or coefficients), then the loudness where there is one."""
        return self.n_features + int(self.loudness)


class AudioFeaturesMeta(BaseModel):
    spec: AudioFeatureSpec
    n_steps: int
    n_frames: int
    duration_s: float
    augment_semitones: list[float] = []  # the pitch-shifted versions in ``augmented.npy``, in order


def spec_for(cfg: AudioConfig, sample_rate: int) -> AudioFeatureSpec:
    if cfg.kind == SPEECH_MODEL:
        from .speech_features import speech_model_spec

        return speech_model_spec(cfg.model_dir, sample_rate)
    return AudioFeatureSpec(
        extractor="librosa", extractor_version=librosa.__version__, kind=cfg.kind, n_features=cfg.n_features,
        sample_rate=sample_rate, hop_length=sample_rate // STEPS_PER_SECOND, n_fft=cfg.n_fft, fmin=cfg.fmin,
        fmax=min(cfg.fmax, sample_rate / 2), normalise=cfg.normalise, loudness=cfg.loudness,
    )


def check_spec(have: AudioFeatureSpec, want: AudioFeatureSpec, what: str = "these features") -> None:
    """Refuse features made differently from what a model was trained on."""
    if have != want:
        diff = {k: (getattr(have, k), getattr(want, k)) for k in type(want).model_fields if getattr(have, k) != getattr(want, k)}
        detail = ", ".join(f"{k}: {a!r} (model expects {b!r})" for k, (a, b) in diff.items())
        raise InputError(f"{what} were extracted differently from the model's audio features: {detail}",
                         "extract features with the model's own spec (the dub command does this) or retrain the model")


@dataclass(frozen=True)
class Signal:
    """Mono float32 audio that can be read (again and again) as consecutive blocks.

    Feature extraction reads it twice (loudness, then log-mel), never holding it whole.
    """

    n_samples: int
    sample_rate: int
    blocks: Callable[[], Iterator[np.ndarray]]

    @classmethod
    def of_array(cls, samples: np.ndarray, sample_rate: int, block: int = BLOCK_SAMPLES) -> "Signal":
        samples = np.asarray(samples, dtype=np.float32)
        return cls(len(samples), sample_rate, lambda: (samples[i:i + block] for i in range(0, len(samples), block)))

    @classmethod
    def of_wav(cls, path: Path, block: int = BLOCK_SAMPLES) -> "Signal":
        """A sound file read ``block`` samples at a time, channels averaged to mono."""
        info = soundfile.info(str(path))

        def blocks() -> Iterator[np.ndarray]:
            for data in soundfile.blocks(str(path), blocksize=block, dtype="float32", always_2d=True):
                yield data.mean(axis=1)

        return cls(info.frames, info.samplerate, blocks)

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.sample_rate

    def peak(self) -> float:
        """Largest absolute sample value."""
        return max((float(np.abs(block).max()) for block in self.blocks() if len(block)), default=0.0)


@dataclass(frozen=True)
class _Framing:
    """Frame j is ``y[j * hop : j * hop + length]``, where y is ``lead`` zeros, then the signal
    without its first ``skip`` samples, then zeros for ever (librosa's ``center=True`` is lead = length // 2)."""

    length: int
    hop: int
    lead: int
    skip: int = 0


class _SampleReader:
    """Exactly ``n`` samples per read from a stream of blocks of any size."""

    def __init__(self, blocks: Iterator[np.ndarray]):
        self._blocks = blocks
        self._rest = np.zeros(0, np.float32)

    def read(self, n: int) -> np.ndarray:
        parts, have = [self._rest], len(self._rest)
        while have < n:
            block = next(self._blocks)
            parts.append(block)
            have += len(block)
        joined = np.concatenate(parts)
        self._rest = joined[n:]
        return joined[:n]


def _framed_stream(signal: Signal, framing: _Framing) -> Iterator[np.ndarray]:
    """The y of ``framing`` as blocks; endless, the frame count decides where to stop."""
    yield np.zeros(framing.lead, np.float32)
    skip = framing.skip
    for block in signal.blocks():
        drop = min(skip, len(block))
        skip -= drop
        yield block[drop:]
    while True:
        yield np.zeros(BLOCK_SAMPLES, np.float32)


def _frame_pieces(signal: Signal, framing: _Framing, n_frames: int, chunk_frames: int) -> Iterator[np.ndarray]:
    """Per chunk of ``chunk_frames`` consecutive frames (of ``n_frames``), the samples that hold exactly
    those frames, for librosa to frame with ``center=False``.

    Consecutive pieces repeat the frames' overlap, so per-frame results equal the whole signal's.
    """
    reader = _SampleReader(_framed_stream(signal, framing))
    carry = np.zeros(0, np.float32)  # the head of the next piece, already read
    for first in range(0, n_frames, chunk_frames):
        count = min(chunk_frames, n_frames - first)
        length = (count - 1) * framing.hop + framing.length
        piece = np.concatenate([carry, reader.read(length - len(carry))])
        yield piece
        advance = count * framing.hop
        carry = piece[advance:]
        reader.read(max(0, advance - length))  # frames shorter than the hop leave gaps: skip them


def _frame_rms(signal: Signal) -> np.ndarray:
    """RMS of the ``RMS_FRAME``-sample frames centred every ``RMS_HOP`` samples (librosa's centred framing)."""
    n_frames = 1 + signal.n_samples // RMS_HOP
    pieces = _frame_pieces(signal, _Framing(RMS_FRAME, RMS_HOP, lead=RMS_FRAME // 2), n_frames, CHUNK_STEPS)
    return np.concatenate([librosa.feature.rms(y=piece, frame_length=RMS_FRAME, hop_length=RMS_HOP,
                                               center=False)[0] for piece in pieces])


def _within(frame_rms: np.ndarray, db_below_peak: float) -> np.ndarray:
    """Which RMS frames lie within ``db_below_peak`` dB of the loudest."""
    return frame_rms >= frame_rms.max(initial=0.0) * 10 ** (-db_below_peak / 20)


def loudness_gain(signal: Signal) -> float:
    """Gain that brings the RMS of the active (non-silent) part to TARGET_ACTIVE_RMS; 1 for digital silence."""
    frame_rms = _frame_rms(signal)
    if frame_rms.max(initial=0.0) <= 1e-6:
        return 1.0  # digital silence: nothing to normalise (callers decide if that is an error)
    active = frame_rms[_within(frame_rms, ACTIVE_DB_BELOW_PEAK)]
    return TARGET_ACTIVE_RMS / float(np.sqrt(np.mean(active**2)))


def speaking(signal: Signal, n_frames: int, fps: int) -> np.ndarray:
    """(n_frames,) float32 in [0, 1] per video frame: 1 where the voice speaks, 0 in its pauses
    (where the mouth rests: ``model.lip_gain``). A frame speaks when any of its RMS frames lies
    within ``PAUSE_DB_BELOW_PEAK`` of the loudest; a quiet stretch shorter than
    ``MIN_PAUSE_FRAMES`` inside the speech is a stop or a short breath and stays speech; each
    edge of a pause ramps over one frame, so the mouth closes and opens in two steps."""
    frame_rms = _frame_rms(signal)
    voiced = np.zeros(n_frames, bool)
    if frame_rms.max(initial=0.0) > 1e-6:
        # frame i holds the RMS frames centred in it, [ceil(i sr / (fps hop)), the next frame's first);
        # one too short to hold a centre (an utterance's last, a few ms long) takes the next centre's
        firsts = -(-np.arange(n_frames) * signal.sample_rate // (fps * RMS_HOP))
        voiced = np.logical_or.reduceat(_within(frame_rms, PAUSE_DB_BELOW_PEAK),
                                        np.minimum(firsts, len(frame_rms) - 1))
    edges = np.flatnonzero(np.diff(np.concatenate([[True], voiced, [True]]).astype(np.int8)))
    for start, stop in zip(edges[::2], edges[1::2]):  # the pauses: [start, stop)
        if stop - start < MIN_PAUSE_FRAMES and start > 0 and stop < n_frames:
            voiced[start:stop] = True
    ramp = np.ones(3, np.float32) / 3
    return np.convolve(np.pad(voiced.astype(np.float32), 1, mode="edge"), ramp, mode="valid").astype(np.float32)


def _piece_features(piece: np.ndarray, spec: AudioFeatureSpec) -> np.ndarray:
    """[steps, spec.width] of a piece holding exactly those steps' STFT frames."""
    mel = librosa.feature.melspectrogram(y=piece, sr=spec.sample_rate, n_fft=spec.n_fft, hop_length=spec.hop_length,
                                         n_mels=spec.n_features if spec.kind == "logmel" else 80,
                                         fmin=spec.fmin, fmax=spec.fmax, center=False)
    # Fixed reference (not the clip's max) so that loudness-normalised speech maps to the same range
    # in training clips and in dubbing audio.
    logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    feats = logmel if spec.kind == "logmel" else librosa.feature.mfcc(S=logmel, n_mfcc=spec.n_features)
    if spec.loudness:  # the bands' mean power: never above the loudest band, so the noise gate's peak stays a band's
        feats = np.vstack([feats, librosa.power_to_db(mel.mean(axis=0), ref=1.0, amin=1e-10, top_db=None)])
    return feats.T


def compute_features(samples: np.ndarray | Signal, spec: AudioFeatureSpec, n_frames: int | None = None,
                     chunk_steps: int = CHUNK_STEPS, model_dir: str = "", device: str = "cpu") -> np.ndarray:
    """[n_steps, spec.width] float32 features of mono ``samples`` at ``spec.sample_rate``, loudness-normalised.

    ``n_steps`` is ``2 * n_frames`` when given (the video's length rules), else
    ``ceil(duration * 25) * 2`` so that every started video frame has its two steps.
    Computed ``chunk_steps`` at a time; the result does not depend on it (to float rounding).
    A speech model's features (``speech_features``) need its folder, ``model_dir``, and run on ``device``.
    """
    signal = samples if isinstance(samples, Signal) else Signal.of_array(samples, spec.sample_rate)
    hop = spec.hop_length
    if n_frames is None:
        n_frames = max(1, int(np.ceil(signal.n_samples / (hop * STEPS_PER_FRAME))))
    n_steps = n_frames * STEPS_PER_FRAME
    if spec.kind == SPEECH_MODEL:
        from .speech_features import speech_model_features

        return speech_model_features(signal, spec, n_steps, model_dir, device)
    gain = loudness_gain(signal)
    # librosa centres frame j at sample j*hop; dropping hop/2 samples centres it at (j+0.5)*hop.
    framing = _Framing(spec.n_fft, hop, lead=spec.n_fft // 2, skip=hop // 2)
    feats = np.empty((n_steps, spec.width), np.float32)
    for first, piece in zip(range(0, n_steps, chunk_steps), _frame_pieces(signal, framing, n_steps, chunk_steps)):
        feats[first:first + chunk_steps] = _piece_features(piece * gain, spec)
    if spec.normalise == "utterance":
        feats = normalise_utterance(feats)
    return feats


def normalise_utterance(feats: np.ndarray) -> np.ndarray:
    """Each feature minus its mean, over its standard deviation, both taken over the utterance's
    speech steps (loudest band energy within ``ACTIVE_DB_BELOW_PEAK`` dB of the loudest step's,
    so that pauses do not set the scale). A voice's timbre and a microphone's colour are a
    constant offset per band in log-mel; the mouth's movement is the part that changes."""
    # a noise gate: what lies far below the utterance's peak is silence, whatever its level. A
    # broadcast's pauses sit 40-65 dB below its peak, a synthetic voice's digital silence 120 dB:
    # unfloored, those pauses would land far outside anything the model trained on.
    feats = np.maximum(feats, feats.max(initial=0.0) - SILENCE_DB_BELOW_PEAK)
    loudness = feats.max(axis=1)
    speech = feats[loudness >= loudness.max(initial=0.0) - ACTIVE_DB_BELOW_PEAK]
    if len(speech) < 2:  # silence or a single step: nothing to estimate from
        speech = feats
    mean, std = speech.mean(axis=0), speech.std(axis=0)
    return ((feats - mean) / np.maximum(std, 1e-3)).astype(np.float32)


def pitch_shifted_features(samples: np.ndarray, spec: AudioFeatureSpec, n_frames: int,
                           semitones: list[float], model_dir: str = "", device: str = "cpu") -> np.ndarray:
    """(len(semitones), steps, spec.width): ``compute_features`` of the audio shifted by each
    number of semitones, frame-aligned with the original (librosa's shift keeps the duration)."""
    return np.stack([compute_features(librosa.effects.pitch_shift(samples, sr=spec.sample_rate, n_steps=shift),
                                      spec, n_frames=n_frames, model_dir=model_dir, device=device)
                     for shift in semitones])


def frame_windows(features: np.ndarray, frame_indices: np.ndarray | list[int], step_window: int) -> np.ndarray:
    """[len(frame_indices), step_window, width]: each frame's steps window, edge-padded."""
    frames = np.asarray(frame_indices, dtype=np.int64)
    half = step_window // 2
    # steps 2i-(half-1) .. 2i+1+(half-1): the frame's own steps 2i, 2i+1 sit in the middle
    offsets = np.arange(-(half - 1), half + 1)
    idx = np.clip(frames[:, None] * STEPS_PER_FRAME + offsets[None, :], 0, len(features) - 1)
    return features[idx]


def work(ingest_run: StageManifest, cfg: PipelineConfig) -> StageWork:
    inputs = {"ingest": ingest_run.key}
    if cfg.audio.kind == SPEECH_MODEL:  # new weights in the same folder must rerun the stage
        from .speech_features import read_folder

        inputs["speech_model"] = read_folder(cfg.audio.model_dir).identity
    return StageWork(STAGE, CODE_VERSION, cfg.audio, inputs)


def stage_key(ingest_run: StageManifest, cfg: PipelineConfig) -> str:
    return work(ingest_run, cfg).key


def run(store: ArtifactStore, ingest_run: StageManifest, cfg: PipelineConfig) -> StageRun:
    """The ``audio`` stage: features of the ingested clip's audio, one row pair per video frame."""
    from . import ingest  # ingest imports mediapipe; only this stage entry needs it
    from .runtime import select_device

    # where a speech model is and runs (librosa's kinds run on the CPU whatever runtime.device says)
    device = str(select_device(cfg.runtime)) if cfg.audio.kind == SPEECH_MODEL else "cpu"
    extractor = dict(model_dir=cfg.audio.model_dir, device=device)

    def build(workdir: Path) -> dict:
        signal = Signal.of_wav(ingest.audio_path(store, ingest_run, cfg.cache_dir))
        spec = spec_for(cfg.audio, signal.sample_rate)
        n_frames = ingest_run.meta["n_frames"]
        feats = compute_features(signal, spec, n_frames=n_frames, **extractor)
        np.save(workdir / "features.npy", feats)
        if cfg.audio.augment_semitones:  # a training clip is minutes long: its samples fit in memory
            samples = np.concatenate(list(signal.blocks()))
            np.save(workdir / AUGMENTED, pitch_shifted_features(samples, spec, n_frames, cfg.audio.augment_semitones,
                                                                **extractor))
        return AudioFeaturesMeta(spec=spec, n_steps=len(feats), n_frames=n_frames, duration_s=signal.duration_s,
                                 augment_semitones=cfg.audio.augment_semitones).model_dump(mode="json")

    return run_stage(store, work(ingest_run, cfg), build, cfg.cache_dir)


def load_features(store: ArtifactStore, audio_run: StageManifest, cache_dir: Path,
                  expected: AudioFeatureSpec | None = None) -> np.ndarray:
    """The stored features, after checking their spec against ``expected`` (a model's)."""
    meta = AudioFeaturesMeta.model_validate(audio_run.meta)
    if expected is not None:
        check_spec(meta.spec, expected, what=f"stored features {audio_run.key}")
    return np.load(fetch_part(store, audio_run, "features.npy", cache_dir))


def load_augmented(store: ArtifactStore, audio_run: StageManifest, cache_dir: Path) -> np.ndarray | None:
    """The stored pitch-shifted versions (V, steps, spec width), or None where there are none."""
    if not AudioFeaturesMeta.model_validate(audio_run.meta).augment_semitones:
        return None
    return np.load(fetch_part(store, audio_run, AUGMENTED, cache_dir))
