"""The torso shift: tracked from the frames (``tracking.torso``), drawn by the renderer
(``avatar.render_avatar``), carried by the track and the bundle."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from gstalker_core import tracking
from gstalker_core.model.avatar import GaussianState, render_avatar, shifted_intrinsics
from gstalker_core.model.bundle import fetch_bundle
from gstalker_core.tracking.torso import torso_shifts

SIZE = 128


def _clip(shifts: np.ndarray, torso: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Frames of a still background and head, and a textured torso with sloping shoulders moved
    by ``shifts`` (N, 2) pixels; their parsing labels."""
    rng = np.random.default_rng(0)
    background = np.full((SIZE, SIZE, 3), (40, 80, 200), np.uint8)
    texture = cv2.GaussianBlur(rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8), (0, 0), 1.5)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    shoulders = yy > 80 + 0.25 * np.abs(xx - SIZE / 2)  # a torso below a shoulder line
    head = (xx - SIZE / 2) ** 2 / 20 ** 2 + (yy - 45) ** 2 / 28 ** 2 < 1
    frames, labels = [], []
    for dx, dy in shifts:
        move = np.float32([[1, 0, dx], [0, 1, dy]])
        mask = cv2.warpAffine(shoulders.astype(np.float32), move, (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE) > 0.5
        moved = cv2.warpAffine(texture, move, (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT)
        frame = np.where(mask[..., None] & torso, moved, background)
        frame[head] = (200, 160, 140)
        label = np.where(mask & torso, 3, 0).astype(np.uint8)
        label[head] = 1
        frames.append(frame)
        labels.append(label)
    return frames, labels


def test_the_tracked_shift_is_the_torso_motion_relative_to_its_median():
    rng = np.random.default_rng(1)
    truth = np.stack([np.round(rng.uniform(-5, 5, 30)), np.round(rng.uniform(-3, 3, 30))], 1)
    truth[:10] = 0  # the torso rests most of the clip: the median is its rest position
    truth[10:15] = [2.5, -1.5]  # and half pixels are found too
    frames, labels = _clip(truth)
    found = torso_shifts(frames, labels, lowest_chin=73.0)
    expected = truth - np.median(truth, axis=0)
    assert found.shape == (30, 2) and found.dtype == np.float32
    assert np.abs(found - expected).max() < 0.35, np.abs(found - expected).max()


def test_a_clip_without_torso_has_no_shift():
    frames, labels = _clip(np.zeros((6, 2)), torso=False)
    assert np.array_equal(torso_shifts(frames, labels, lowest_chin=73.0), np.zeros((6, 2), np.float32))


def test_the_torso_layer_is_drawn_moved_by_its_shift(tiny_speaker):
    bundle = fetch_bundle(tiny_speaker.store, tiny_speaker.bundle, tiny_speaker.cfg.cache_dir)
    head, torso = GaussianState.of(bundle.model.head), GaussianState.of(bundle.model.torso)
    plate = torch.zeros(*bundle.plate.shape)
    viewmats = torch.from_numpy(bundle.viewmats[[0, 0]])
    K = torch.from_numpy(bundle.K)
    with torch.no_grad():
        still = render_avatar(head, torso, viewmats, K, plate)
        moved = render_avatar(head, torso, viewmats, K, plate, torso_shift=torch.tensor([[0.0, 0.0], [3.0, -2.0]]))
    assert torch.allclose(moved.torso_rgb[0], still.torso_rgb[0], atol=1e-6)  # a zero shift changes nothing
    # shifted by whole pixels, the torso image is the same image moved (inside the frame)
    assert torch.allclose(moved.torso_rgb[1, :-2, 3:], still.torso_rgb[0, 2:, :-3], atol=1e-5)
    assert torch.allclose(moved.head_rgb, still.head_rgb)  # the head is the head's business
    Ks = shifted_intrinsics(K, torch.tensor([[3.0, -2.0]]))
    assert torch.equal(Ks[0, :2, 2], K[:2, 2] + torch.tensor([3.0, -2.0])) and torch.equal(K, torch.from_numpy(bundle.K))


def test_the_track_and_the_bundle_carry_the_torso_shift(tiny_speaker):
    sp = tiny_speaker
    arrays = tracking.open_dataset(sp.store, sp.track, sp.ingest, sp.cfg.cache_dir, split="train").arrays
    assert arrays.torso_shift.shape == (len(arrays.viewmats), 2) and np.isfinite(arrays.torso_shift).all()
    bundle = fetch_bundle(sp.store, sp.bundle, sp.cfg.cache_dir)
    assert np.array_equal(bundle.torso_shift, arrays.torso_shift[: bundle.manifest.n_train_frames])
