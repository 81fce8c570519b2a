import pytest

from gstalker_core.config import load_config
from gstalker_core.errors import ConfigError
from gstalker_core.naming import validate_speaker
from gstalker_core.errors import InputError


def test_profiles_load_and_differ():
    tiny, preview, paper = (load_config(p, environ={}) for p in ("tiny", "preview", "paper"))
    assert (tiny.ingest.resolution, preview.ingest.resolution, paper.ingest.resolution) == (64, 256, 512)
    assert paper.profile == "paper"


def test_precedence_profile_file_env_cli(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("ingest:\n  resolution: 128\n  detect_every: 3\naudio:\n  n_features: 64\n")
    env = {"GSTALKER_INGEST__RESOLUTION": "96", "GSTALKER_AUDIO__KIND": "mfcc", "GSTALKER_AUDIO__NORMALISE": "none",
           "GSTALKER_AUDIO__LOUDNESS": "false", "UNRELATED": "x"}
    cfg = load_config("preview", config_file=f, overrides=["ingest.resolution=200"], environ=env)
    assert cfg.ingest.resolution == 200  # CLI beats env beats file beats profile
    assert cfg.ingest.detect_every == 3 and cfg.audio.n_features == 64 and cfg.audio.kind == "mfcc"


def test_log_mel_settings_with_mfcc_are_refused():
    with pytest.raises(ConfigError) as err:
        load_config("preview", overrides=["audio.kind=mfcc"], environ={})
    assert "audio" in str(err.value) and "audio.normalise=none and audio.loudness=false" in str(err.value)
    with pytest.raises(ConfigError) as err:  # only what is still to set
        load_config("preview", overrides=["audio.kind=mfcc", "audio.normalise=none"], environ={})
    assert "set audio.loudness=false" in str(err.value) and "normalise=none" not in str(err.value)
    assert load_config("preview", overrides=["audio.kind=mfcc", "audio.normalise=none", "audio.loudness=false"],
                       environ={}).audio.kind == "mfcc"


def test_invalid_value_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=["audio.kind=wav2vec"], environ={})
    assert "audio.kind" in str(e.value) and "'logmel', 'mfcc' or 'speech_model'" in str(e.value)


def test_out_of_range_and_unknown_fields():
    with pytest.raises(ConfigError, match=r"ingest.resolution: Input should be less than or equal to 1024"):
        load_config("tiny", overrides=["ingest.resolution=4096"], environ={})
    with pytest.raises(ConfigError, match=r"ingest.resolutoin: Extra inputs are not permitted"):
        load_config("tiny", overrides=["ingest.resolutoin=64"], environ={})
    with pytest.raises(ConfigError, match="GSTALKER_"):
        load_config("tiny", environ={"GSTALKER_STORE__MAX_ATTEMPTS": "many"})


def test_unknown_profile_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="choose one of: tiny, preview, paper"):
        load_config("huge", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", config_file=tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("tiny", config_file=bad, environ={})
    with pytest.raises(ConfigError, match="has no '='"):
        load_config("tiny", overrides=["ingest.resolution"], environ={})


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "has space", "Upper", "", "-lead", "x" * 64])
def test_unsafe_speaker_names_are_refused(name):
    with pytest.raises(InputError, match="invalid speaker name"):
        validate_speaker(name)


def test_good_speaker_names():
    assert validate_speaker("cnn-anchor_2") == "cnn-anchor_2"


def test_default_stage_keys_are_stable():
    """The keys of the default configs' stages as they were before the optional backends (and
    their settings) existed: settings that are off stay out of the keys, so stored stages stay hits.
    A stage's new code version changes its key on purpose: then update the key here (audio: version 4,
    the loudness column; evaluate: version 8, the mouth resting in the held-out audio's own pauses)."""
    from datetime import datetime, timezone

    from gstalker_core import audio, evaluate, tracking
    from gstalker_core.storage import StageManifest

    ingest = StageManifest(stage="ingest", key="0" * 32, code_version="1", gstalker_version="0",
                           created_at=datetime.now(timezone.utc), inputs={}, config={}, parts={}, meta={})
    want = {"tiny": ("9566dbe7154db01afe64b0aade89176e", "d7a08d3215e533e578ce080b90ac97dd",
                     "ab5355228a5a8467d107b02e1c3111d3"),
            "preview": ("d294f1f62c677051c09b74d4c177972e", "66f64a683536c758f5eb15929cf1a922",
                        "6beaadeb01d59bb685b3a619453dab33")}
    for profile, keys in want.items():
        cfg = load_config(profile, environ={})
        assert (tracking.stage_key(ingest, cfg), audio.stage_key(ingest, cfg),
                evaluate.stage_key(ingest, ingest, cfg)) == keys, profile
