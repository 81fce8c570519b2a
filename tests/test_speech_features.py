"""Speech-model audio features (``audio.kind=speech_model``) from a local model folder.

The models here are HuBERT and wav2vec2 of the real transformers classes, randomly initialised
and tiny (hidden size 32, 2 layers; the real convolution strides and kernels, so the real
20 ms frame rate), saved with ``save_pretrained`` where a user's model folder would be. They
prove loading offline, shapes, the 50 Hz alignment, chunking, the stored spec and the errors;
their features mean nothing.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from gstalker_core import audio, speech_features
from gstalker_core.audio import AudioFeatureSpec, Signal, compute_features, loudness_gain, spec_for
from gstalker_core.config import AudioConfig
from gstalker_core.errors import ConfigError, InputError

transformers = pytest.importorskip("transformers", reason="optional backend not installed "
                                                          "(bash scripts/install.sh --backends)")
SR = 16000
HIDDEN = 32


def save_tiny_model(folder, model_type: str = "hubert", normalise: bool = True, seed: int = 0):
    import torch

    config_class, model_class = {"hubert": (transformers.HubertConfig, transformers.HubertModel),
                                 "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model)}[model_type]
    torch.manual_seed(seed)
    model = model_class(config_class(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, conv_dim=(32,) * 7))
    model.save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=SR, do_normalize=normalise).save_pretrained(folder)
    return folder


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced tone with a syllable-rate envelope and a little noise."""
    t = np.arange(int(seconds * SR)) / SR
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    rng = np.random.default_rng(seed)
    return (0.3 * envelope * np.sin(2 * np.pi * 180 * t) + 0.01 * rng.normal(size=len(t))).astype(np.float32)


@pytest.mark.parametrize("model_type", ["hubert", "wav2vec2"])
def test_features_from_a_local_model_offline(tmp_path, offline, model_type):
    folder = save_tiny_model(tmp_path / model_type, model_type)
    spec = spec_for(AudioConfig(kind="speech_model", model_dir=str(folder)), SR)
    assert (spec.kind, spec.extractor, spec.n_features, spec.sample_rate, spec.hop_length) == (
        "speech_model", "transformers", HIDDEN, SR, SR // 50)
    assert spec.extractor_version == transformers.__version__
    assert spec.model.startswith(f"{model_type}:") and len(spec.model) == len(model_type) + 17
    feats = compute_features(speech(2.5), spec, n_frames=63, model_dir=str(folder))
    assert feats.shape == (126, HIDDEN) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert np.abs(np.diff(feats, axis=0)).mean() > 0  # not one frame repeated


def test_steps_take_the_model_frames_at_their_centres_across_chunks(tmp_path, monkeypatch):
    """A stand-in network whose frame t is the mean of the samples it sees, on a ramp of the
    time (sample n holds the time of its centre, (n + 0.5) / rate): the feature of step j must be
    the time at the step's centre, 20j+10 ms, in every chunk."""
    import torch

    folder = save_tiny_model(tmp_path / "hubert", normalise=False)
    found = speech_features.read_folder(str(folder))
    assert (found.stride, found.receptive_field) == (320, 400)  # HuBERT's 20 ms frames, 25 ms windows

    class WindowMean(torch.nn.Module):
        def forward(self, x):
            frames = x.unfold(1, found.receptive_field, found.stride).mean(-1, keepdim=True)
            return SimpleNamespace(last_hidden_state=frames.expand(-1, -1, HIDDEN))

    monkeypatch.setattr(speech_features, "load_model", lambda found, device: WindowMean())
    monkeypatch.setattr(speech_features, "CHUNK_SECONDS", 1.0)  # 3.1 s: four chunks
    seconds = 3.1
    ramp = Signal.of_array((np.arange(int(seconds * SR)) + 0.5).astype(np.float32) / SR, SR, block=4096)
    spec = spec_for(AudioConfig(kind="speech_model", model_dir=str(folder)), SR)
    feats = compute_features(ramp, spec, model_dir=str(folder))
    centres = (np.arange(len(feats)) * 320 + 160) / SR
    heard = (centres > 0.0125) & (centres < seconds - 0.0125)  # windows (25 ms) reaching past the audio hear zeros
    gain = loudness_gain(ramp)
    assert np.abs(feats[heard, 0] / gain - centres[heard]).max() < 0.1 / SR


def test_long_audio_is_read_in_chunks_with_context(tmp_path, monkeypatch):
    folder = save_tiny_model(tmp_path / "hubert")
    spec = spec_for(AudioConfig(kind="speech_model", model_dir=str(folder)), SR)
    lengths = []
    real_load = speech_features.load_model

    def spying_load(found, device):
        model = real_load(found, device)
        model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[-1]))
        return model

    monkeypatch.setattr(speech_features, "load_model", spying_load)
    monkeypatch.setattr(speech_features, "CHUNK_SECONDS", 1.0)
    monkeypatch.setattr(speech_features, "CONTEXT_SECONDS", 0.5)
    feats = compute_features(Signal.of_array(speech(5.2), SR, block=8192), spec, model_dir=str(folder))
    assert feats.shape == (2 * 130, HIDDEN) and np.isfinite(feats).all()
    assert lengths == [2 * SR] * 6  # 1 s chunks with 0.5 s either side, whatever the audio's length


