"""Ingest on synthetic clips built from a real face: formats, crop, caching and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from gstalker_core import ingest
from gstalker_core.errors import InputError
from gstalker_core.storage import open_store
from tests.fixtures.media import face_image


def _ingest(cfg, path):
    return ingest.run(open_store(cfg), str(path), cfg)


def test_clip_is_cropped_on_the_face_at_25fps_with_16k_mono_audio(tiny_config, clip):
    cfg = tiny_config()
    path = clip("plain.mp4", seconds=2.0, fps=25, width=320, height=240)
    run = _ingest(cfg, path)
    meta = ingest.manifest_of(run.manifest)
    assert not run.cache_hit
    assert meta.n_frames == 50 and meta.fps == 25 and meta.resolution == 64
    assert meta.face_detected_fraction == 1.0 and meta.warnings == []
    # the synthetic face is centred at x=160, y=144 (+-10 px drift): the crop must contain it
    crop = meta.crop
    assert crop.x < 150 and crop.x + crop.size > 170 and crop.y < 130 and crop.y + crop.size > 160
    frames = ingest.open_frames(open_store(cfg), run.manifest, cfg.cache_dir)
    assert len(frames) == 50 and frames[49].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    assert frames[10].std() > 20  # a picture, not a blank
    samples, rate = soundfile.read(ingest.audio_path(open_store(cfg), run.manifest, cfg.cache_dir))
    assert rate == 16000 and samples.ndim == 1 and abs(len(samples) / rate - 2.0) < 0.05


def test_second_run_is_a_cache_hit_and_only_ingest_config_changes_the_key(tiny_config, clip):
    path = clip("plain.mp4", seconds=2.0)
    cfg = tiny_config()
    first = _ingest(cfg, path)
    again = _ingest(cfg, path)
    assert again.cache_hit and again.manifest.key == first.manifest.key
    assert ingest.stage_key(str(path), cfg) == first.manifest.key
    assert ingest.stage_key(str(path), tiny_config("audio.n_features=40")) == first.manifest.key
    assert ingest.stage_key(str(path), tiny_config("ingest.resolution=48")) != first.manifest.key


@pytest.mark.parametrize("name, kwargs, expect_frames, warning", [
    ("vfr.mp4", dict(fps=30, vfr=True, seconds=2.0), None, "variable frame rate"),
    ("p60.mp4", dict(fps=60, width=240, height=320), 50, "60.00 fps"),
    ("l30.mp4", dict(fps=30, width=400, height=240), 50, "30.00 fps"),
    ("l50.mp4", dict(fps=50), 50, "50.00 fps"),
    ("ten_bit.mp4", dict(pix_fmt="yuv420p10le"), 50, None),
])
def test_frame_rates_orientations_and_bit_depths(tiny_config, clip, name, kwargs, expect_frames, warning):
    cfg = tiny_config()
    run = _ingest(cfg, clip(name, **kwargs))
    meta = ingest.manifest_of(run.manifest)
    expected = expect_frames or round(meta.source_duration_s * 25)
    assert abs(meta.n_frames - expected) <= 1
    if warning:
        assert any(warning in w for w in meta.warnings), meta.warnings
    else:
        assert meta.warnings == []
    frame = ingest.open_frames(open_store(cfg), run.manifest, cfg.cache_dir)[5]
    assert frame.shape == (64, 64, 3) and frame.std() > 20


def test_several_faces_crop_the_dominant_one_and_say_so(tiny_config, clip):
    run = _ingest(tiny_config(), clip("two.mp4", faces="two"))
    meta = ingest.manifest_of(run.manifest)
    assert any("more than one face" in w for w in meta.warnings)
    centre = meta.crop.x + meta.crop.size / 2
    assert abs(centre - 160) < 20  # the big face in the middle, not the small one at the right edge


def _error(cfg, path) -> str:
    with pytest.raises(InputError) as err:
        _ingest(cfg, path)
    return str(err.value)


def test_empty_file(tiny_config, tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert "empty" in _error(tiny_config(), tmp_path / "empty.mp4")


def test_not_a_media_file(tiny_config, tmp_path):
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 100)
    message = _error(tiny_config(), tmp_path / "notes.mp4")
    assert "not a media file" in message and "fix:" in message


def test_missing_file(tiny_config, tmp_path):
    assert "does not exist" in _error(tiny_config(), tmp_path / "nope.mp4")


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_mp4(tiny_config, clip, tmp_path, faststart):
    whole = clip(f"whole_{faststart}.mp4", seconds=3.0, faststart=faststart).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])
    message = _error(tiny_config(), cut)
    assert "corrupt" in message or "truncated" in message


def test_no_audio_stream(tiny_config, clip):
    assert "no audio stream" in _error(tiny_config(), clip("silent_film.mp4", audio=False))


def test_audio_file_instead_of_video(tiny_config, clip):
    assert "no video stream" in _error(tiny_config(), clip("speech.wav", video=False))


def test_clip_shorter_than_the_profile_minimum(tiny_config, clip):
    message = _error(tiny_config(), clip("short.mp4", seconds=0.6))
    assert "0.60 s long" in message and "at least 1 s" in message


def test_no_face_at_all(tiny_config, clip):
    assert "no face found in any" in _error(tiny_config(), clip("empty_room.mp4", faces="none"))


def test_long_stretch_without_a_face_names_the_frames(tiny_config, clip):
    message = _error(tiny_config(), clip("blackout.mp4", seconds=2.0, black=(10, 39)))
    assert "frames 10-35" in message, message  # sampled every 5th frame: 10, 15, ..., 35


def test_bad_input_loses_nothing_already_stored(tiny_config, clip, tmp_path):
    cfg = tiny_config()
    store = open_store(cfg)
    _ingest(cfg, clip("plain.mp4", seconds=2.0))
    before = {key: store.get_bytes(key) for key in store.list("")}
    (tmp_path / "bad.mp4").write_text("garbage")
    _error(cfg, tmp_path / "bad.mp4")
    assert {key: store.get_bytes(key) for key in store.list("")} == before


def test_face_fixture_is_a_real_face():
    from gstalker_core.mediapipe_models import solutions

    with solutions().face_detection.FaceDetection(model_selection=1) as detector:
        assert detector.process(np.ascontiguousarray(face_image())).detections
