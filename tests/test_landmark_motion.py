"""The landmark teacher of the face field: geometry of the head-frame offsets, and that it
teaches an audio-driven mouth that generalises to audio the field never saw."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from gstalker_core.config import GaussianConfig, TrainConfig
from gstalker_core.deform import DeformConfig
from gstalker_core.deform.landmark_motion import canonical_offsets
from gstalker_core.errors import InputError
from gstalker_core.metrics.lipsync import pearson
from gstalker_core.model.talking_head import TalkingHead
from gstalker_core.render.gaussians import GaussianModel
from gstalker_core.data.conditions import FrameSource
from gstalker_core.train.train_deform import LandmarkGuide

K = np.array([[300.0, 0, 64], [0, 300.0, 64], [0, 0, 1]])


def _viewmats(n: int, rng) -> np.ndarray:
    views = np.tile(np.eye(4), (n, 1, 1))
    views[:, :3, :3] = Rotation.from_euler("xyz", rng.uniform(-15, 15, size=(n, 3)), degrees=True).as_matrix()
    views[:, :3, 3] = np.c_[rng.uniform(-0.02, 0.02, size=(n, 2)), rng.uniform(0.45, 0.6, size=n)]
    return views


def _project(points_head: np.ndarray, views: np.ndarray) -> np.ndarray:
    cam = np.einsum("nij,npj->npi", views[:, :3, :3], points_head) + views[:, None, :3, 3]
    pix = cam @ K.T
    return pix[..., :2] / pix[..., 2:]


def test_offsets_recover_known_motion_across_the_view_under_any_pose():
    rng = np.random.default_rng(0)
    template = rng.normal(scale=0.05, size=(478, 3))
    views = _viewmats(6, rng)
    # each point moves across the view (camera x, y; same depth): the lift is exact for that motion
    shift_cam = np.concatenate([rng.normal(scale=0.004, size=(6, 478, 2)), np.zeros((6, 478, 1))], axis=-1)
    truth = np.einsum("nji,npj->npi", views[:, :3, :3], shift_cam)  # into the head frame: R^T
    landmarks = _project(template[None] + truth, views)
    got = canonical_offsets(landmarks.astype(np.float32), views.astype(np.float32), K.astype(np.float32), template)
    np.testing.assert_allclose(got, truth, atol=2e-5)  # float32 inputs; offsets are ~4e-3
    still = canonical_offsets(_project(np.broadcast_to(template, (6, 478, 3)), views), views, K, template)
    np.testing.assert_allclose(still, 0.0, atol=1e-9)  # a rigidly moving head has no offsets


def test_guide_teaches_an_audio_driven_mouth_that_generalises(monkeypatch):
    """Loudness drops the jaw in a synthetic clip; trained on its first 80% only (every step's
    frames with frequency masks), the field predicts the jaw's motion in the last 20% from
    their audio alone."""
    rng = np.random.default_rng(1)
    n, n_features = 400, 12
    syllables = np.repeat(rng.uniform(size=n // 4) < 0.5, 8).astype(float)  # 160 ms on or off
    loudness = np.convolve(syllables, np.ones(4) / 4, mode="same")  # per audio step, 0 .. 1
    features = (rng.normal(scale=0.3, size=(2 * n, n_features)) + loudness[:, None] * np.linspace(0.5, 2, n_features)
                ).astype(np.float32)
    # offsets from the template (the clip's median mouth), in head-frame units (eye span ~0.1)
    gap = (loudness.reshape(n, 2).mean(axis=1) - 0.5) * 0.01
    template = rng.normal(scale=0.05, size=(478, 3)).astype(np.float32)
    jaw = template[:, 1] > 0.02  # +y is down: the lower face drops as the mouth opens
    motion = np.zeros((n, 478, 3), np.float32)
    motion[:, jaw, 1] = gap[:, None]
    views = np.tile(np.eye(4, dtype=np.float32), (n, 1, 1))
    views[:, 2, 3] = 0.5
    arrays = SimpleNamespace(landmarks=_project(template[None] + motion, views).astype(np.float32), viewmats=views,
                             K=K.astype(np.float32), template=template, valid=np.ones(n, bool), blink=np.zeros(n, np.float32))
    n_train = int(0.8 * n)
    train = SimpleNamespace(arrays=arrays, drawn=np.arange(n_train), indices=np.arange(n_train))
    deform = DeformConfig(hash_levels=4, hash_max_resolution=32, audio_channels=16, audio_code_dim=8, frame_window=4,
                          face_mlp_width=32, torso_mlp_width=8)
    torch.manual_seed(0)
    head = GaussianModel.init_points(GaussianConfig(), template, np.full((478, 3), 0.5))
    model = TalkingHead(deform, head, head, n_features, 8, torch.from_numpy(views[:n_train]))
    model.audio_encoder.set_feature_stats(features[: 2 * n_train])
    source = FrameSource.build(views, arrays.blink, arrays.K, np.zeros((8, 8, 3), np.uint8), torch.device("cpu"),
                               features)
    guide = LandmarkGuide(model, train, source, TrainConfig(guide_batch=16))
    masked_frames = []
    draw = source.draw_hidden_bands
    monkeypatch.setattr(source, "draw_hidden_bands",
                        lambda rng, masked, *args: masked_frames.append(masked) or draw(rng, masked, *args))
    optimizer = torch.optim.Adam([*model.audio_encoder.parameters(), *model.face_field.parameters()], lr=2e-3)
    first = guide.loss(0).item()
    for step in range(150):
        loss = guide.loss(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert len(masked_frames) == 151 and all(m.all() for m in masked_frames)  # even with no shifted voices
    assert 0.6 < first < 1.4  # zero-initialised field predicts no motion: relative loss ~1 (one batch)
    assert loss.item() < 0.5
    with torch.no_grad():
        test = np.arange(n_train, n)
        deltas = model.face_field(model.face_field.encode(torch.from_numpy(template)),
                                  model.audio_encoder.conditions(features, n_train, n), torch.ones(len(test)))
    predicted_gap = (deltas.d_means[:, jaw, 1].mean(1) - deltas.d_means[:, ~jaw, 1].mean(1)).numpy()
    assert pearson(predicted_gap, gap[test]) > 0.7


def test_a_clip_without_reliable_landmarks_is_refused_with_the_fix():
    """Every training frame a gap or a covered mouth: nothing to learn the mouth from."""
    n = 10
    template = np.random.default_rng(2).normal(scale=0.05, size=(478, 3)).astype(np.float32)
    views = np.tile(np.eye(4, dtype=np.float32), (n, 1, 1))
    views[:, 2, 3] = 0.5
    arrays = SimpleNamespace(landmarks=_project(np.broadcast_to(template, (n, 478, 3)), views).astype(np.float32),
                             viewmats=views, K=K.astype(np.float32), template=template, valid=np.zeros(n, bool),
                             blink=np.zeros(n, np.float32))
    train = SimpleNamespace(arrays=arrays, drawn=np.arange(n), indices=np.arange(n))
    head = GaussianModel.init_points(GaussianConfig(), template, np.full((478, 3), 0.5))
    model = TalkingHead(DeformConfig(), head, head, 12, 8, torch.from_numpy(views))
    with pytest.raises(InputError, match="no training frame has reliable landmarks") as err:
        LandmarkGuide(model, train, FrameSource.build(views, arrays.blink, arrays.K, np.zeros((8, 8, 3), np.uint8),
                                                      torch.device("cpu"), np.zeros((2 * n, 12), np.float32)),
                      TrainConfig())
    assert "QA video" in err.value.fix


def test_frequency_masks_hide_bands_of_the_chosen_frames_only():
    rng = np.random.default_rng(2)
    n, n_features = 40, 20
    features = rng.normal(size=(2 * n, n_features)).astype(np.float32) + 3  # no band reads 0 by chance
    views = _viewmats(n, rng).astype(np.float32)
    source = FrameSource.build(views, np.zeros(n, np.float32), K.astype(np.float32), np.zeros((8, 8, 3), np.uint8),
                               torch.device("cpu"), features, augmented=features[None] + 1)
    voices = np.array([0, 1, 1, 0, 1, 1, 1, 1])
    hidden = source.draw_hidden_bands(rng, voices > 0, n_masks=2, share=0.2)
    assert hidden.shape == (8, n_features) and not hidden[voices == 0].any() and hidden[voices > 0].any()
    assert hidden.sum(axis=1).max() <= 2 * 4  # two runs of at most 20% of 20 bands
    assert source.draw_hidden_bands(rng, voices > 0, 0, 0.2) is None
    assert source.draw_hidden_bands(rng, None, 2, 0.2) is None
    assert source.draw_hidden_bands(rng, np.ones(8, bool), 2, 0.2)[voices == 0].any()  # any frame can be masked
    deform = DeformConfig(hash_levels=4, hash_max_resolution=32, audio_channels=16, audio_code_dim=8, frame_window=4,
                          face_mlp_width=32, torso_mlp_width=8)
    template = rng.normal(scale=0.05, size=(478, 3)).astype(np.float32)
    head = GaussianModel.init_points(GaussianConfig(), template, np.full((478, 3), 0.5))
    model = TalkingHead(deform, head, head, n_features, 8, torch.from_numpy(views))
    frames = np.arange(10, 18)
    plain = source.conditions(model, frames, voices=voices).audio
    masked = source.conditions(model, frames, voices=voices, hidden_bands=hidden).audio
    where = torch.from_numpy(hidden)[:, None, None, :].expand_as(masked)
    assert (masked[where] == 0).all() and torch.equal(masked[~where], plain[~where])


def test_frequency_masks_never_hide_the_loudness_column():
    """The features' last column (the loudness, after the spec's n_features bands) stays: masks
    reach every band, the first and the last included, and never past them."""
    rng = np.random.default_rng(3)
    n, n_bands = 40, 20
    features = rng.normal(size=(2 * n, n_bands + 1)).astype(np.float32)
    source = FrameSource.build(_viewmats(n, rng).astype(np.float32), np.zeros(n, np.float32), K.astype(np.float32),
                               np.zeros((8, 8, 3), np.uint8), torch.device("cpu"), features, maskable_bands=n_bands)
    hidden = source.draw_hidden_bands(rng, np.ones(2000, bool), n_masks=2, share=0.5)
    assert hidden.shape == (2000, n_bands + 1) and not hidden[:, n_bands].any()
    assert hidden[:, 0].any() and hidden[:, n_bands - 1].any()
    assert hidden.sum(axis=1).max() <= 2 * 10  # two runs of at most half of the 20 bands