def test_the_stage_stores_and_checks_the_model(tmp_path, offline, clip):
    from gstalker_core import ingest
    from gstalker_core.config import load_config
    from gstalker_core.dub import installed_spec
    from gstalker_core.storage import open_store

    folder = save_tiny_model(tmp_path / "hubert")
    cfg = load_config("tiny", overrides=[f"home={tmp_path / 'home'}", "audio.kind=speech_model",
                                         f"audio.model_dir={folder}"], environ={})
    store = open_store(cfg)
    ingest_run = ingest.run(store, str(clip("track2s.mp4", seconds=2.0)), cfg).manifest
    stored = audio.run(store, ingest_run, cfg).manifest
    meta = audio.AudioFeaturesMeta.model_validate(stored.meta)
    assert meta.spec == spec_for(cfg.audio, SR) and meta.spec.model == speech_features.read_folder(str(folder)).identity
    assert stored.inputs["speech_model"] == meta.spec.model and stored.config["model_dir"] == str(folder)
    feats = audio.load_features(store, stored, cfg.cache_dir, expected=meta.spec)
    assert feats.shape == (2 * meta.n_frames, HIDDEN)
    assert installed_spec(meta.spec, str(folder)) == meta.spec  # what dubbing checks

    other = save_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(InputError, match="model:"):
        audio.load_features(store, stored, cfg.cache_dir, expected=installed_spec(meta.spec, str(other)))
    with pytest.raises(ConfigError, match="features need"):  # features asked of another model than the spec's
        compute_features(speech(1.0), meta.spec, model_dir=str(other))
    logmel = load_config("tiny", overrides=[f"home={tmp_path / 'home'}"], environ={})
    assert "speech_model" not in audio.work(ingest_run, logmel).inputs
    assert audio.stage_key(ingest_run, cfg) != audio.stage_key(ingest_run, cfg.model_copy(
        update={"audio": cfg.audio.model_copy(update={"model_dir": str(other)})}))


def test_bad_model_folders_fail_with_error_and_fix(tmp_path, monkeypatch):
    def spec(folder) -> AudioFeatureSpec:
        return spec_for(AudioConfig(kind="speech_model", model_dir=str(folder)), SR)

    with pytest.raises(ConfigError, match="is not a directory"):
        spec(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty folder"):
        spec(tmp_path / "empty")
    folder = save_tiny_model(tmp_path / "hubert")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError) as err:
        spec(folder)
    assert "lacks model.safetensors" in err.value.problem and "config.json" in err.value.problem
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    (whisper / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (whisper / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        spec(whisper)
    assert "'whisper'" in err.value.problem and "HuBERT or wav2vec2" in err.value.fix
    eight_khz = save_tiny_model(tmp_path / "8k")
    extractor = json.loads((eight_khz / "preprocessor_config.json").read_text())
    (eight_khz / "preprocessor_config.json").write_text(json.dumps({**extractor, "sampling_rate": 8000}))
    with pytest.raises(ConfigError, match="expects 8000 Hz"):
        spec(eight_khz)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(ConfigError) as err:
        spec(save_tiny_model(tmp_path / "again"))
    assert "'transformers'" in err.value.problem and "install.sh --backends" in err.value.fix
