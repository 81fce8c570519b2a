import librosa
import numpy as np
import pytest
import soundfile

from gstalker_core import audio
from gstalker_core.config import AudioConfig
from gstalker_core.errors import InputError

SR = 16000


def tone_burst(start_s: float, total_s: float = 2.0, freq: float = 1000.0) -> np.ndarray:
    t = np.arange(int(total_s * SR)) / SR
    rng = np.random.default_rng(0)
    x = 1e-4 * rng.standard_normal(len(t))  # a noise floor, as in real recordings
    x[t >= start_s] += 0.5 * np.sin(2 * np.pi * freq * t[t >= start_s])
    return x.astype(np.float32)


@pytest.fixture
def spec():
    """Raw log-mel bands in dB (no per-utterance normalisation, no loudness column), whose levels these tests read."""
    return audio.spec_for(AudioConfig(n_features=40, normalise="none", loudness=False), SR)


def test_steps_are_50hz_and_two_per_video_frame(spec):
    feats = audio.compute_features(tone_burst(1.0), spec, n_frames=50)
    assert feats.shape == (100, 40) and feats.dtype == np.float32
    # without n_frames, every started 40 ms frame gets its two steps: 2.01 s -> 51 frames
    assert audio.compute_features(np.zeros(int(2.01 * SR), np.float32) + 1e-3, spec).shape[0] == 102


def test_onset_lands_on_the_owning_video_frame(spec):
    # a tone starting at 1.00 s = video frame 25 = audio steps 50, 51
    energy = audio.compute_features(tone_burst(1.0), spec, n_frames=50).max(axis=1)
    quiet, loud = energy[:45].mean(), energy[55:].mean()
    assert loud - quiet > 30  # dB
    # steps whose 50 ms analysis window ends before the onset are quiet, the ones after it loud
    assert energy[48] < quiet + 5 and energy[52] > loud - 5
    assert energy[51] > (quiet + loud) / 2  # centred at 1.03 s


def test_loudness_does_not_change_features(spec):
    x = tone_burst(0.5)
    a = audio.compute_features(x, spec, n_frames=50)
    b = audio.compute_features(0.05 * x, spec, n_frames=50)
    assert np.abs(a - b)[20:].max() < 0.5


def test_silence_gives_finite_features(spec):
    feats = audio.compute_features(np.zeros(SR, np.float32), spec, n_frames=25)
    assert np.isfinite(feats).all()


def test_mfcc_kind(spec):
    mfcc_spec = audio.spec_for(AudioConfig(kind="mfcc", n_features=13, normalise="none", loudness=False), SR)
    assert audio.compute_features(tone_burst(0.5), mfcc_spec, n_frames=50).shape == (100, 13)


def test_loudness_column_is_the_bands_mean_power():
    """The column after the bands is the step's loudness: the dB of its bands' mean power, so it
    rises with the tone's onset on the owning frame and never exceeds the loudest band."""
    spec = audio.spec_for(AudioConfig(n_features=40, normalise="none"), SR)
    assert spec.loudness and spec.width == 41
    feats = audio.compute_features(tone_burst(1.0), spec, n_frames=50)
    bands, loudness = feats[:, :40], feats[:, 40]
    assert feats.shape == (100, 41)
    np.testing.assert_allclose(loudness, 10 * np.log10(np.mean(10 ** (bands.astype(np.float64) / 10), axis=1)),
                               atol=1e-3)
    assert (loudness <= bands.max(axis=1) + 1e-4).all()
    assert loudness[55:].mean() - loudness[:45].mean() > 20 and loudness[52] > loudness[48] + 20


def test_loudness_column_leaves_the_bands_as_they_were():
    """Normalised per utterance, the bands are the same with and without the column after them
    (the noise gate and the choice of speech steps still read the bands' levels), and the column
    is normalised as they are: zero mean and unit spread over the speech."""
    x = tone_burst(0.6) + np.float32(0.05) * np.sin(np.arange(2 * SR, dtype=np.float32) / 37)
    with_column, without = (audio.compute_features(x, audio.spec_for(AudioConfig(n_features=40, loudness=on), SR),
                                                   n_frames=50) for on in (True, False))
    np.testing.assert_allclose(with_column[:, :40], without, atol=1e-5)
    raw = audio.compute_features(x, audio.spec_for(AudioConfig(n_features=40, normalise="none"), SR), n_frames=50)
    speech = raw[:, :40].max(axis=1) >= raw[:, :40].max() - audio.ACTIVE_DB_BELOW_PEAK
    assert abs(with_column[speech, 40].mean()) < 1e-3 and abs(with_column[speech, 40].std() - 1) < 1e-3


def test_a_spec_stored_before_the_loudness_column_reads_as_without_it():
    """Stores and bundles from before the column lack the field: their features stay as wide as
    their bands, and dubbing computes them the same way again."""
    from gstalker_core.dub import installed_spec

    without = audio.spec_for(AudioConfig(n_features=40, loudness=False), SR)
    stored = without.model_dump(mode="json")
    del stored["loudness"]
    old = audio.AudioFeatureSpec.model_validate(stored)
    assert old == without and old.width == 40 and installed_spec(old) == old
    assert audio.compute_features(tone_burst(0.5), old, n_frames=50).shape == (100, 40)


