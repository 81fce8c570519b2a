"""Speech-model audio features: a HuBERT- or wav2vec2-class model from a local folder.

Log-mel carries the speaker's voice as much as what is said; learnt speech features
(peers use DeepSpeech, HuBERT, wav2vec2) carry less of the voice. ``audio.kind=speech_model``
runs the model in ``audio.model_dir`` (a Hugging Face model folder: ``config.json``, the
weights, optionally ``preprocessor_config.json``; nothing is downloaded) and takes its last
hidden state as the features.

Library: Hugging Face ``transformers``. It holds the reference implementations of HuBERT and
wav2vec2 (Apache-2.0, maintained with the models' authors), reads the checkpoints users have
(``facebook/hubert-large-ls960-ft``, ``facebook/wav2vec2-base-960h``, fine-tuned CTC heads
included: the base model loads from them) with ``local_files_only``, and runs on any torch
device. torchaudio's pipelines download their weights and it is in maintenance mode; fairseq is
unmaintained.

Rate: the model's frames (its convolution strides, 20 ms for HuBERT and wav2vec2) are
interpolated linearly onto the pipeline's 50 Hz steps, each step taken at its centre
(``audio``: step j is centred at 20j+10 ms), each model frame at the centre of its receptive
field. Loudness: the audio gets log-mel's loudness normalisation, then the model's own
zero-mean, unit-variance normalisation when its feature extractor asks for it, over the
whole utterance; ``audio.normalise`` (log-mel's per-band normalisation) and ``audio.loudness``
(log-mel's loudness column) do not apply, and the spec says ``normalise="none"``,
``loudness=False``. ``audio.augment_semitones`` runs the model on each pitch-shifted version of
the training audio as it runs librosa for log-mel. Memory: the audio is read in chunks of
``CHUNK_SECONDS`` with ``CONTEXT_SECONDS`` more on each side, whose frames are dropped: the model
never sees more than a chunk, whatever the length.

The spec stored with the features names kind, model (type and a digest of its files),
transformers' version and the rates; ``audio.check_spec`` refuses features of another model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# audio's chunked reader (pieces of a signal with overlap, never the whole signal) serves the chunks with context
from .audio import (SPEECH_MODEL, STEPS_PER_SECOND, AudioFeatureSpec, Signal, _frame_pieces, _Framing,
                    loudness_gain)
from .errors import ConfigError
from .model_files import files_digest, import_optional, model_folder, require_files

SETTING = "audio.model_dir"
USER = "audio.kind=speech_model"
MODEL_CLASSES = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model"}  # config.json model_type -> class
CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
CHUNK_SECONDS = 20.0
CONTEXT_SECONDS = 2.0  # beyond HuBERT's positional convolution (128 frames, 2.56 s wide)
MIN_FRAMES_PER_SECOND = 25  # coarser than one frame per video frame cannot follow the lips


@dataclass(frozen=True)
class SpeechModelFolder:
    """What ``audio.model_dir`` holds, read without loading the weights."""

    path: Path
    model_type: str
    hidden_size: int
    stride: int  # samples per model frame
    receptive_field: int  # samples each frame sees
    sample_rate: int
    normalise: bool  # the feature extractor's do_normalize: zero mean, unit variance per utterance
    files: list[Path]

    @property
    def identity(self) -> str:
        return f"{self.model_type}:{files_digest(self.files)}"


def read_folder(model_dir: str) -> SpeechModelFolder:
    """The model folder's description; a ConfigError when it is missing, incomplete or another model."""
    folder = model_folder(model_dir, SETTING, USER)
    (config_file,) = require_files(folder, [CONFIG], SETTING, USER)
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})
    if not weights:
        require_files(folder, ["model.safetensors"], SETTING, USER)
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ConfigError(f"{SETTING}={model_dir!r} holds a {model_type!r} model; {USER} runs HuBERT or wav2vec2 "
                          f"models (config.json model_type {' or '.join(map(repr, MODEL_CLASSES))})",
                          f"point {SETTING} at a HuBERT or wav2vec2 model folder, or use audio.kind=logmel")
    kernels, strides = config.get("conv_kernel", []), config.get("conv_stride", [])
    receptive_field, stride = 1, 1
    for kernel, step in zip(kernels, strides):
        receptive_field += (kernel - 1) * stride
        stride *= step
    preprocessor = folder / PREPROCESSOR
    extractor = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
    sample_rate = int(extractor.get("sampling_rate", 16000))
    if not kernels or len(kernels) != len(strides) or sample_rate / stride < MIN_FRAMES_PER_SECOND:
        raise ConfigError(f"the model in {SETTING}={model_dir!r} gives {sample_rate / stride:.1f} frames a second "
                          f"(conv_kernel {kernels}, conv_stride {strides} at {sample_rate} Hz); the pipeline needs "
                          f"{MIN_FRAMES_PER_SECOND} or more to follow the lips",
                          f"use a HuBERT or wav2vec2 model with its own config.json in {SETTING}")
    return SpeechModelFolder(folder, model_type, int(config["hidden_size"]), stride, receptive_field, sample_rate,
                             bool(extractor.get("do_normalize", False)),
                             [config_file, *weights, *([preprocessor] if preprocessor.is_file() else [])])


