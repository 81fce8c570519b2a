"""Tracking and parsing on synthetic clips built from a real face (skimage's astronaut).

Geometry is checked against the known 2D similarity warps that made the clip: an in-plane
rotation by theta of the image is a camera roll by -theta (OpenCV axes, y down), a zoom
by s divides the head's depth by s, and a shift moves the projected head centre.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from gstalker_core.errors import ConfigError, InputError
from gstalker_core.tracking import (BACKGROUND, HEAD, NECK, TORSO, FrameRange, SpeakerDataset, TrackArrays, TrackConfig,
                                    track_clip)
from gstalker_core.tracking import parsing
from gstalker_core.tracking.parsing import BEHIND_HEAD_BAND
from gstalker_core.tracking import pose
from gstalker_core.tracking.landmarks import make_backend
from gstalker_core.tracking.plate import background_plate
from gstalker_core.tracking.topology import FACEMESH
from gstalker_core.tracking.track import LABELS, PLATE, QA_VIDEO
from gstalker_core.data.frames import ChunkReader

FACE_CENTRE = (224.0, 130.0)  # astronaut(): between the eyes, a little low (hair above)
MOUTH_CENTRE, MOUTH_WIDTH = (223, 147), 43  # astronaut(): the lips (she smiles, teeth showing)
CHEEK = (slice(110, 122), slice(188, 200))  # astronaut(): bare skin on her right cheekbone
CROP_SIDE = 320.0  # source pixels mapped onto one output frame


def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def warp_matrix(size: int, theta_deg: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    """2x3: astronaut -> output frame (face centred), then rotate/zoom about the centre and shift."""
    k = size / CROP_SIDE
    crop = np.array([[k, 0, size / 2 - k * FACE_CENTRE[0]], [0, k, size / 2 - k * FACE_CENTRE[1]], [0, 0, 1]])
    move = np.vstack([cv2.getRotationMatrix2D((size / 2, size / 2), theta_deg, scale), [0, 0, 1]])
    move[:2, 2] += shift
    return (move @ crop)[:2]


def warped_face(size: int, source: np.ndarray | None = None, **motion) -> np.ndarray:
    return cv2.warpAffine(astronaut() if source is None else source, warp_matrix(size, **motion), (size, size),
                          flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT_101)


def hand_over_mouth(image: np.ndarray) -> np.ndarray:
    """Four fingers across the mouth, in the face's own cheek colour with creases between them."""
    out = image.copy()
    skin = np.median(image[CHEEK].reshape(-1, 3), axis=0)
    cx, finger = MOUTH_CENTRE[0], 12
    for k in range(4):
        y = MOUTH_CENTRE[1] - 23 + (k + 0.5) * finger
        cv2.ellipse(out, (cx + 4 * k, round(y)), (41, finger // 2), 0, 0, 360, (skin * (0.93 + 0.03 * (k % 2))).tolist(),
                    -1, cv2.LINE_AA)
        cv2.line(out, (cx - 35, round(y + finger / 2)), (cx + 39, round(y + finger / 2)), (skin * 0.75).tolist(), 1,
                 cv2.LINE_AA)
    return out


def motion(k: int, n: int) -> dict:
    """A head-like motion, one period over the clip: roll up to 12 deg (at most ~38 deg/s over
    50 frames), depth +-10 %, shifts of ~10 % of a 128 px frame."""
    a = 2 * math.pi * k / n
    return dict(theta_deg=12 * math.sin(a), scale=math.exp(0.1 * math.sin(2 * a)),
                shift=(10 * math.sin(2 * a), -8 * math.sin(a)))


@pytest.fixture(scope="module")
def moving_clip(tmp_path_factory):
    """50 frames at 128 px: rolling, zooming, shifting face; tracked once for several tests."""
    n, size = 50, 128
    frames = [warped_face(size, **motion(k, n)) for k in range(n)]
    workdir = tmp_path_factory.mktemp("moving")
    manifest = track_clip(frames, TrackConfig(), workdir, chunk_frames=16)
    return frames, manifest, workdir


def test_relative_poses_follow_the_known_warps(moving_clip):
    frames, manifest, workdir = moving_clip
    n, size = len(frames), frames[0].shape[0]
    views = np.load(workdir / "viewmats.npy")
    K = np.load(workdir / "K.npy")
    assert views.shape == (n, 4, 4) and views.dtype == np.float32 and K.shape == (3, 3)
    assert K[0, 2] == size / 2 and K[1, 2] == size / 2 and K[0, 0] == pytest.approx(manifest.focal)
    centre = pose.project(np.zeros((1, 3)), views, K)[:, 0]  # projected template origin, per frame
    for k in range(1, n):
        m = motion(k, n)
        rel = Rotation.from_matrix(views[k, :3, :3] @ views[0, :3, :3].T).as_rotvec(degrees=True)
        assert rel[2] == pytest.approx(-m["theta_deg"], abs=2.5), k
        assert np.abs(rel[:2]).max() < 3.5, k
        assert views[k, 2, 3] / views[0, 2, 3] == pytest.approx(1 / m["scale"], rel=0.05), k
        # the head centre moves with the image: u_k = A_k(u_0), A_k = the frame's warp relative to frame 0
        relative = np.vstack([cv2.getRotationMatrix2D((size / 2, size / 2), m["theta_deg"], m["scale"]), [0, 0, 1]])
        relative[:2, 2] += m["shift"]
        expected = relative[:2, :2] @ centre[0] + relative[:2, 2]
        assert np.linalg.norm(centre[k] - expected) < 1.5, (k, centre[k], expected)


def test_reprojection_and_jitter_figures(moving_clip):
    _, manifest, workdir = moving_clip
    assert manifest.reprojection_error_px < 2.0
    assert manifest.n_valid == manifest.n_frames and manifest.gaps == [] and manifest.mouth_covered == []
    assert not any("second face" in w for w in manifest.warnings)
    assert 0 < manifest.jitter_smoothed_px <= manifest.jitter_raw_px * 1.05
    landmarks = np.load(workdir / "landmarks.npy")
    template = np.load(workdir / "template.npy")
    views = np.load(workdir / "viewmats.npy")
    # the whole template (not only the stable points used for the fit) lands near the face's landmarks
    proj = pose.project(template.astype(np.float64), views, np.load(workdir / "K.npy").astype(np.float64))
    assert landmarks.shape == (manifest.n_frames, 478, 3) and template.shape == (478, 3)
    assert np.median(np.linalg.norm(proj - landmarks[..., :2], axis=-1)) < 3.0


def test_blink_split_and_parts(moving_clip):
    frames, manifest, workdir = moving_clip
    blink = np.load(workdir / "blink.npy")
    assert blink.shape == (len(frames),) and blink.min() >= 0 and blink.max() <= 1
    assert manifest.train == FrameRange(start=0, stop=46) and manifest.test == FrameRange(start=46, stop=50)
    plate = cv2.imread(str(workdir / PLATE))
    assert plate.shape == frames[0].shape
    assert (workdir / QA_VIDEO).stat().st_size > 1000


def test_labels_put_the_head_above_the_jaw(moving_clip):
    frames, manifest, workdir = moving_clip
    labels = ChunkReader(sorted(workdir.glob(f"{LABELS}_*.npz")), manifest.chunk_frames, manifest.n_frames)
    lm = np.load(workdir / "landmarks.npy")[0]
    first = labels[0]
    assert first.shape == frames[0].shape[:2] and set(np.unique(first)) <= {0, 1, 2, 3}
    chin, top = lm[FACEMESH.chin, :2], lm[FACEMESH.top, :2]
    face_h = np.linalg.norm(chin - top)
    x, y = int(top[0]), int(top[1] + 0.1 * face_h)
    assert first[y, x] == HEAD  # forehead
    assert first[int(top[1] - 0.1 * face_h), x] == HEAD  # hair above it
    rows = np.nonzero(first == HEAD)[0]
    assert rows.max() <= chin[1] + 2  # upright in frame 0: nothing below the chin is head
    below = first[int(chin[1] + 0.15 * face_h):, int(chin[0]) - 2:int(chin[0]) + 3]
    assert (below == NECK).any() and not (below == HEAD).any()
    assert (first == TORSO).any()


@pytest.mark.parametrize("fov", [15.0, 30.0, 45.0])
def test_focal_search_recovers_the_field_of_view_of_a_turning_head(moving_clip, fov):
    """Landmarks as the detector gives them (perspective x, y; weak-perspective relative z)
    of the learned face shape turning +-25 deg under a known pinhole."""
    template = np.load(moving_clip[2] / "template.npy").astype(np.float64)
    size, n = 256, 40
    focal = pose.focal_from_fov(fov, size)
    a = np.linspace(0, 2 * np.pi, n)
    rots = Rotation.from_euler("YXZ", np.c_[25 * np.sin(a), 12 * np.sin(2 * a), 5 * np.sin(a)], degrees=True)
    distance = focal * pose.EYE_SPAN / 90  # eye corners ~90 px apart
    cam = np.einsum("nij,pj->npi", rots.as_matrix(), template) + [0, 0, distance]
    landmarks = np.concatenate([cam[..., :2] / cam[..., 2:] * focal + size / 2,
                                ((cam[..., 2] - distance) * focal / distance)[..., None]], axis=-1)
    choice = pose.choose_focal(landmarks, np.ones(n, bool), size, (8.0, 60.0), n, FACEMESH)
    assert math.degrees(2 * math.atan(size / 2 / choice.focal)) == pytest.approx(fov, abs=1.0)
    assert choice.spread > 0.05 * choice.residual  # determined: not the prior's case


def test_too_small_face_is_refused(tmp_path):
    frames = [warped_face(96) for _ in range(5)]
    with pytest.raises(InputError) as err:
        track_clip(frames, TrackConfig(min_face_fraction=0.6, qa_video=False), tmp_path)
    assert "face is only" in err.value.problem and "crop_scale" in err.value.fix


def test_second_face_is_warned_about(tmp_path):
    from tests.fixtures.media import render_frames

    frames = list(render_frames(26, 128, 128, faces="two"))
    manifest = track_clip(frames, TrackConfig(qa_video=False), tmp_path)
    assert any("second face" in w for w in manifest.warnings)


def clip_with_black(n: int, size: int, black: tuple[int, int]) -> list[np.ndarray]:
    frames = [warped_face(size, theta_deg=3 * math.sin(k / 5)) for k in range(n)]
    for k in range(black[0], black[1] + 1):
        frames[k] = np.zeros_like(frames[k])
    return frames


def test_long_black_stretch_names_the_frames(tmp_path):
    frames = clip_with_black(36, 64, (10, 25))
    with pytest.raises(InputError) as err:
        track_clip(frames, TrackConfig(max_gap_frames=12, qa_video=False), tmp_path)
    assert "frames 10-25" in err.value.problem and "black" in err.value.problem
    assert "trim" in err.value.fix


def test_short_gap_is_interpolated_and_marked(tmp_path):
    frames = clip_with_black(30, 96, (12, 15))
    manifest = track_clip(frames, TrackConfig(qa_video=False), tmp_path, chunk_frames=10)
    valid = np.load(tmp_path / "valid.npy")
    assert manifest.gaps == [FrameRange(start=12, stop=16)]
    assert not valid[12:16].any() and valid[:12].all() and valid[16:].all()
    views = np.load(tmp_path / "viewmats.npy")
    tz = views[:, 2, 3]
    lo, hi = sorted((tz[11], tz[16]))
    assert np.all((tz[12:16] >= lo - 1e-3) & (tz[12:16] <= hi + 1e-3))  # between its neighbours
    lm = np.load(tmp_path / "landmarks.npy")
    assert np.allclose(lm[13], lm[11] + (lm[16] - lm[11]) * 2 / 5, atol=1e-3)  # linear in time
    assert any("interpolated" in w for w in manifest.warnings)


def test_hand_over_the_mouth_is_marked_and_left_out_of_training(tmp_path):
    """FaceMesh still returns a mesh under the hand (a closed-mouth guess, pose intact): the
    frames stay valid, are marked mouth-covered, named in a warning and never drawn for training."""
    from gstalker_core.metrics.lipsync import mouth_opening

    n, size, covered = 50, 128, range(20, 30)
    hand = hand_over_mouth(astronaut())
    frames = [warped_face(size, source=hand if k in covered else None, **motion(k, n)) for k in range(n)]
    manifest = track_clip(frames, TrackConfig(qa_video=False), tmp_path, chunk_frames=16)
    assert manifest.mouth_covered == [FrameRange(start=20, stop=30)]
    assert manifest.n_valid == n  # the rigid points, and so the pose, are unaffected
    assert any("mouth looks covered" in w and "frames 20-29" in w for w in manifest.warnings)
    arrays = TrackArrays.load({p.name: p for p in tmp_path.iterdir()})
    assert np.flatnonzero(arrays.mouth_covered).tolist() == list(covered)
    opening = mouth_opening(arrays.landmarks, FACEMESH)
    assert opening[list(covered)].max() < 0.5 * np.median(opening)  # the mouth landmarks there are a guess
    labels = ChunkReader(sorted(tmp_path.glob(f"{LABELS}_*.npz")), manifest.chunk_frames, n)
    train = SpeakerDataset(frames, labels, manifest, arrays, split="train")
    drawn = {train.index_at(step) for step in range(3 * len(train))}
    assert drawn == set(range(manifest.train.stop)) - set(covered)
    assert train[25].index == 25  # indexing still reaches the covered frames


def test_scene_cut_is_refused(tmp_path):
    frames = [warped_face(64) for _ in range(10)] + [np.full((64, 64, 3), 230, np.uint8) for _ in range(10)]
    frames[10:] = [np.ascontiguousarray(255 - f) for f in frames[:10]]
    with pytest.raises(InputError) as err:
        track_clip(frames, TrackConfig(qa_video=False), tmp_path)
    assert "scene cut" in err.value.problem and "frame 10" in err.value.problem


def test_plate_recovers_the_background_behind_a_moving_head(tmp_path):
    n, size = 30, 96
    yy, xx = np.mgrid[0:size, 0:size]
    background = np.stack([xx * 2, yy * 2, (xx + yy) % 64 + 60], -1).astype(np.uint8)
    head = warped_face(48)
    ellipse = np.zeros((48, 48), np.uint8)
    cv2.ellipse(ellipse, (24, 22), (17, 23), 0, 0, 360, 1, -1)
    frames, covered = [], []
    for k in range(n):
        x0 = int(round(4 + (size - 56) * (0.5 + 0.5 * math.sin(2 * math.pi * k / n))))
        frame, mask = background.copy(), np.zeros((size, size), bool)
        region = (slice(30, 78), slice(x0, x0 + 48))
        frame[region] = np.where(ellipse[..., None] > 0, head, frame[region])
        mask[region] = ellipse > 0
        frames.append(frame)
        covered.append(mask)
    manifest = track_clip(frames, TrackConfig(qa_video=False, min_face_fraction=0.05, scene_cut_min_level=60),
                          tmp_path)
    plate = cv2.cvtColor(cv2.imread(str(tmp_path / PLATE)), cv2.COLOR_BGR2RGB)
    free_often = np.mean(covered, axis=0) < 0.4  # uncovered in most frames
    err = np.abs(plate.astype(int) - background)[free_often].mean()
    assert err < 6, err
    assert manifest.plate_inpainted_fraction < 0.1


def test_plate_inpaints_pixels_never_uncovered():
    frames = np.full((5, 32, 32, 3), 100, np.uint8)
    person = np.zeros((5, 32, 32), bool)
    person[:, 10:20, 10:20] = True
    frames[:, 10:20, 10:20] = 250
    plate, fraction = background_plate(frames, person, dilate_px=0)
    assert fraction == pytest.approx(100 / 1024)
    assert np.abs(plate.astype(int) - 100).max() < 5  # inpainted from the surroundings, not the person


def test_masked_median_matches_numpy():
    from gstalker_core.tracking.plate import _masked_median

    rng = np.random.default_rng(2)
    values = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    masked = rng.random((7, 5, 6)) < 0.5
    masked[:, 0, 0] = True  # never seen
    got = _masked_median(values, masked)
    for y, x in np.ndindex(5, 6):
        keep = ~masked[:, y, x]
        want = np.median(values[keep, y, x].astype(float), axis=0) if keep.any() else np.zeros(3)
        assert np.abs(got[y, x] - np.round(want)).max() <= 0.5 + 1e-9, (y, x)


def compose_targets(frame: np.ndarray, labels: np.ndarray, plate: np.ndarray) -> tuple[np.ndarray, ...]:
    """``parsing.compose_targets`` of one numpy image, as numpy."""
    out = parsing.compose_targets(torch.from_numpy(frame)[None], torch.from_numpy(labels)[None], torch.from_numpy(plate))
    return tuple(part[0].numpy() for part in out)


def silhouette_ring(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return tuple(ring[0].numpy() for ring in parsing.silhouette_ring(torch.from_numpy(labels)[None]))


def behind_head(labels: np.ndarray, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask, colour = parsing.behind_head(torch.from_numpy(labels)[None], torch.from_numpy(img)[None].float())
    return mask[0].numpy(), colour[0].numpy()


def test_compose_targets_recomposes_the_frame():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    plate = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (16, 16)).astype(np.uint8)
    labels[:5] = BACKGROUND  # a band of background, beyond the ring (rows 0-3)
    head_rgb, head_a, torso_rgb, torso_a = compose_targets(frame, labels, plate)
    torso_over_plate = torso_a[..., None] * torso_rgb + (1 - torso_a[..., None]) * plate / 255.0
    full = head_a[..., None] * head_rgb + (1 - head_a[..., None]) * torso_over_plate
    head_ring, body_ring = silhouette_ring(labels)
    owned = (labels > 0) | head_ring | body_ring
    expected = np.where(owned[..., None], frame, plate) / 255.0
    assert np.allclose(full, expected, atol=1e-6)
    assert np.all(head_a == ((labels == HEAD) | head_ring))
    assert not owned[:4].any() and owned[4].any()
    hidden_neck, _ = behind_head(labels, frame / 255.0)
    under_head = (labels == HEAD) & ~hidden_neck
    assert np.allclose(torso_rgb[under_head], plate[under_head] / 255.0)  # the torso never sees the head



def test_compose_targets_of_a_batch_are_each_frames_own():
    """Frames composed in one batch (as a training step does) get exactly their own targets."""
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    labels = np.zeros((3, 24, 20), np.uint8)
    for i, (head_rows, neck_cols) in enumerate([(slice(2, 12), slice(6, 12)), (slice(4, 16), slice(3, 9)),
                                                 (slice(0, 8), slice(10, 18))]):
        labels[i, head_rows, 4:16] = HEAD
        labels[i, head_rows.stop:head_rows.stop + 4, neck_cols] = NECK
        labels[i, head_rows.stop + 4:, 1:19] = TORSO
    plate = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    batch = parsing.compose_targets(torch.from_numpy(frames), torch.from_numpy(labels), torch.from_numpy(plate))
    for i in range(3):
        alone = compose_targets(frames[i], labels[i], plate)
        for together, single in zip(batch, alone):
            assert np.array_equal(together[i].numpy(), single)

def test_layers_own_the_silhouette_ring():
    """The background pixels touching the person belong to the layer they touch (the head's
    first), opaque with the frame's colour; pixels two away stay the plate's."""
    labels = np.zeros((20, 20), np.uint8)
    labels[4:10, 6:14] = HEAD
    labels[10:20, 8:12] = NECK
    frame = np.full((20, 20, 3), 90, np.uint8)
    plate = np.zeros((20, 20, 3), np.uint8)
    head_rgb, head_a, torso_rgb, torso_a = compose_targets(frame, labels, plate)
    head_ring, body_ring = silhouette_ring(labels)
    assert head_ring[3, 5] and head_ring[10, 7] and not head_ring[2, 6]  # diagonal in, two rows up out
    assert body_ring[12, 7] and body_ring[19, 12] and not body_ring[10, 7]  # beside the head: the head's
    assert not (head_ring & body_ring).any() and not ((head_ring | body_ring) & (labels > 0)).any()
    assert np.all(head_a[head_ring] == 1) and np.all(torso_a[body_ring] == 1)
    assert np.allclose(head_rgb[head_ring], 90 / 255) and np.allclose(torso_rgb[body_ring], 90 / 255)
    beyond = ~(head_ring | body_ring) & (labels == BACKGROUND)
    assert np.all(head_a[beyond] == 0) and np.all(torso_a[beyond] == 0)


def test_torso_target_continues_the_neck_behind_the_chin():
    """A head over a neck column: the torso layer's target covers the band of head rows just
    above the neck with the neck's colour, and nothing higher up or beside the neck."""
    size = 50
    labels = np.zeros((size, size), np.uint8)
    labels[5:30, 10:40] = HEAD
    labels[30:42, 20:30] = NECK
    labels[42:, 5:45] = TORSO
    frame = np.zeros((size, size, 3), np.uint8)
    frame[labels == HEAD] = (200, 150, 120)
    frame[labels == NECK] = (180, 120, 100)
    frame[labels == TORSO] = (20, 20, 80)
    plate = np.full((size, size, 3), (0, 0, 255), np.uint8)
    _, _, torso_rgb, torso_a = compose_targets(frame, labels, plate)
    reach = round(BEHIND_HEAD_BAND * size)
    band = np.zeros((size, size), bool)
    band[30 - reach:30, 20:30] = True  # above the neck
    band[30 - reach:30, 10:20] = band[30 - reach:30, 30:40] = False  # beside it the torso starts lower (row 42)
    assert np.all(torso_a[band] == 1)
    assert np.allclose(torso_rgb[band], np.array([180, 120, 100]) / 255.0)
    assert np.all(torso_a[5:30 - reach, :] == 0)  # the head above the band stays the head's
    # beside the neck the body under the head starts at row 42: that is 12 rows below the
    # head, so there is no head pixel within reach above it and nothing is added
    assert np.all(torso_a[:30, 10:20] == 0) and np.all(torso_a[:30, 30:40] == 0)


def test_zero_lag_smoothing_removes_jitter_keeps_turns():
    rng = np.random.default_rng(1)
    t = np.arange(200) / 25.0
    turn = np.where(t < 4, 0.0, np.minimum((t - 4) * 40, 30.0))[:, None]  # a 40 deg/s head turn to 30 deg
    noisy = turn + rng.normal(0, 0.5, turn.shape)
    smooth = pose.zero_lag_one_euro(noisy, 25, 1.0, 0.5)
    assert pose.jitter(np.hstack([smooth, smooth])[:, None]) < 0.4 * pose.jitter(np.hstack([noisy, noisy])[:, None])
    moving = (t > 4.1) & (t < 4.7)
    assert np.abs(smooth - turn)[moving].max() < 1.0
    # lag, measured on the clean turn: a causal filter trails it, the two-way mean does not
    lag_forward = (pose.one_euro(turn, 25, 1.0, 0.5) - turn)[moving].mean()
    lag_both = (pose.zero_lag_one_euro(turn, 25, 1.0, 0.5) - turn)[moving].mean()
    assert lag_forward < -0.2 and abs(lag_both) < 0.2 * abs(lag_forward)


def test_optional_backend_needs_its_model_dir(tmp_path):
    with pytest.raises(ConfigError) as err:
        make_backend(TrackConfig(landmark_backend="insightface", model_dir=str(tmp_path / "missing")))
    assert "model_dir" in err.value.problem


def test_speaker_dataset_streams_chunk_grouped_samples(moving_clip):
    frames, manifest, workdir = moving_clip
    labels = ChunkReader(sorted(workdir.glob(f"{LABELS}_*.npz")), manifest.chunk_frames, manifest.n_frames)
    arrays = TrackArrays.load({p.name: p for p in workdir.iterdir()})
    features = np.random.default_rng(0).normal(size=(2 * manifest.n_frames, 8)).astype(np.float32)
    ds = SpeakerDataset(frames, labels, manifest, arrays, split="train", audio_features=features, step_window=4)
    order = [s.index for s in ds]
    assert sorted(order) == list(range(manifest.train.stop))
    chunks = np.array(order) // manifest.chunk_frames
    assert np.count_nonzero(np.diff(chunks)) == len(np.unique(chunks)) - 1  # each chunk visited once
    sample = ds[5]
    assert sample.index == 5 and sample.rgb.shape == (128, 128, 3) and sample.labels.shape == (128, 128)
    assert sample.audio.shape == (4, 8) and np.allclose(sample.audio.numpy(), features[9:13])
    assert np.allclose(sample.viewmat.numpy(), arrays.viewmats[5])
    test = SpeakerDataset(frames, labels, manifest, arrays, split="test", shuffle=False)
    assert [s.index for s in test] == list(range(46, 50))


def test_stage_runs_once_and_opens_as_a_dataset(tmp_path, clip):
    from gstalker_core import ingest
    from gstalker_core.config import load_config
    from gstalker_core.storage import open_store
    from gstalker_core.tracking import manifest_of, open_dataset, run

    cfg = load_config("tiny", overrides=[f"home={tmp_path / 'home'}"], environ={})
    store = open_store(cfg)
    ingest_run = ingest.run(store, str(clip("track2s.mp4", seconds=2.0)), cfg).manifest
    first = run(store, ingest_run, cfg)
    again = run(store, ingest_run, cfg)
    assert not first.cache_hit and again.cache_hit and again.manifest.key == first.manifest.key
    meta = manifest_of(first.manifest)
    parts = set(first.manifest.parts)
    assert {"viewmats.npy", "K.npy", "landmarks.npy", "blink.npy", "valid.npy", "template.npy", PLATE, QA_VIDEO,
            f"{LABELS}_00000.npz"} <= parts
    assert meta.n_frames == ingest.manifest_of(ingest_run).n_frames and meta.resolution == 64
    ds = open_dataset(store, first.manifest, ingest_run, cfg.cache_dir, split="test")
    sample = next(iter(ds))
    assert sample.rgb.shape == (64, 64, 3) and sample.index >= meta.test.start