def test_frame_window_is_centred_on_the_frames_own_steps():
    feats = np.arange(40, dtype=np.float32)[:, None]
    win = audio.frame_windows(feats, [5, 0, 19], step_window=8)[..., 0]
    assert win[0].tolist() == [7, 8, 9, 10, 11, 12, 13, 14]  # frame 5 owns steps 10, 11
    assert win[1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]  # edge-padded at the start
    assert win[2].tolist() == [35, 36, 37, 38, 39, 39, 39, 39]


def test_spec_mismatch_is_refused_with_the_field_named(spec):
    other = audio.spec_for(AudioConfig(n_features=80), 22050)
    with pytest.raises(InputError) as e:
        audio.check_spec(other, spec)
    msg = str(e.value)
    assert "n_features: 80 (model expects 40)" in msg and "sample_rate" in msg and "fix:" in msg


def test_odd_step_window_is_a_config_error():
    with pytest.raises(ValueError, match="even"):
        AudioConfig(step_window=15)


def _whole_signal_features(samples: np.ndarray, spec: audio.AudioFeatureSpec, n_frames: int) -> np.ndarray:
    """The reference: loudness and log-mel of the whole signal at once, librosa's centred framing."""
    frame_rms = librosa.feature.rms(y=samples, frame_length=1024, hop_length=256)[0]
    active = frame_rms[frame_rms >= frame_rms.max() * 10 ** (-audio.ACTIVE_DB_BELOW_PEAK / 20)]
    samples = (samples * (audio.TARGET_ACTIVE_RMS / float(np.sqrt(np.mean(active**2))))).astype(np.float32)
    hop, n_steps = spec.hop_length, 2 * n_frames
    shifted = samples[hop // 2:]
    shifted = np.pad(shifted, (0, max(0, n_steps * hop - len(shifted))))
    mel = librosa.feature.melspectrogram(y=shifted, sr=spec.sample_rate, n_fft=spec.n_fft, hop_length=hop,
                                         n_mels=spec.n_features if spec.kind == "logmel" else 80,
                                         fmin=spec.fmin, fmax=spec.fmax, center=True)
    logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    feats = logmel if spec.kind == "logmel" else librosa.feature.mfcc(S=logmel, n_mfcc=spec.n_features)
    if spec.loudness:
        feats = np.vstack([feats, librosa.power_to_db(mel.mean(axis=0), ref=1.0, amin=1e-10, top_db=None)])
    return feats.T[:n_steps]


# Chunked features equal the whole signal's to float32 rounding (the mel matmul sums in a different
# order per chunk): 1e-4 on log-mel values of tens of dB, plus 1e-6 relative for MFCC's c0 of
# several hundred, where one float32 ulp is already 6e-5. Observed: 8e-6 (log-mel), 6e-5 (MFCC).
ATOL, RTOL = 1e-4, 1e-6


@pytest.mark.parametrize("cfg", [AudioConfig(normalise="none"),
                                 AudioConfig(kind="mfcc", n_features=13, n_fft=256, normalise="none",
                                             loudness=False)],
                         ids=["logmel-nfft800", "mfcc-nfft-below-hop"])
@pytest.mark.parametrize("chunk_steps, block", [(37, 1000), (1, 4099), (audio.CHUNK_STEPS, audio.BLOCK_SAMPLES)])
def test_chunked_features_equal_whole_signal_features(shared_data, cfg, chunk_steps, block):
    samples, rate = soundfile.read(shared_data / "english_speech_60s.wav", dtype="float32", frames=12 * 16000 + 123)
    assert rate == SR
    spec = audio.spec_for(cfg, SR)
    n_frames = 12 * 25 + 7  # a little past the end: the tail is zeros in both
    chunked = audio.compute_features(audio.Signal.of_array(samples, SR, block=block), spec, n_frames,
                                     chunk_steps=chunk_steps)
    np.testing.assert_allclose(chunked, _whole_signal_features(samples, spec, n_frames), rtol=RTOL, atol=ATOL)


def test_utterance_normalisation_removes_a_voice_colour(shared_data):
    """The same speech through a fixed filter (another vocal tract or microphone colours every
    band by a constant) gives features that differ by band offsets in raw log-mel, and nearly
    the same features after per-utterance normalisation, which has zero mean and unit spread
    over the speech."""
    import scipy.signal

    samples, _ = soundfile.read(shared_data / "english_speech_60s.wav", dtype="float32", frames=8 * SR)
    coloured = scipy.signal.lfilter([1.0, -0.9], [1.0], samples).astype(np.float32)  # strong high-frequency tilt
    raw, norm = (audio.spec_for(AudioConfig(n_features=40, normalise=mode), SR) for mode in ("none", "utterance"))
    raw_a, raw_b = audio.compute_features(samples, raw), audio.compute_features(coloured, raw)
    a, b = audio.compute_features(samples, norm), audio.compute_features(coloured, norm)
    speech = raw_a.max(axis=1) >= raw_a.max() - audio.ACTIVE_DB_BELOW_PEAK
    assert np.abs(a[speech].mean(0)).max() < 1e-3 and np.allclose(a[speech].std(0), 1.0, atol=1e-3)
    # the gap between the two voices, in units of each feature's spread over the speech
    raw_gap = (np.abs(raw_a - raw_b)[speech] / raw_a[speech].std(0)).mean()
    norm_gap = np.abs(a - b)[speech].mean()
    assert norm_gap < 0.5 * raw_gap, (norm_gap, raw_gap)
    assert np.corrcoef(a[speech].ravel(), b[speech].ravel())[0, 1] > 0.9


def test_pitch_shifted_versions_stay_frame_aligned(spec):
    """Training hears pitch-shifted copies of its audio: each keeps the original's steps, and a
    tone onset stays on its video frame."""
    versions = audio.pitch_shifted_features(tone_burst(1.0), spec, 50, [-3.0, 3.0])
    assert versions.shape == (2, 100, 40)
    for feats in versions:
        energy = feats.max(axis=1)
        assert energy[55:].mean() - energy[:45].mean() > 30


def _voice_with_gaps(gaps_s: list[tuple[float, float]], total_s: float = 3.0, floor: float = 1e-4) -> np.ndarray:
    """A 220 Hz voice, its loudness swinging 10 dB at 3 Hz as syllables do, silent (down to a
    noise floor) in ``gaps_s``."""
    t = np.arange(int(total_s * SR)) / SR
    voice = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    for start, stop in gaps_s:
        voice[(t >= start) & (t < stop)] = 0.0
    return (voice + floor * np.random.default_rng(0).standard_normal(len(t))).astype(np.float32)


def test_a_voice_pauses_where_it_falls_silent_and_not_in_a_short_stop():
    n_frames = 75  # 3 s at 25 fps
    # a half-second pause, then a 100 ms stop (a frame or two under the level, bridged)
    speaking = audio.speaking(audio.Signal.of_array(_voice_with_gaps([(1.0, 1.5), (2.0, 2.1)]), SR), n_frames, 25)
    assert speaking.shape == (n_frames,) and speaking.dtype == np.float32
    assert speaking.min() >= 0 and speaking.max() <= 1
    # the pause: frame i covers [40i, 40i + 40) ms, and the RMS frames are 64 ms wide, so frames
    # 25 and 36 still hear the voice's edge; 26-35 are the pause, whose edges ramp over a frame
    assert np.all(speaking[27:35] == 0)
    np.testing.assert_allclose(speaking[[25, 26, 35, 36]], [2 / 3, 1 / 3, 1 / 3, 2 / 3], atol=1e-6)
    assert np.all(speaking[:25] == 1) and np.all(speaking[37:] == 1)  # the stop at frames 50-52 included
    # a voice with no pause speaks throughout; one that stays this far under its peak does not
    assert np.all(audio.speaking(audio.Signal.of_array(_voice_with_gaps([]), SR), n_frames, 25) == 1)
    quiet = _voice_with_gaps([])
    quiet[: SR] *= 10 ** (-(audio.PAUSE_DB_BELOW_PEAK + 10) / 20)
    speaking = audio.speaking(audio.Signal.of_array(quiet, SR), n_frames, 25)
    assert np.all(speaking[:23] == 0) and np.all(speaking[25:] == 1)


def test_a_pause_is_relative_to_the_utterances_level_and_found_in_blocks():
    gaps = [(0.5, 1.1), (2.2, 2.6)]
    loud = audio.speaking(audio.Signal.of_array(_voice_with_gaps(gaps), SR), 75, 25)
    # 30 dB quieter throughout, noise floor included: the same pauses
    soft = audio.speaking(audio.Signal.of_array(_voice_with_gaps(gaps, floor=1e-4) * 10 ** (-30 / 20), SR), 75, 25)
    np.testing.assert_array_equal(loud, soft)
    # read in small blocks, as a dub reads its wav: the same
    blocks = audio.speaking(audio.Signal.of_array(_voice_with_gaps(gaps), SR, block=999), 75, 25)
    np.testing.assert_array_equal(loud, blocks)
    assert loud[14:27].min() == 0 and loud[56:64].min() == 0 and loud[40] == 1  # both pauses, speech between


def test_an_utterances_last_frame_of_a_few_milliseconds_still_speaks():
    # 4580 samples: 8 frames at 25 fps, the last 100 samples long, holding no RMS frame's centre
    t = np.arange(4580) / SR
    voice = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    np.testing.assert_array_equal(audio.speaking(audio.Signal.of_array(voice, SR), 8, 25), np.ones(8, np.float32))
