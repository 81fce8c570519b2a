"""Dubbing a tiny trained speaker: output length, audio muxed, and every bad input."""

from __future__ import annotations

import math
import subprocess

import ffmpeg
import numpy as np
import pytest

from gstalker_core import dub, media
from gstalker_core.config import DubConfig
from gstalker_core.errors import InputError
from tests.fixtures.media import make_clip


def _sine(path, seconds, volume=0.5, rate=44100, channels=2):
    (ffmpeg.input(f"sine=frequency=220:sample_rate={rate}:duration={seconds}", format="lavfi")
     .filter("volume", volume).output(str(path), ac=channels, loglevel="error").overwrite_output().run())
    return path


def _frames_and_audio(path):
    info = ffmpeg.probe(str(path), count_frames=None)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    audio = next(s for s in info["streams"] if s["codec_type"] == "audio")
    return int(video["nb_read_frames"]), float(audio["duration"])


@pytest.mark.parametrize("name, seconds, rate, channels", [("speech.mp3", 1.3, 44100, 2), ("speech.wav", 2.02, 8000, 1)])
def test_output_frame_count_and_audio_match_the_input(tiny_speaker, tmp_path, name, seconds, rate, channels):
    audio = _sine(tmp_path / name, seconds, rate=rate, channels=channels)
    result = dub.run(tiny_speaker.store, tiny_speaker.name, str(audio), tiny_speaker.cfg)
    assert not result.cache_hit and result.key.startswith(f"renders/{tiny_speaker.name}/")
    local = tiny_speaker.store.local_path(result.key)
    frames, audio_s = _frames_and_audio(local)
    assert frames == math.ceil(seconds * 25) == result.manifest.n_frames
    assert abs(audio_s - seconds) < 0.06
    again = dub.run(tiny_speaker.store, tiny_speaker.name, str(audio), tiny_speaker.cfg)
    assert again.cache_hit and again.key == result.key


def test_a_video_given_as_audio_uses_its_sound_track(tiny_speaker, clip):
    result = dub.run(tiny_speaker.store, tiny_speaker.name, str(clip("plain.mp4", seconds=2.0)), tiny_speaker.cfg)
    frames, audio_s = _frames_and_audio(tiny_speaker.store.local_path(result.key))
    # AAC adds a few ms of priming: the decoded track is 2.0-2.04 s
    assert frames == result.manifest.n_frames == math.ceil(result.manifest.audio_duration_s * 25) in (50, 51)


def _refused(sp, path) -> str:
    before = sorted(sp.store.list("renders/"))
    with pytest.raises(InputError) as err:
        dub.run(sp.store, sp.name, str(path), sp.cfg)
    assert sorted(sp.store.list("renders/")) == before  # nothing half-written, nothing lost
    return str(err.value)


def test_silent_audio(tiny_speaker, tmp_path):
    assert "silent" in _refused(tiny_speaker, _sine(tmp_path / "quiet.wav", 2.0, volume=0.0))


def test_too_short_audio(tiny_speaker, tmp_path):
    assert "needs at least 0.5 s" in _refused(tiny_speaker, _sine(tmp_path / "blip.wav", 0.2))


def test_two_hour_audio(tiny_speaker, tmp_path):
    long = tmp_path / "two_hours.mp3"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "7200",
                    "-b:a", "8k", str(long)], check=True)
    assert "the limit is 60 min" in _refused(tiny_speaker, long)


def test_corrupt_file(tiny_speaker, tmp_path):
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"ID3" + bytes(range(256)) * 40)
    assert "not a media file" in _refused(tiny_speaker, bad)


def test_video_without_sound(tiny_speaker, tmp_path):
    assert "no audio track" in _refused(tiny_speaker, make_clip(tmp_path / "mute.mp4", audio=False))


def test_unknown_speaker(tiny_speaker, tmp_path):
    with pytest.raises(InputError, match="no trained model for speaker 'nobody'.*tiny-speaker"):
        dub.run(tiny_speaker.store, "nobody", str(_sine(tmp_path / "a.wav", 1.0)), tiny_speaker.cfg)


def test_extractor_mismatch_is_refused(tiny_speaker, tmp_path, monkeypatch):
    from gstalker_core import audio

    monkeypatch.setattr(audio.librosa, "__version__", "0.0.1")
    with pytest.raises(InputError, match="extractor"):
        dub.run(tiny_speaker.store, tiny_speaker.name, str(_sine(tmp_path / "b.wav", 1.0)), tiny_speaker.cfg)


def test_decoded_audio_is_read_back_as_ffmpeg_decodes_it(shared_data, tmp_path):
    # dub decodes to a float wav and reads it in blocks (features: test_audio's chunked-equals-whole test)
    speech = tmp_path / "speech.mp3"
    (ffmpeg.input(str(shared_data / "english_speech_60s.wav"), t=7.3)
     .output(str(speech), ac=2, ar=44100, loglevel="error").overwrite_output().run())
    signal = dub.load_audio(speech, 16000, DubConfig(), tmp_path)
    samples = np.concatenate(list(signal.blocks()))
    np.testing.assert_array_equal(samples, media.decode_audio(speech, 16000))
    assert signal.n_samples == len(samples) and signal.sample_rate == 16000