def speech_model_spec(model_dir: str, sample_rate: int) -> AudioFeatureSpec:
    """The spec of the speech-model features of ``sample_rate`` audio (the pipeline's 16 kHz)."""
    found = read_folder(model_dir)
    if found.sample_rate != sample_rate:
        raise ConfigError(f"the model in {SETTING}={model_dir!r} expects {found.sample_rate} Hz audio "
                          f"(preprocessor_config.json); the pipeline's audio is {sample_rate} Hz",
                          f"use a model trained on {sample_rate} Hz speech (HuBERT and wav2vec2 are)")
    transformers = import_optional("transformers", "transformers", USER)
    return AudioFeatureSpec(
        extractor="transformers", extractor_version=transformers.__version__, kind=SPEECH_MODEL,
        n_features=found.hidden_size, sample_rate=sample_rate, hop_length=sample_rate // STEPS_PER_SECOND,
        n_fft=found.receptive_field, fmin=0.0, fmax=sample_rate / 2, model=found.identity)


def load_model(found: SpeechModelFolder, device: str):
    """The model (base model, no task head) on ``device``, in eval mode, from the local files only."""
    transformers = import_optional("transformers", "transformers", USER)
    transformers.utils.logging.disable_progress_bar()
    try:
        model = getattr(transformers, MODEL_CLASSES[found.model_type]).from_pretrained(
            found.path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"the {found.model_type} model in {SETTING}={str(found.path)!r} does not load: "
                          f"{str(e).splitlines()[0]}",
                          "copy the model folder again as saved by save_pretrained (config.json and weights)") from None
    return model.to(device).eval()


def _normalised(signal: Signal, found: SpeechModelFolder) -> Signal:
    """The signal as the model expects it: log-mel's loudness gain, then the model's own
    utterance normalisation when it asks for one (which the gain does not change)."""
    if not found.normalise:
        gain = loudness_gain(signal)
        return Signal(signal.n_samples, signal.sample_rate, lambda: (block * gain for block in signal.blocks()))
    total, squares = 0.0, 0.0
    for block in signal.blocks():
        total += float(block.sum(dtype=np.float64))
        squares += float(np.square(block, dtype=np.float64).sum())
    count = max(signal.n_samples, 1)
    mean = total / count
    scale = 1.0 / math.sqrt(max(squares / count - mean * mean, 0.0) + 1e-7)  # Wav2Vec2FeatureExtractor's epsilon
    return Signal(signal.n_samples, signal.sample_rate,
                  lambda: (((block - mean) * scale).astype(np.float32) for block in signal.blocks()))


def speech_model_features(signal: Signal, spec: AudioFeatureSpec, n_steps: int, model_dir: str, device: str = "cpu"
                          ) -> np.ndarray:
    """[n_steps, hidden] float32 features of ``signal`` with the model in ``model_dir``, which
    must be the one ``spec`` names."""
    import torch

    found = read_folder(model_dir)
    if found.identity != spec.model:
        raise ConfigError(f"the model in {SETTING}={model_dir!r} is {found.identity}, but these features need "
                          f"{spec.model}",
                          f"point {SETTING} at the speech model the features (and the trained model) were made with")
    model = load_model(found, device)
    hop = spec.hop_length
    chunk_steps = round(CHUNK_SECONDS * STEPS_PER_SECOND)
    context = round(CONTEXT_SECONDS * spec.sample_rate)
    framing = _Framing(length=chunk_steps * hop + 2 * context, hop=chunk_steps * hop, lead=context)
    n_chunks = math.ceil(n_steps / chunk_steps)
    feats = np.empty((n_steps, spec.n_features), np.float32)
    for k, piece in enumerate(_frame_pieces(_normalised(signal, found), framing, n_chunks, 1)):
        with torch.no_grad():
            hidden = model(torch.from_numpy(piece).to(device)[None]).last_hidden_state[0].float().cpu().numpy()
        steps = np.arange(k * chunk_steps, min((k + 1) * chunk_steps, n_steps))
        # a step's centre in piece samples, then in model frames (frame t sees [t*stride, t*stride + field))
        centre = (steps - k * chunk_steps) * hop + hop / 2 + context
        position = np.clip((centre - found.receptive_field / 2) / found.stride, 0, len(hidden) - 1)
        below = np.floor(position).astype(int)
        above = np.minimum(below + 1, len(hidden) - 1)
        weight = (position - below)[:, None].astype(np.float32)
        feats[steps] = (1 - weight) * hidden[below] + weight * hidden[above]
    return feats
