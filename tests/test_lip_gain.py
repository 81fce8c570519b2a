"""The lip gain (``model.lip_gain``): its arithmetic on the face field, the utterance factor,
the calibration's interpolation, and that a trained bundle carries its calibration to dubs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from gstalker_core import audio
from gstalker_core.data.conditions import FrameSource
from gstalker_core.model.bundle import fetch_bundle
from gstalker_core.model.lip_gain import (MEAN_MOTION_FRAMES, REST_SHARE, LipGain, gain_reaching, lip_gaps,
                                          lip_spread, mean_motion_shift, rest_code, utterance_motion)
from gstalker_core.model.talking_head import LipMotion


@pytest.fixture(scope="module")
def model_and_codes(tiny_speaker):
    bundle = fetch_bundle(tiny_speaker.store, tiny_speaker.bundle, tiny_speaker.cfg.cache_dir)
    features = audio.load_features(tiny_speaker.store, tiny_speaker.audio, tiny_speaker.cfg.cache_dir)
    with torch.no_grad():
        codes = bundle.model.audio_encoder.conditions(features, 0, len(features) // 2)
    return bundle, codes


def test_a_gain_scales_the_audio_driven_motion_around_the_reference(model_and_codes):
    bundle, codes = model_and_codes
    model = bundle.model
    encoded = model.face_field.encode(model.head.means)
    eye = torch.linspace(0.2, 1.0, 6)
    audio_codes, reference = codes[:6], codes.mean(dim=0)
    with torch.no_grad():
        plain = model.face_field(encoded, audio_codes, eye)
        at_reference = model.face_field(encoded, reference.expand_as(audio_codes), eye)
        amplified = model.face_deltas(encoded, audio_codes, eye, LipMotion(reference, 1.8))
        unchanged = model.face_deltas(encoded, audio_codes, eye, LipMotion(reference, 1.0))
        still = model.face_deltas(encoded, reference.expand_as(audio_codes), eye, LipMotion(reference, 2.5))
    for name in ("d_means", "d_quats", "d_log_scales"):
        d, r = getattr(plain, name), getattr(at_reference, name)
        assert torch.allclose(getattr(amplified, name), r + 1.8 * (d - r), atol=1e-6), name
        assert torch.equal(getattr(unchanged, name), d), name  # gain 1: exactly the trained field
        # the reference sound itself (and so what the eyes do alone) is not amplified
        assert torch.allclose(getattr(still, name), r, atol=1e-6), name
    assert (amplified.d_means - plain.d_means).abs().max() > 0


@pytest.fixture(scope="module")
def lively_model(model_and_codes):
    """The tiny speaker's model with its face field's output layer drawn at random: the tiny
    training leaves deltas of about 1e-4, too small for the tolerances below to tell anything."""
    model = copy.deepcopy(model_and_codes[0].model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.face_field.mlp.head.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model


def test_a_gain_keeps_the_utterances_mean_motion_and_the_eyes_own(model_and_codes, lively_model):
    codes, model = model_and_codes[1], lively_model
    utterance = codes[:40]  # every frame makes the mean motion (MEAN_MOTION_FRAMES or fewer)
    encoded = model.face_field.encode(model.head.means)
    open_eyes, blinking = torch.ones(len(utterance)), torch.linspace(0.1, 1.0, len(utterance))
    with torch.no_grad():
        lip = utterance_motion(model, utterance, None, fixed_gain=2.2)
        plain = model.face_field(encoded, utterance, open_eyes)
        amplified = model.face_deltas(encoded, utterance, open_eyes, lip)
        at_mean_code = model.face_field(encoded, lip.reference[None], open_eyes[:1])
        # the mean code's sound with the eyes blinking: the eyes' own motion, which no gain scales
        eyes_alone = model.face_field(encoded, lip.reference.expand_as(utterance), blinking)
        eyes_gained = model.face_deltas(encoded, lip.reference.expand_as(utterance), blinking, lip)
    for name in ("d_means", "d_quats", "d_log_scales"):
        d, a = getattr(plain, name), getattr(amplified, name)
        shift = getattr(lip.mean_shift, name)
        assert torch.allclose(shift, d.mean(dim=0, keepdim=True) - getattr(at_mean_code, name), atol=1e-6), name
        # the gain moves each frame about the utterance's mean motion, which it leaves where it was
        assert torch.allclose(a.mean(dim=0), d.mean(dim=0), atol=1e-6), name
        assert torch.allclose(a - a.mean(dim=0), 2.2 * (d - d.mean(dim=0)), atol=1e-5), name
        eyes, gained = getattr(eyes_alone, name), getattr(eyes_gained, name)
        assert torch.allclose(gained - gained[-1], eyes - eyes[-1], atol=1e-6), name  # frame -1: eyes open
    # around the mean code's motion alone the mean would move: beyond the tolerance above
    with torch.no_grad():
        unshifted = model.face_deltas(encoded, utterance, open_eyes, LipMotion(lip.reference, 2.2))
    assert not torch.allclose(unshifted.d_means.mean(dim=0), plain.d_means.mean(dim=0), atol=1e-6)
    # gain 1 is the trained field as it is, with nothing to shift
    assert utterance_motion(model, utterance, None).mean_shift is None


def test_the_mean_motion_of_a_long_utterance_comes_from_evenly_spaced_frames(model_and_codes, lively_model):
    codes, model = model_and_codes[1], lively_model
    n = 3 * MEAN_MOTION_FRAMES + 1
    long = codes.repeat(1 + n // len(codes), 1)[:n]
    spaced = long[::3]  # MEAN_MOTION_FRAMES + 1 frames, evenly spaced, first and last included
    encoded = model.face_field.encode(model.head.means)
    with torch.no_grad():
        shift = mean_motion_shift(model, long)
        picked = long[np.linspace(0, n - 1, MEAN_MOTION_FRAMES).round().astype(int)]
        d = model.face_field(encoded, picked, torch.ones(len(picked)))
        at_mean = model.face_field(encoded, long.mean(dim=0, keepdim=True), torch.ones(1))
    assert len(spaced) > MEAN_MOTION_FRAMES
    assert torch.allclose(shift.d_means, d.d_means.mean(dim=0, keepdim=True) - at_mean.d_means, atol=1e-6)
    # and not the first MEAN_MOTION_FRAMES frames
    with torch.no_grad():
        first = model.face_field(encoded, long[:MEAN_MOTION_FRAMES], torch.ones(MEAN_MOTION_FRAMES)).d_means.mean(dim=0)
    assert not torch.allclose(shift.d_means[0], first - at_mean.d_means[0], atol=1e-6)


def test_the_utterance_gain_is_the_speaker_gain_times_the_spread_ratio_within_bounds(model_and_codes):
    bundle, codes = model_and_codes
    model = bundle.model
    points = np.random.default_rng(0).normal(0, 0.05, (4, 3)).astype(np.float32)
    spread = lip_spread(model, codes, points)
    assert spread > 0

    def calibration(speaker_gain: float, reference_spread: float) -> LipGain:
        return LipGain(speaker_gain=speaker_gain, reference_spread=reference_spread, lip_points=points.tolist(),
                       max_gain=2.5, frames=10, real_spread=0.05, rendered_spread={})

    assert utterance_motion(model, codes, calibration(1.4, spread)).gain == pytest.approx(1.4, rel=1e-5)
    assert utterance_motion(model, codes, calibration(1.2, 1.5 * spread)).gain == pytest.approx(1.8, rel=1e-5)
    assert utterance_motion(model, codes, calibration(1.5, 4 * spread)).gain == 2.5  # at most max_gain
    assert utterance_motion(model, codes, calibration(1.5, 0.1 * spread)).gain == 1.0  # never below 1
    assert utterance_motion(model, codes, None).gain == 1.0  # an uncalibrated model: as trained
    fixed = utterance_motion(model, codes, calibration(1.4, spread), fixed_gain=0.7)
    assert fixed.gain == 0.7 and torch.allclose(fixed.reference, codes.mean(dim=0))


def test_in_a_pause_the_mouth_rests_and_where_the_voice_speaks_it_moves_as_gained(model_and_codes, lively_model):
    codes, model = model_and_codes[1], lively_model
    utterance, rest = codes[:6], codes[-1]
    encoded = model.face_field.encode(model.head.means)
    eye = torch.linspace(0.2, 1.0, 6)
    speaking = torch.tensor([1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    with torch.no_grad():
        for gain in (1.0, 2.2):
            lip = utterance_motion(model, utterance, None, fixed_gain=gain)
            lip.rest = rest
            gained = model.face_deltas(encoded, utterance, eye, lip)  # no pauses: the gain alone
            rested = model.face_deltas(encoded, utterance, eye, lip, speaking)
            at_rest = model.face_field(encoded, rest.expand_as(utterance), eye)  # with each frame's eyes
            for name in ("d_means", "d_quats", "d_log_scales"):
                g, r, at = getattr(gained, name), getattr(rested, name), getattr(at_rest, name)
                assert torch.allclose(r[:2], g[:2], atol=1e-6), (gain, name)
                assert torch.allclose(r[4:], at[4:], atol=1e-6), (gain, name)
                assert torch.allclose(r[2:4], at[2:4] + speaking[2:4, None, None] * (g[2:4] - at[2:4]), atol=1e-6)
            assert (rested.d_means[4:] - gained.d_means[4:]).abs().max() > 1e-3
        # no rest code (a model calibrated before rests): pauses change nothing
        lip.rest = None
        np.testing.assert_array_equal(model.face_deltas(encoded, utterance, eye, lip, speaking).d_means.numpy(),
                                      model.face_deltas(encoded, utterance, eye, lip).d_means.numpy())


def test_the_rest_code_is_the_mean_of_the_codes_whose_lips_are_closest(model_and_codes, lively_model):
    codes, model = model_and_codes[1], lively_model
    points = np.random.default_rng(0).normal(0, 0.05, (4, 3)).astype(np.float32)
    gaps = lip_gaps(model, codes, points)
    assert gaps.shape == (len(codes),) and float(gaps.std()) == pytest.approx(lip_spread(model, codes, points))
    count = max(1, round(REST_SHARE * len(codes)))
    narrowest = np.argsort(gaps.numpy())[:count]
    assert torch.allclose(rest_code(model, codes, points), codes[narrowest].mean(dim=0), atol=1e-6)
    # and it is carried from the calibration into every utterance's motion
    calibration = LipGain(speaker_gain=1.3, reference_spread=float(gaps.std()), lip_points=points.tolist(),
                          max_gain=2.5, frames=10, real_spread=0.05, rendered_spread={},
                          rest_code=rest_code(model, codes, points).tolist())
    assert torch.allclose(utterance_motion(model, codes[:9], calibration).rest, codes[narrowest].mean(dim=0))
    assert utterance_motion(model, codes[:9], calibration.model_copy(update={"rest_code": None})).rest is None


def test_the_speaker_gain_is_where_the_rendered_spread_reaches_the_real_one():
    gains = [1.0, 1.5, 2.0]
    assert gain_reaching(0.05, gains, [0.03, 0.07, 0.09]) == pytest.approx(1.25)
    assert gain_reaching(0.08, gains, [0.03, 0.07, 0.09]) == pytest.approx(1.75)
    assert gain_reaching(0.02, gains, [0.03, 0.07, 0.09]) == 1.0  # already there at gain 1
    assert gain_reaching(0.20, gains, [0.03, 0.07, 0.09]) == 2.0  # never reached: the largest tried
    assert gain_reaching(0.05, gains, [0.03, 0.02, 0.06]) == pytest.approx(1.875)  # the first crossing


def test_a_trained_bundle_carries_its_calibration_and_a_dub_says_its_gain(tiny_speaker, tmp_path):
    from gstalker_core import dub

    bundle = fetch_bundle(tiny_speaker.store, tiny_speaker.bundle, tiny_speaker.cfg.cache_dir)
    calibration = bundle.manifest.lip_gain
    cfg = tiny_speaker.cfg
    assert calibration is not None and calibration.frames == min(cfg.train.lip_gain_frames,
                                                                 bundle.manifest.n_train_frames)
    assert 1.0 <= calibration.speaker_gain <= calibration.max_gain == cfg.train.lip_gain_max
    assert calibration.reference_spread > 0 and np.asarray(calibration.lip_points).shape == (4, 3)
    assert len(calibration.rest_code) == bundle.model.audio_encoder.code_dim
    # FaceMesh may not find a 64 px face: then the calibration says so and leaves the gain at 1
    assert calibration.note or len(calibration.rendered_spread) > 1
    wav = tmp_path / "voice.wav"
    audio_signal = np.random.default_rng(1).normal(0, 0.1, 24000).astype(np.float32) * np.sin(np.linspace(0, 60, 24000))
    import soundfile

    soundfile.write(wav, audio_signal, 16000)
    fixed = dub.dub(bundle, wav, tmp_path / "fixed.mp4", cfg.dub.model_copy(update={"lip_gain": 1.6}))
    assert fixed.lip_gain == 1.6
    calibrated = dub.dub(bundle, wav, tmp_path / "calibrated.mp4", cfg.dub)
    # the dub's gain is this utterance's: the speaker gain x the spread ratio of its own audio codes
    features = dub.dub_audio(bundle, wav, cfg.dub, tmp_path).features
    with torch.no_grad():
        codes = bundle.model.audio_encoder.conditions(features, 0, len(features) // 2)
    assert calibrated.lip_gain == pytest.approx(utterance_motion(bundle.model, codes, calibration).gain, rel=1e-5)
    # and the gain reaches the frames: the same chunk at gains 1 and 1.6 differs
    source = FrameSource.build(bundle.viewmats, bundle.blink, bundle.K, bundle.plate, torch.device("cpu"), features,
                               torso_shift=bundle.torso_shift)
    frames = np.arange(4)
    with torch.no_grad():
        plain, amplified = (dub.render_chunk(bundle.model, source, frames, frames, lip=LipMotion(codes.mean(dim=0), g))
                            for g in (1.0, 1.6))
    assert (amplified - plain).abs().max() > 1e-3


def test_a_dub_knows_where_its_voice_pauses_and_its_conditions_carry_it(tiny_speaker, tmp_path):
    from gstalker_core import dub
    import soundfile

    bundle = fetch_bundle(tiny_speaker.store, tiny_speaker.bundle, tiny_speaker.cfg.cache_dir)
    t = np.arange(48000) / 16000
    voice = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    voice[(t >= 1.0) & (t < 2.0)] = 0.0  # a second of silence in three
    wav = tmp_path / "pausing.wav"
    soundfile.write(wav, voice.astype(np.float32), 16000)
    heard = dub.dub_audio(bundle, wav, tiny_speaker.cfg.dub, tmp_path)
    assert heard.speaking.shape == (heard.n_frames,) == (75,)
    assert np.all(heard.speaking[28:47] == 0) and np.all(heard.speaking[:24] == 1) and np.all(heard.speaking[52:] == 1)
    source = dub.dub_source(bundle, heard)
    with torch.no_grad():
        assert source.conditions(bundle.model, np.arange(10)).speaking is None  # all speech: nothing to rest
        paused = source.conditions(bundle.model, np.arange(22, 32)).speaking
        # a dub's poses are training frames, its pauses the audio's
        at_other_poses = source.conditions(bundle.model, np.arange(22, 32), poses=np.zeros(10, int)).speaking
    np.testing.assert_allclose(paused.numpy(), heard.speaking[22:32])
    np.testing.assert_allclose(at_other_poses.numpy(), heard.speaking[22:32])


def test_the_evaluation_rests_every_moving_method_where_the_held_out_audio_pauses(model_and_codes, monkeypatch):
    from gstalker_core import evaluate
    from gstalker_core.model.avatar import GaussianState

    bundle, codes = model_and_codes
    model = bundle.model
    features = np.zeros((2 * len(bundle.viewmats), bundle.manifest.audio_spec.width), np.float32)
    speaking = np.ones(len(bundle.viewmats), np.float32)
    speaking[5:7] = [1 / 3, 0.0]
    source = FrameSource.build(bundle.viewmats, bundle.blink, bundle.K, bundle.plate, torch.device("cpu"), features,
                               speaking=speaking)
    lip = LipMotion(codes.mean(dim=0), 1.7, rest=codes[0])
    frames, nearest = np.array([4, 5, 6, 7]), np.array([0, 1, 1, 2])  # the borrowed frames never pause
    seen, draw = [], model.frames

    def recording(cond, deform=True, codes=None, lip=None):
        seen.append((cond.speaking, deform, lip))
        return draw(cond, deform=deform, codes=codes, lip=lip)

    monkeypatch.setattr(model, "frames", recording)
    with torch.no_grad():
        evaluate.render_methods(model, (GaussianState.of(model.head), GaussianState.of(model.torso)), source, frames,
                                nearest, lip=lip)
    by_method = dict(zip([m for m in evaluate.METHODS if m != "static"], seen))
    for name in ("gstalker", "no_lip_gain", "nearest"):
        rests, deform, motion = by_method[name]
        np.testing.assert_allclose(rests.numpy(), speaking[frames], err_msg=name)
        assert deform and torch.equal(motion.rest, codes[0]), name
    assert by_method["gstalker"][2] is lip and by_method["nearest"][2] is lip
    assert by_method["no_lip_gain"][2].gain == 1.0  # the same rest, at gain 1
    assert by_method["no_deformation"][1] is False


def test_held_out_pauses_are_measured_on_the_held_out_audio_alone():
    from gstalker_core.evaluate import held_out_pauses

    t = np.arange(4 * 16000) / 16000  # 100 frames: 2 s of training audio, 2 s held out
    samples = 0.3 * np.sin(2 * np.pi * 220 * t)
    samples[t >= 2.0] *= 10 ** (-45 / 20)  # a held-out voice 45 dB under the training one...
    samples[(t >= 3.0) & (t < 3.4)] = 0.0  # ...with a pause of its own
    pauses = held_out_pauses(samples.astype(np.float32), np.arange(50, 100), 100)
    assert np.all(pauses[:50] == 1)  # training frames: not measured
    assert np.all(pauses[50:74] == 1) and np.all(pauses[77:83] == 0) and np.all(pauses[87:] == 1)
